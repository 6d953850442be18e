"""One MSD run with an idle student (used by test_msd.py under ``accelerate launch --multi_gpu``, 2 CPU processes).

Step 0 trains on the dataset's labels; from step 1 on every label is mapped into student 0's labels (``label % 5``
with the 0-4 / 5-9 partition), so student 1 has no row on any process. After every step each process saves
both students of the generator and of the per-student fake score.
"""

from __future__ import annotations

import json
import os
import sys

from safetensors.torch import save_file


def run(spec_path: str) -> None:
    from stepdistill.config import build_config
    from stepdistill.trainers.msd import MSDConfig, MSDTrainer

    class IdleStudentMSD(MSDTrainer):
        def compute_loss(self, batch, phase):
            if self.global_step >= 1:
                batch = dict(batch, label=batch["label"] % 5)
            return super().compute_loss(batch, phase)

        def on_step_end(self, step):
            super().on_step_end(step)
            acc = self.accelerator
            for name, wrapper in (("generator", self.generator), ("fake_score", self.fake)):
                net = acc.unwrap_model(wrapper.net)
                while hasattr(net, "module"):
                    net = net.module
                for k, student in enumerate(net.nets):
                    weights = {n: v.detach().cpu().contiguous() for n, v in student.state_dict().items()}
                    out = f"{name}_student{k}_step{step}_rank{acc.process_index}.safetensors"
                    save_file(weights, os.path.join(self.config.output_dir, out))

    with open(spec_path) as f:
        spec = json.load(f)
    trainer = IdleStudentMSD(build_config(MSDConfig, spec["config"]))
    trainer.train()


if __name__ == "__main__":
    run(sys.argv[1])
