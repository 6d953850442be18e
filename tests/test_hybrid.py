"""Hybrid sampling (diversity distillation): which network runs at which step with which timestep, the hand-over
rule, k = 0 = the student alone, LoRA students sharing the teacher's base, x0 traces, and the CLI."""

import copy
import json

import pytest
import torch
from tiny_models import tiny_unet2d

from stepdistill.export import edm_renoise, edm_scheduler_for, student_scheduler
from stepdistill.hybrid import handover, lora_teacher, save_trace_grid, structure_cosine, teacher_prefix
from stepdistill.models import Teacher
from stepdistill.models.adapters import add_lora, tuner_layers
from stepdistill.pipelines import StepDistillClassPipeline
from stepdistill.sampling import ddim_step, sample
from stepdistill.schedules import EDMSchedule, VPSchedule

VP = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
VP_EPS = {**VP, "prediction_type": "epsilon"}
EDM = {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "rho": 7.0, "num_train_timesteps": 1000}
FOUR = [999, 749, 499, 249]
LABELS = torch.tensor([0, 1, 2])


def _net(seed, channels=1):
    return tiny_unet2d(sample_size=8, in_channels=channels, seed=seed).eval()


def _record(net, name, calls):
    """Forward hook: (network, timesteps as floats, batch size, adapters off?) of every call."""

    def hook(module, args, kwargs, out):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = torch.as_tensor(t).reshape(-1).double()
        layers = tuner_layers(module)
        off = bool(layers) and all(m.disable_adapters for m in layers)
        calls.append((name, round(float(t[0]), 4), args[0].shape[0], off, args[0].detach().clone()))

    return net.register_forward_hook(hook, with_kwargs=True)


