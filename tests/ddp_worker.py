"""Run one trainer from a JSON spec and save the trained networks of this process (used by test_ddp.py, under
``accelerate launch --multi_gpu`` with ACCELERATE_USE_CPU=1, or in-process for the 1-process reference)."""

from __future__ import annotations

import json
import os
import sys

from safetensors.torch import save_file


def run(spec_path: str) -> dict:
    from stepdistill.config import build_config
    from stepdistill.train import trainer_classes

    with open(spec_path) as f:
        spec = json.load(f)
    cls = trainer_classes()[spec["method"]]
    trainer = cls(build_config(cls.config_class, spec["config"]))
    trainer.train()
    acc = trainer.accelerator
    out = {}
    for name, s in trainer.specs.items():
        net = acc.unwrap_model(s.module)
        out[name] = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        path = os.path.join(spec["config"]["output_dir"], f"{name}_rank{acc.process_index}.safetensors")
        save_file(out[name], path)
    if acc.is_main_process:
        losses = [h.get("loss", h.get("loss/generator")) for h in trainer.history]
        with open(os.path.join(spec["config"]["output_dir"], "history.json"), "w") as f:
            json.dump({"world": acc.num_processes, "history": trainer.history, "losses": losses}, f)
    return out


if __name__ == "__main__":
    run(sys.argv[1])
