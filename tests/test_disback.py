"""The swappable frozen score (stepdistill/models/frozen.py) and DisBack (stepdistill/trainers/disback.py).

Frozen score: a swap changes what the DM loss reads (and only that), wrapper prefixes are stripped, bad sources are
one-line errors (exit 2 through the CLI), and a resume after a swap continues the loss curve exactly. DisBack, on
2-D toys: stage-1 snapshots move from the analytic teacher towards the initial generator's samples; stage 2 reads
node N-1, ..., 1, then the teacher on the configured schedule (recorded by the loss itself); the teacher's weights
never change while the generator's do; a resume mid-stage-2 continues exactly; recorded nodes can be reused."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from stepdistill.config import ConfigError
from stepdistill.models import Teacher
from stepdistill.models.analytic import MixtureDataset, ddpm_schedule, mixture_teacher, toy_mixture
from stepdistill.models.toy import ToyMLP
from stepdistill.trainers.disback import DisBackConfig, DisBackTrainer
from stepdistill.trainers.dmd2 import DMD2Config, DMD2Trainer

MIX = toy_mixture("ring")


def toy_teacher(seed: int = 0) -> Teacher:
    torch.manual_seed(seed)
    return Teacher(ToyMLP(dim=2, hidden=32, layers=2), ddpm_schedule(), "v")


def perturbed(net: torch.nn.Module, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in net.state_dict().items()}


def base_config(cls, tmp_path, **kw):
    kw = {"output_dir": str(tmp_path), "max_steps": 6, "global_batch": 16, "checkpoint_every": 0,
          "progress": False, "learning_rate": 1e-3, "dfake_gen_update_ratio": 1, **kw}
    return cls(**kw)


def losses(history, key="loss_dm/generator"):
    return [h[key] for h in history if key in h]


# --------------------------------------------------------------------------------------------------------
# the swappable frozen score
# --------------------------------------------------------------------------------------------------------


def test_swap_changes_what_the_loss_reads_and_strips_prefixes(tmp_path):
    teacher = toy_teacher()
    trainer = DMD2Trainer(base_config(DMD2Config, tmp_path / "run"), teacher=teacher, dataset=MixtureDataset(MIX, 64))
    trainer.setup()
    assert trainer.real_score is teacher
    before = {k: v.clone() for k, v in teacher.net.state_dict().items()}
    sd = perturbed(teacher.net)
    file = tmp_path / "score.safetensors"
    save_file({f"module.fake_unet.{k}": v for k, v in sd.items()}, str(file))  # DDP + DMD2 guidance prefixes
    trainer.swap_real_score(str(file))
    score = trainer.real_score
    assert score is not teacher and score.source == str(file)
    for k, v in score.net.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    x_t, t = torch.randn(8, 2), torch.full((8,), 0.5, dtype=torch.float64)
    assert not torch.allclose(score.predict(x_t, t), teacher.predict(x_t, t))
    assert not any(p.requires_grad for p in score.net.parameters())

    # the DM loss calls the swapped network, not the teacher (the teacher still anchors nothing else here)
    calls = {"teacher": 0, "score": 0}
    teacher.net.register_forward_hook(lambda *a: calls.__setitem__("teacher", calls["teacher"] + 1))
    score.net.register_forward_hook(lambda *a: calls.__setitem__("score", calls["score"] + 1))
    trainer.config.max_steps = 1
    trainer.train()
    assert calls["score"] >= 1 and calls["teacher"] == 0
    for k, v in teacher.net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    trainer.swap_real_score(None)
    assert trainer.real_score is teacher


def test_swapped_score_takes_the_teachers_dtype_and_offload(tmp_path):
    cfg = base_config(DMD2Config, tmp_path / "run", teacher_dtype="bf16", teacher_offload=True, max_steps=2,
                      checkpoint_every=1)
    teacher = toy_teacher()
    sd = perturbed(teacher.net)
    trainer = DMD2Trainer(cfg, teacher=teacher, dataset=MixtureDataset(MIX, 64))
    trainer.setup()
    trainer.swap_real_score(sd)  # a state dict: checkpointed as tensors
    score = trainer.real_score
    assert score.weight_dtype == torch.bfloat16 and score.offload_device is not None
    assert all(p.dtype == torch.bfloat16 for p in score.net.parameters())
    for k, v in score.net.state_dict().items():
        torch.testing.assert_close(v, sd[k].to(torch.bfloat16), rtol=0, atol=0)
    trainer.train()
    cfg2 = base_config(DMD2Config, tmp_path / "run", teacher_dtype="bf16", teacher_offload=True, max_steps=2,
                       checkpoint_every=1, resume=str(tmp_path / "run" / "checkpoints" / "step_0000001"))
    resumed = DMD2Trainer(cfg2, teacher=toy_teacher(), dataset=MixtureDataset(MIX, 64))
    resumed.setup()  # the slot is rebuilt before the memory options: it is cast all the same
    assert all(p.dtype == torch.bfloat16 for p in resumed.real_score.net.parameters())
    for k, v in resumed.real_score.net.state_dict().items():
        torch.testing.assert_close(v, sd[k].to(torch.bfloat16), rtol=0, atol=0)


def test_bad_sources_are_one_line_errors(tmp_path):
    teacher = toy_teacher()
    trainer = DMD2Trainer(base_config(DMD2Config, tmp_path / "run"), teacher=teacher, dataset=MixtureDataset(MIX, 64))
    trainer.setup()
    sd = teacher.net.state_dict()
    bad = tmp_path / "bad.safetensors"
    save_file({("x." + k if i == 0 else k): v.clone() for i, (k, v) in enumerate(sd.items())}, str(bad))
    with pytest.raises(ConfigError, match=r"real_score: the weights in .*bad.safetensors do not fit.*missing") as e:
        trainer.swap_real_score(str(bad))
    assert "\n" not in str(e.value)
    two = tmp_path / "two.safetensors"
    save_file({**{f"fake_unet.{k}": v.clone() for k, v in sd.items()},
               **{f"real_unet.{k}": v.clone() for k, v in sd.items()}}, str(two))
    with pytest.raises(ConfigError, match="several prefixes"):
        trainer.swap_real_score(str(two))
    shape = tmp_path / "shape.safetensors"
    save_file({k: (v[:1].clone() if v.ndim else v.clone()) for k, v in sd.items()}, str(shape))
    with pytest.raises(ConfigError, match="of shape"):
        trainer.swap_real_score(str(shape))
    with pytest.raises(ConfigError, match="does not exist"):
        trainer.swap_real_score(str(tmp_path / "missing.safetensors"))
    assert trainer.real_score is teacher
    lora = DMD2Trainer(base_config(DMD2Config, tmp_path / "lora", fake_score_mode="lora", lora_rank=2),
                       teacher=toy_teacher(), dataset=MixtureDataset(MIX, 64))
    lora.setup()
    with pytest.raises(ConfigError, match="LoRA adapters"):
        lora.swap_real_score(sd)


def test_cli_real_score_errors_exit_2(tmp_path, capsys):
    from stepdistill.cli import main

    rc = main(["train", "--config", "recipes/dmd2/digits.yaml", f"output_dir={tmp_path / 'a'}",
               f"real_score={tmp_path / 'nothing.safetensors'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: real_score:") and "does not exist" in err[0]
    bad = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad))
    rc = main(["train", "--config", "recipes/dmd2/digits.yaml", f"output_dir={tmp_path / 'b'}", f"real_score={bad}",
               "max_steps=1", "global_batch=2", "progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "do not fit the network" in err[0] and "unexpected 'w'" in err[0]


class SwapAtStep1(DMD2Trainer):
    """Swaps the real score once, at the end of step 1 (a resumed run past step 1 never calls the swap)."""

    source = ""

    def on_step_end(self, step):
        super().on_step_end(step)
        if step == 1:
            self.swap_real_score(self.source)


def test_resume_after_a_swap_restores_the_swapped_score(tmp_path):
    teacher = toy_teacher()
    file = tmp_path / "score.safetensors"
    save_file(perturbed(teacher.net), str(file))
    SwapAtStep1.source = str(file)

    def run(out, steps, **kw):
        cfg = base_config(DMD2Config, out, max_steps=steps, checkpoint_every=3, **kw)
        trainer = SwapAtStep1(cfg, teacher=toy_teacher(), dataset=MixtureDataset(MIX, 64))
        trainer.train()
        return trainer

    full = run(tmp_path / "full", 6)
    run(tmp_path / "half", 3)
    state = json.loads((tmp_path / "half" / "checkpoints" / "step_0000003" / "trainer_state.json").read_text())
    assert state["extra"]["real_score"]["source"] == str(file) and state["extra"]["real_score"]["sha256"]
    resumed = run(tmp_path / "half", 6, resume="latest")
    assert resumed.real_score.source == str(file)
    assert losses(resumed.history) == losses(full.history)[3:]  # exact continuation

    # the checkpoint refuses a source that changed since
    save_file(perturbed(teacher.net, seed=5), str(file))
    with pytest.raises(ConfigError, match="has changed since"):
        run(tmp_path / "half", 7, resume=str(tmp_path / "half" / "checkpoints" / "step_0000003"))


# --------------------------------------------------------------------------------------------------------
# DisBack
# --------------------------------------------------------------------------------------------------------


def fitted_mlp(steps: int = 200) -> ToyMLP:
    """A ToyMLP regressed onto the analytic ring teacher's v output (the stand-in for "a copy of the teacher")."""
    teacher = mixture_teacher(MIX)
    torch.manual_seed(0)
    net = ToyMLP(dim=2, hidden=64, layers=2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    sched = teacher.schedule
    for _ in range(steps):
        x0, _ = MIX.sample(256, g)
        t = torch.rand(256, generator=g, dtype=torch.float64)
        x_t = sched.add_noise(x0, torch.randn(256, 2, generator=g), t).float()
        with torch.no_grad():
            want = teacher.raw(x_t, t)
        loss = (net(x_t, sched.model_time(t).float()) - want).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def fitted():
    return fitted_mlp()


def disback(tmp_path, teacher=None, fitted_net=None, **kw):
    kw = {"max_steps": 14, "degradation_steps": 4, "degradation_nodes": 2, "backtrack_every": 3,
          "dfake_gen_update_ratio": 1, **kw}
    cfg = base_config(DisBackConfig, tmp_path, **kw)
    objects = {}
    if fitted_net is not None:
        objects = {"generator": copy.deepcopy(fitted_net), "fake_score": copy.deepcopy(fitted_net)}
    return DisBackTrainer(cfg, teacher=teacher if teacher is not None else toy_teacher(),
                          dataset=MixtureDataset(MIX, 256), **objects)


def record_real_scores(trainer):
    """[(step, source of the real score the generator loss reads)] as the loss runs."""
    seen = []
    inner = trainer.generator_loss

    def generator_loss(x, cond):
        score = trainer.real_score
        seen.append((trainer.global_step, "teacher" if score is trainer.teacher else os.path.basename(score.source)))
        return inner(x, cond)

    trainer.generator_loss = generator_loss
    return seen


def test_stage1_nodes_move_from_the_teacher_towards_the_initial_generator(tmp_path, fitted):
    teacher = mixture_teacher(MIX)
    trainer = disback(tmp_path, teacher, fitted, max_steps=61, degradation_steps=60, degradation_nodes=3,
                      global_batch=64, learning_rate=5e-4)
    trainer.setup()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # G0's samples (the generator's only update, at step 60, comes after the nodes)
        z = torch.randn(512, 2, generator=g)
        x0 = trainer.generator(z, None, trainer.gen_times[0].expand(512)).double()
    trainer.train()
    nodes = [tmp_path / "degradation" / f"node_{i:04d}.safetensors" for i in (1, 2, 3)]
    assert all(p.is_file() for p in nodes)
    sched = teacher.schedule
    t = torch.rand(512, generator=g, dtype=torch.float64) * 0.9 + 0.05
    eps = torch.randn(512, 2, generator=g, dtype=torch.float64)
    x_t = sched.add_noise(x0, eps, t).float()

    def x0_of(score):
        with torch.no_grad():
            return score.predict(x_t, t, target="x0", float64=True)

    ref_teacher = x0_of(teacher)
    node_scores = []
    for p in nodes:
        trainer.swap_real_score(str(p), like="fake")
        node_scores.append(x0_of(trainer.real_score))
    from_teacher = [float((s - ref_teacher).square().sum(1).mean()) for s in node_scores]
    dsm = [float((s - x0).square().sum(1).mean()) for s in [ref_teacher, *node_scores]]
    # along the path the score leaves the teacher and fits G0's samples better and better
    assert from_teacher[0] < from_teacher[1] < from_teacher[2]
    assert dsm[0] > dsm[1] > dsm[2] > dsm[3]
    assert dsm[3] < 0.8 * dsm[0]


def test_stage2_backtracks_in_reverse_order_teacher_frozen_generator_trained(tmp_path):
    teacher = toy_teacher()
    before = {k: v.clone() for k, v in teacher.net.state_dict().items()}
    trainer = disback(tmp_path / "run", teacher, degradation_nodes=4, degradation_steps=4, max_steps=16)
    seen = record_real_scores(trainer)
    trainer.setup()
    g0 = {k: v.clone() for k, v in trainer._inner("generator").state_dict().items()}
    trainer.train()
    # stage 1 (steps 0-3): no generator update; stage 2: node 3, 2, 1 for 3 steps each, then the teacher
    want = [(s, "node_0003.safetensors") for s in (4, 5, 6)] + [(s, "node_0002.safetensors") for s in (7, 8, 9)]
    want += [(s, "node_0001.safetensors") for s in (10, 11, 12)] + [(s, "teacher") for s in (13, 14, 15)]
    assert seen == want
    assert trainer.current_node == 0 and trainer.real_score is teacher
    for k, v in teacher.net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    gen = trainer._inner("generator").state_dict()
    assert any(not torch.equal(gen[k], g0[k]) for k in g0)
    # stage 1 did not touch the generator: its optimiser stepped only in stage 2 (12 updates)
    assert int(trainer.opts["generator"].state_dict()["state"][0]["step"]) == 12
    # node 4 is the fake score at the end of stage 1 (it fits G0); the nodes differ from one another
    from safetensors.torch import load_file

    nodes = [load_file(str(tmp_path / "run" / "degradation" / f"node_{i:04d}.safetensors")) for i in range(1, 5)]
    assert all(not torch.equal(nodes[i]["inp.weight"], nodes[i + 1]["inp.weight"]) for i in range(3))


def test_nodes_are_spread_over_stage1_and_the_last_ends_it(tmp_path):
    trainer = disback(tmp_path, degradation_steps=5, degradation_nodes=2, max_steps=6)
    saved = []
    inner = trainer._save_node
    trainer._save_node = lambda i: saved.append((trainer.global_step + 1, i)) or inner(i)
    trainer.train()
    assert saved == [(2, 1), (5, 2)]


def test_resume_mid_stage2_continues_exactly(tmp_path):
    full = disback(tmp_path / "full", checkpoint_every=6)
    seen_full = record_real_scores(full)
    full.train()
    half = disback(tmp_path / "half", checkpoint_every=6, max_steps=6)
    half.train()
    state = json.loads((tmp_path / "half" / "checkpoints" / "step_0000006" / "trainer_state.json").read_text())
    assert state["extra"]["disback_node"] == 1  # step 6: stage 2's third iteration, on node 1 of 2
    assert state["extra"]["real_score"]["source"].endswith("node_0001.safetensors")
    resumed = disback(tmp_path / "half", checkpoint_every=6, resume="latest")
    seen = record_real_scores(resumed)
    resumed.train()
    assert seen == [s for s in seen_full if s[0] >= 6]
    assert losses(resumed.history, "loss_dm/generator") == losses(full.history, "loss_dm/generator")[2:]
    assert losses(resumed.history, "loss_fake/fake_score") == losses(full.history, "loss_fake/fake_score")[6:]


def test_recorded_nodes_are_reused(tmp_path):
    first = disback(tmp_path / "first", max_steps=5)
    first.train()
    folder = tmp_path / "first" / "degradation"
    second = disback(tmp_path / "second", degradation_steps=0, degradation_dir=str(folder), max_steps=4)
    seen = record_real_scores(second)
    second.setup()
    from safetensors.torch import load_file

    last = load_file(str(folder / "node_0002.safetensors"))
    for k, v in second._inner("fake_score").state_dict().items():
        torch.testing.assert_close(v, last[k], rtol=0, atol=0)
    second.train()
    assert seen == [(0, "node_0001.safetensors"), (1, "node_0001.safetensors"), (2, "node_0001.safetensors"),
                    (3, "teacher")]


@pytest.mark.parametrize("base", ["sim", "vsd"])
def test_other_base_methods_read_the_node(tmp_path, base):
    kw = {"fake_score_mode": "full", "real_guidance_scale": 1.0} if base == "vsd" else {}
    trainer = disback(tmp_path, base_method=base, max_steps=6, **kw)
    assert type(trainer).__name__ == f"DisBack{base.upper()}Trainer"
    seen = record_real_scores(trainer)
    trainer.train()
    assert seen[0] == (4, "node_0001.safetensors") and seen[-1] == (5, "node_0001.safetensors")
    key = "loss_sim/generator" if base == "sim" else "loss_vsd/generator"
    assert len(losses(trainer.history, key)) == 2


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"fake_score_mode": "lora"}, "fake_score_mode: full"),
        ({"degradation_steps": 14}, "leaves no backtracking"),
        ({"degradation_steps": 1, "degradation_nodes": 2}, "at least degradation_nodes"),
        ({"base_method": "boot"}, "base_method must be one of"),
        ({"degradation_dir": "nowhere"}, "set degradation_steps: 0"),
        ({"degradation_dir": "nowhere", "degradation_steps": 0}, "does not exist"),
    ],
)
def test_config_errors(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        base_config(DisBackConfig, tmp_path, max_steps=14, **kw).check()


def test_degradation_dir_with_a_gap_is_refused(tmp_path):
    (tmp_path / "node_0002.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="no complete node_0001"):
        base_config(DisBackConfig, tmp_path / "o", degradation_steps=0, degradation_dir=str(tmp_path)).check()