def _pipe(net, kind, trained, edm=False):
    sched = edm_scheduler_for(kind, EDM) if edm else student_scheduler(kind, VP_EPS, trained)
    pipe = StepDistillClassPipeline(
        unet=net, scheduler=sched, trained_timesteps=trained, renoise=edm_renoise(sched, kind) if edm else None
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _vp_teacher(net):
    return Teacher(net, VPSchedule.from_config(VP), "eps")


def _run(pipe, seed=0, **kw):
    return pipe(class_labels=LABELS, generator=torch.Generator().manual_seed(seed), output_type="pt", **kw).images


# --------------------------------------------------------------------------------------------------------
# the hand-over rule
# --------------------------------------------------------------------------------------------------------


def test_handover_rule_lands_on_the_students_trained_timestep():
    # default grid (the student's own): the teacher runs tau_0 .. tau_{k-1} and lands on tau_k
    assert handover(FOUR, 0) == ([], 0)
    assert handover(FOUR, 1) == ([999, 749], 1)
    assert handover(FOUR, 3) == ([999, 749, 499, 249], 3)
    # the teacher's own 10-step grid: its 2nd step would end at 799; the first trained timestep at or below is
    # 749, and that step lands there
    ten = [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert handover(FOUR, 2, ten) == ([999, 899, 749], 1)
    # the official scripts' pitfall (leading base grid [751, 501, 251, 1] against an LCM grid [999, 759, 499,
    # 259]): nearest-timestep matching runs no base step; this rule runs one and hands over at 499
    assert handover([999, 759, 499, 259], 1, [751, 501, 251, 1]) == ([999, 499], 2)
    # no student step left: a 1-step student, or k past the student's last trained timestep
    for trained, k, grid in (([999], 1, None), (FOUR, 4, None), (FOUR, 9, ten)):
        with pytest.raises(ValueError, match="no student step is left"):
            handover(trained, k, grid)
    with pytest.raises(ValueError, match=">= 0"):
        handover(FOUR, -1)


# --------------------------------------------------------------------------------------------------------
# which network runs at which step
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lcm", "ddim", "tcd"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_four_step_student_hooks_count_teacher_then_student(kind, k):
    teacher_net, student_net = _net(1), _net(2)
    teacher = _vp_teacher(teacher_net)
    pipe = _pipe(student_net, kind, FOUR)
    calls = []
    hooks = [_record(teacher_net, "teacher", calls), _record(student_net, "student", calls)]
    _run(pipe, teacher=teacher, teacher_steps=k, teacher_guidance_scale=2.0)
    for h in hooks:
        h.remove()
    # CFG on the teacher: one doubled batch per step; the student: one plain batch per trained step
    got = [(name, t, b) for name, t, b, _, _ in calls]
    assert got == [("teacher", float(t), 6) for t in FOUR[:k]] + [("student", float(t), 3) for t in FOUR[k:]]
    if k:  # the student's first input is the teacher's DDIM step onto its trained timestep, as computed here
        sched = teacher.schedule
        x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        cond_labels = LABELS
        for t, t_next in zip(FOUR[:k], FOUR[1 : k + 1]):
            tt = sched.timestep_to_t(torch.tensor([float(t)] * 3))
            tn = sched.timestep_to_t(torch.tensor([float(t_next)] * 3))
            null = torch.full_like(cond_labels, 10)
            with torch.no_grad():
                out_c, out_u = teacher_net(
                    torch.cat([x, x]), tt.repeat(2) * 999, torch.cat([cond_labels, null])
                ).sample.chunk(2)
            eps = out_u + 2.0 * (out_c - out_u)
            x0, eps = sched.to_x0_eps(eps, x, tt, "eps")
            x = ddim_step(sched, x0, eps, tt, tn).float()
        first_student_input = next(c[4] for c in calls if c[0] == "student")
        torch.testing.assert_close(first_student_input, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["lcm", "ddim"])
def test_k0_is_the_student_alone_exactly(kind):
    pipe = _pipe(_net(2), kind, FOUR)
    teacher = _vp_teacher(_net(1))
    assert torch.equal(_run(pipe), _run(pipe, teacher=teacher, teacher_steps=0))
    assert not torch.equal(_run(pipe), _run(pipe, teacher=teacher, teacher_steps=1))


def test_one_step_student_k0_runs_the_student_once_and_k1_is_refused():
    teacher_net, student_net = _net(1), _net(2)
    pipe = _pipe(student_net, "lcm", [999])
    calls = []
    hooks = [_record(teacher_net, "teacher", calls), _record(student_net, "student", calls)]
    out = _run(pipe, teacher=_vp_teacher(teacher_net), teacher_steps=0)
    assert [(n, t) for n, t, *_ in calls] == [("student", 999.0)]
    assert torch.equal(out, _run(pipe))
    with pytest.raises(ValueError, match=r"timesteps \[999\]\): no student step is left"):
        _run(pipe, teacher=_vp_teacher(teacher_net), teacher_steps=1)
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("kind", ["lcm", "ddim"])
def test_toy_pipeline_hybrid_counts_and_k0(kind):
    from stepdistill.models.toy import ToyMLP
    from stepdistill.pipelines import StepDistillToyPipeline

    torch.manual_seed(0)
    teacher_net, student_net = ToyMLP(hidden=16, layers=1).eval(), ToyMLP(hidden=16, layers=1).eval()
    pipe = StepDistillToyPipeline(
        unet=student_net, scheduler=student_scheduler(kind, VP_EPS, FOUR), trained_timesteps=FOUR
    )
    pipe.set_progress_bar_config(disable=True)
    teacher = _vp_teacher(teacher_net)
    calls = []
    hooks = [_record(teacher_net, "teacher", calls), _record(student_net, "student", calls)]

    def run(**kw):
        return pipe(num_samples=5, generator=torch.Generator().manual_seed(0), **kw).samples

    plain = run()
    assert torch.equal(run(teacher=teacher, teacher_steps=0), plain)
    calls.clear()
    trace = []
    run(teacher=teacher, teacher_steps=3, trace=trace)
    for h in hooks:
        h.remove()
    assert [(n, t) for n, t, *_ in calls] == [
        ("teacher", 999.0),
        ("teacher", 749.0),
        ("teacher", 499.0),
        ("student", 249.0),
    ]
    assert len(trace) == 4


def test_edm_student_hands_over_at_its_trained_noise_level():
    """An EDM student (Karras-grid timesteps, re-noising): the teacher's c_noise, then the student's."""
    teacher_net, student_net = _net(1), _net(2)
    schedule = EDMSchedule(**EDM)
    teacher = Teacher(teacher_net, schedule, "edm")
    trained = [999, 600, 300]
    pipe = _pipe(student_net, "lcm", trained, edm=True)
    calls = []
    hooks = [_record(teacher_net, "teacher", calls), _record(student_net, "student", calls)]
    _run(pipe, teacher=teacher, teacher_steps=1)
    for h in hooks:
        h.remove()
    c_noise = [round(float(schedule.model_time(schedule.timestep_to_t(t))), 4) for t in trained]
    assert [(n, t) for n, t, *_ in calls] == [("teacher", c_noise[0]), ("student", c_noise[1]), ("student", c_noise[2])]


def test_lora_student_shares_the_base_with_the_teacher():
    """One network: the teacher's calls run with every adapter off (= the base), the student's with it on."""
    net = _net(3)
    base = copy.deepcopy(net)
    add_lora(net, rank=2, init_lora_weights=False)  # random B: the student differs from the base
    n_params = sum(p.numel() for p in net.parameters())
    teacher = lora_teacher(net, VPSchedule.from_config(VP), "eps")
    assert teacher.net is net
    pipe = _pipe(net, "lcm", FOUR)
    calls = []
    hook = _record(net, "net", calls)
    _run(pipe, teacher=teacher, teacher_steps=2)
    hook.remove()
    assert [(t, off) for _, t, _, off, _ in calls] == [(999.0, True), (749.0, True), (499.0, False), (249.0, False)]
    assert sum(p.numel() for p in net.parameters()) == n_params  # no second copy
    x, t = calls[0][4], torch.full((3,), 0.5, dtype=torch.float64)
    with torch.no_grad():
        ref = base(x, t * 999, LABELS).sample
    torch.testing.assert_close(teacher.raw(x, t, _class_cond(net)), ref)
    with torch.no_grad():
        assert not torch.allclose(net(x, t * 999, LABELS).sample, ref)  # the adapter is back on afterwards


def _class_cond(net, labels=LABELS):
    from stepdistill.models.conditioning import ClassConditioner

    return ClassConditioner.for_unet2d(net)(labels)


def test_teacher_prefix_with_nothing_to_do_returns_its_input():
    x = torch.randn(2, 1, 8, 8)
    out, j = teacher_prefix(_vp_teacher(_net(1)), x, FOUR, 0)
    assert out is x and j == 0


# --------------------------------------------------------------------------------------------------------
# x0 traces (DT-visualisation)
# --------------------------------------------------------------------------------------------------------


def test_trace_has_one_x0_per_step_and_a_one_step_trace_is_the_sample(tmp_path):
    pipe = _pipe(_net(2), "lcm", FOUR)
    trace = []
    _run(pipe, teacher=_vp_teacher(_net(1)), teacher_steps=1, trace=trace)
    assert len(trace) == 4 and all(x.shape == (3, 1, 8, 8) for x in trace)
    one = _pipe(_net(2), "ddim", [999])
    trace = []
    images = _run(one, trace=trace)
    assert len(trace) == 1
    torch.testing.assert_close((trace[0] / 2 + 0.5).clamp(0, 1), images)
    from PIL import Image

    path = save_trace_grid(trace * 4, str(tmp_path / "trace.png"), max_samples=2, scale=1)
    img = (
        torch.tensor(__import__("numpy").array(Image.open(path))).long().reshape(2 * 9 + 1, 4 * 9 + 1)
    )  # 2 rows, 4 columns
    # row r, column s: sample r's x0 after step s (pad 1); every column of a row holds the same x0 here
    for r in range(2):
        cell = img[1 + r * 9 : 1 + r * 9 + 8, 1 + 3 * 9 : 1 + 3 * 9 + 8]
        expect = ((trace[0][r, 0].clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)
        assert torch.equal(cell, expect.long())
    assert structure_cosine(trace * 3) == pytest.approx(1.0)


def test_reference_sampler_trace_ends_on_the_sample():
    sched = VPSchedule.from_config(VP)
    teacher = _vp_teacher(_net(1))
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = _class_cond(teacher.net, LABELS[:2])
    trace = []
    x = sample(lambda x, t: teacher.raw(x, t, cond), sched, noise, 3, pred_type="eps", trace=trace)
    assert len(trace) == 3 and torch.equal(trace[-1], x)
    assert torch.equal(x, sample(lambda x, t: teacher.raw(x, t, cond), sched, noise, 3, pred_type="eps"))


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    teacher = root / "teacher"
    _net(1).save_pretrained(teacher / "unet")
    (teacher / "scheduler").mkdir()
    (teacher / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler", **VP_EPS}))
    _pipe(_net(2), "lcm", FOUR).save_pretrained(root / "student")
    _pipe(_net(2), "lcm", [999]).save_pretrained(root / "one_step")
    return root


def _cli(capsys, *args):
    from stepdistill.cli import main

    capsys.readouterr()
    code = main(["sample", *map(str, args)])
    return code, capsys.readouterr()


def test_cli_hybrid_sample_and_trace(folders, tmp_path, capsys):
    out, trace = tmp_path / "s.png", tmp_path / "trace.png"
    args = ["--model", folders / "student", "--teacher", folders / "teacher", "--hybrid-teacher-steps", 2]
    args += ["--teacher-guidance-scale", 2, "--num", 4, "--out", out, "--trace", trace]
    code, io = _cli(capsys, *args)
    assert code == 0, io.err
    assert out.is_file() and trace.is_file() and "the first 2 run by the teacher" in io.out
    assert "each of 4 steps" in io.out


@pytest.mark.parametrize(
    "model,extra,message",
    [
        ("one_step", ["--hybrid-teacher-steps", 1], "no student step is left"),
        ("student", ["--hybrid-teacher-steps", 4], "use fewer teacher steps"),
        ("student", ["--hybrid-teacher-steps", 1, "--steps", 4], "no --steps"),
        ("teacher", ["--hybrid-teacher-steps", 1], "needs --model to be a stepdistill export"),
    ],
)
def test_cli_hybrid_errors_are_one_line(folders, tmp_path, capsys, model, extra, message):
    args = ["--model", folders / model, "--teacher", folders / "teacher", "--num", 2, "--out", tmp_path / "x.png"]
    code, io = _cli(capsys, *args, *extra)
    assert code == 2
    assert io.err.startswith("error:") and message in io.err and len(io.err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------------------
# diversity metrics
# --------------------------------------------------------------------------------------------------------


def test_diversity_scores_against_hand_worked_values():
    from stepdistill.eval.diversity import grouped_diversity, mean_pairwise_distance, vendi_score

    same = torch.tensor([[1.0, 2.0]] * 5)
    assert mean_pairwise_distance(same) == 0.0
    assert vendi_score(same) == pytest.approx(1.0)
    # distances 5, 10, 5 between (0,0), (3,4), (6,8)
    assert mean_pairwise_distance(torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])) == pytest.approx(20 / 3)
    assert vendi_score(torch.eye(3)) == pytest.approx(3.0)  # mutually orthogonal: 3 distinct samples
    # two orthogonal directions, one twice: K / 3 has eigenvalues 2/3, 1/3, 0
    two = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    expect = torch.exp(-(torch.tensor(2 / 3) * torch.log(torch.tensor(2 / 3)) + torch.log(torch.tensor(1 / 3)) / 3))
    assert vendi_score(two) == pytest.approx(float(expect))
    div = grouped_diversity(torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0], [9.0, 9.0]]), [0, 0, 1, 1, 2])
    assert div["per_group"][0]["pairwise_distance"] == pytest.approx(5.0)
    assert div["per_group"][1] == {"n": 2, "pairwise_distance": 0.0, "vendi": pytest.approx(1.0)}
    assert 2 not in div["per_group"]  # one sample: no pair
    assert div["mean_pairwise_distance"] == pytest.approx(2.5)
    for bad in (torch.zeros(1, 3), torch.zeros(3)):
        with pytest.raises(ValueError, match="N >= 2"):
            mean_pairwise_distance(bad)
    assert vendi_score(torch.zeros(4, 3)) == pytest.approx(1.0)  # zero vectors: one direction of their own
    assert vendi_score(torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])) == pytest.approx(float(expect))


def test_eval_diversity_per_class_beside_recall_and_hybrid_through_eval(tmp_path):
    """`stepdistill eval`'s diversity metric on a tiny 16x16 digits-shaped export, plain and hybrid."""
    from stepdistill.eval.run import run_eval

    student = tiny_unet2d(sample_size=16, in_channels=1, seed=2).eval()
    folder = tmp_path / "student"
    _pipe(student, "lcm", FOUR).save_pretrained(folder)
    common = dict(num_samples=20, batch_size=20, metrics="diversity")
    out = run_eval(str(folder), "digits", str(tmp_path / "e0"), **common)
    div = out["diversity"]
    assert div["feature_space"] == "digits" and 0 <= div["recall"] <= 1 and 0 <= div["precision"] <= 1
    assert sorted(div["per_condition"], key=int) == [str(c) for c in range(10)]
    assert all(v["n"] == 2 for v in div["per_condition"].values())
    assert div["mean_pairwise_distance"] > 0 and 1 <= div["mean_vendi"] <= 2
    assert out["seconds_per_image"] == pytest.approx(out["sampling_seconds"] / 20, rel=1e-3, abs=1e-5)
    teacher_net = tiny_unet2d(sample_size=16, in_channels=1, seed=1).eval()
    calls = []
    hook = _record(teacher_net, "teacher", calls)
    kw = {"teacher": _vp_teacher(teacher_net), "teacher_steps": 1}
    hybrid = run_eval(str(folder), "digits", str(tmp_path / "e1"), pipeline_kwargs=kw, **common)
    hook.remove()
    assert [t for _, t, *_ in calls] == [999.0]  # one batch of 20: one teacher step
    assert hybrid["diversity"]["mean_pairwise_distance"] != div["mean_pairwise_distance"]


# --------------------------------------------------------------------------------------------------------
# control transfer
# --------------------------------------------------------------------------------------------------------


def _deltas(before, after):
    b = dict(before.named_parameters())
    return {k: (v - b[k]).detach() for k, v in after.named_parameters() if k in b}


@pytest.mark.parametrize("direction", ["teacher->student", "student->teacher"])
def test_lora_transfers_between_teacher_and_student_with_the_same_weight_change(direction):
    from stepdistill.hybrid import transfer_lora
    from stepdistill.models.adapters import adapters_disabled, merge_lora

    teacher, student = _net(1), _net(2)  # a full-copy student: the teacher's architecture, other weights
    src, dst = (teacher, student) if direction == "teacher->student" else (student, teacher)
    src_base, dst_base = copy.deepcopy(src), copy.deepcopy(dst)
    add_lora(src, rank=2, init_lora_weights=False)
    src_delta = _deltas(src_base, merge_lora(copy.deepcopy(src), "default"))
    fused = transfer_lora(copy.deepcopy(dst_base), src, fuse=True)
    dst_delta = _deltas(dst_base, fused)
    changed = [k for k, v in src_delta.items() if v.abs().max() > 0]
    assert changed  # the LoRA changes some weights, and the same change lands on the other network
    for k in src_delta:
        torch.testing.assert_close(dst_delta[k], src_delta[k], atol=1e-6, rtol=1e-5)
    live = transfer_lora(copy.deepcopy(dst_base), src, new_name="style")  # as an adapter, switchable
    x, t = torch.randn(3, 1, 8, 8), torch.full((3,), 500.0)
    with torch.no_grad():
        torch.testing.assert_close(live(x, t, LABELS).sample, fused(x, t, LABELS).sample, atol=1e-5, rtol=1e-5)
        with adapters_disabled(live):
            torch.testing.assert_close(live(x, t, LABELS).sample, dst_base(x, t, LABELS).sample)
    images = _run(_pipe(live, "lcm", FOUR))  # the student's pipeline samples with the transferred control
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()


def test_lora_transfer_refuses_other_shapes():
    from diffusers import UNet2DModel

    from stepdistill.hybrid import transfer_lora

    teacher = _net(1)
    add_lora(teacher, rank=2)
    other = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 24),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
        num_class_embeds=11,
    )
    with pytest.raises(ValueError, match="does not fit UNet2DModel"):
        transfer_lora(other, teacher)
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        transfer_lora(_net(2), teacher, "nope")


def test_toy_pipeline_hybrid_passes_the_class_labels_to_the_teacher():
    """A class-conditional ToyMLP teacher (MSD's toy setting) reads the call's ``class_labels`` in its steps."""
    from stepdistill.models.toy import ToyMLP
    from stepdistill.pipelines import StepDistillToyPipeline

    torch.manual_seed(0)
    teacher_net, student_net = (ToyMLP(hidden=16, layers=1, num_class_embeds=4).eval() for _ in range(2))
    pipe = StepDistillToyPipeline(
        unet=student_net, scheduler=student_scheduler("lcm", VP_EPS, FOUR), trained_timesteps=FOUR
    )
    pipe.set_progress_bar_config(disable=True)
    seen = []
    hook = teacher_net.register_forward_hook(lambda m, a, kw, out: seen.append(a[2] if len(a) > 2 else kw["cond"]),
                                             with_kwargs=True)  # fmt: skip
    labels = [3, 0, 2, 1, 3]
    out = pipe(class_labels=labels, generator=torch.Generator().manual_seed(0), teacher=_vp_teacher(teacher_net),
               teacher_steps=2).samples  # fmt: skip
    hook.remove()
    assert len(seen) == 2 and all(s.tolist() == labels for s in seen)
    # the labels change the teacher's part: other labels, other hand-over point
    other = pipe(class_labels=[0, 1, 0, 2, 2], generator=torch.Generator().manual_seed(0),
                 teacher=_vp_teacher(teacher_net), teacher_steps=2).samples  # fmt: skip
    assert out.shape == (5, 2) and not torch.allclose(out, other)
