"""Multi-Student Distillation (stepdistill/trainers/msd.py): routing, per-student updates, export."""

from __future__ import annotations

import os

import pytest
import torch

from stepdistill.config import ConfigError, ObjectError
from stepdistill.train import make_trainer

RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "msd", "digits.yaml")


def msd(tmp_path, *overrides):
    keys = [f"output_dir={tmp_path}", "global_batch=10", "checkpoint_every=0", "sample_every=0", "progress=false"]
    return make_trainer(RECIPE, [*keys, *overrides])


def students(trainer, name="generator"):
    wrapper = trainer.generator if name == "generator" else trainer.fake
    net = wrapper.net
    while hasattr(net, "module"):
        net = net.module
    return net.nets


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def unchanged(module, before):
    return all(torch.equal(p, q) for p, q in zip(module.parameters(), before))


def test_routing_sends_each_label_to_exactly_its_student(tmp_path):
    trainer = msd(tmp_path, "num_students=5")
    trainer.setup()
    assert trainer.partition() == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert trainer.generator.prediction_type == trainer.student_prediction(trainer.gen_times)  # as a DMD2 student
    seen = {k: [] for k in range(5)}
    hooks = [
        s.register_forward_hook(
            lambda m, args, kw, out, k=k: seen[k].extend(kw["class_labels"].tolist()), with_kwargs=True
        )
        for k, s in enumerate(students(trainer))
    ]
    labels = torch.tensor([9, 0, 3, 4, 1, 8, 2, 7, 6, 5, 5])
    cond = trainer.conditioner(labels)
    x = torch.randn(len(labels), *trainer.sample_shape)
    with torch.no_grad():
        out = trainer.generator(x, cond, trainer.gen_times[0].expand(len(labels)))
    for h in hooks:
        h.remove()
    assert {k: sorted(v) for k, v in seen.items()} == {0: [0, 1], 1: [2, 3], 2: [4, 5, 5], 3: [6, 7], 4: [8, 9]}
    # rows come back in input order: row i is student(label i)'s output on row i
    k = trainer.routing()[int(labels[2])]
    with torch.no_grad():
        alone = trainer.generator(x[2:3], trainer.conditioner(labels[2:3]), trainer.gen_times[0].expand(1))
    torch.testing.assert_close(out[2:3], alone, atol=1e-5, rtol=0)
    assert k == 1
    with pytest.raises(ValueError, match="no student"):  # the null class has no unconditional branch
        trainer.generator(x[:1], trainer.conditioner(labels[:1]).drop(1.0), trainer.gen_times[0].expand(1))


def _step(trainer, labels, group):
    """One optimiser step of ``group`` on a batch whose labels are ``labels``."""
    batch = next(iter(trainer.loader))
    batch["label"] = labels
    trainer._set_phase(group)
    out = trainer.compute_loss(batch, group)
    trainer.accelerator.backward(out["loss"])
    name = group[0]
    trainer.opts[name].step()
    trainer.opts[name].zero_grad(set_to_none=True)


@pytest.mark.parametrize("per_student_fake", [False, True])
def test_only_the_routed_student_changes(tmp_path, per_student_fake):
    trainer = msd(tmp_path, "num_students=2", f"fake_score_per_student={str(per_student_fake).lower()}")
    trainer.setup()
    with torch.no_grad():  # at initialisation fake == teacher and the DM gradient is 0: move the fake score first
        for p in trainer.fake.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher = snapshot(trainer.teacher.net)
    for k, labels in enumerate(trainer.partition()):
        batch_labels = torch.tensor(labels * 2)  # 10 rows, all of student k's labels
        gens = [snapshot(s) for s in students(trainer)]
        _step(trainer, batch_labels, ("generator",))
        for j, s in enumerate(students(trainer)):
            assert unchanged(s, gens[j]) == (j != k), f"generator student {j} after a batch of student {k}'s labels"
        if per_student_fake:
            fakes = [snapshot(s) for s in students(trainer, "fake")]
            _step(trainer, batch_labels, ("fake_score",))
            for j, s in enumerate(students(trainer, "fake")):
                assert unchanged(s, fakes[j]) == (j != k), f"fake score {j} after a batch of student {k}'s labels"
    assert unchanged(trainer.teacher.net, teacher)


def test_export_reload_reproduces_trainer_samples_one_evaluation_per_image(tmp_path):
    from diffusers import DiffusionPipeline

    import stepdistill  # noqa: F401  (registers the pipeline classes)

    trainer = msd(tmp_path, "num_students=2", "max_steps=2", "partition=[[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]")
    trainer.train()
    path = trainer.export()
    labels = list(range(10))
    noise = torch.randn(10, *trainer.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = trainer.generator.sample(noise, trainer.conditioner(torch.tensor(labels)), generator=torch.Generator())
    expected = (x / 2 + 0.5).clamp(0, 1)

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.unet).__name__ == "RoutedUNet2DModel" and pipe.unet.partition() == trainer.partition()
    rows = []
    hooks = [s.register_forward_hook(lambda m, i, o: rows.append(o.sample.shape[0])) for s in pipe.unet.nets]
    images = pipe(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
    for h in hooks:
        h.remove()
    assert sum(rows) == 10  # one student evaluation per image
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)

    # the model card's stock-diffusers loop gives the same images
    card = open(os.path.join(path, "README.md")).read()
    loop = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert "RoutedUNet2DModel" not in loop and "UNet2DModel" in loop
    scope: dict = {}
    exec(loop, scope)  # noqa: S102
    torch.testing.assert_close(scope["images"], expected, atol=1e-5, rtol=0)


def test_smaller_students_pretrain_on_teacher_samples(tmp_path):
    trainer = msd(
        tmp_path,
        "num_students=2",
        "student_block_out_channels=[16, 32, 32]",
        "student_pretrain_steps=4",
        "regression_pairs=16",
        "regression_steps=2",
        "regression_batch=8",
        "learning_rate=0.001",
    )
    trainer.setup()
    teacher_params = sum(p.numel() for p in trainer.teacher.net.parameters())
    counts = trainer.student_parameter_counts()
    assert len(counts) == 2 and all(n <= teacher_params / 2 for n in counts)
    losses = trainer.pretrain_losses
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["partition=[[0, 1, 2], [3, 4, 5, 6, 7, 8]]"], r"partition: labels \[9\] have no student"),
        (["partition=[[0, 1, 2, 3, 4], [4, 5, 6, 7, 8, 9]]"], "label 4 is in lists 0 and 1"),
        (["partition=[[0, 1, 2, 3, 4, 10], [5, 6, 7, 8, 9]]"], "label 10 is not a class label"),
        (["num_students=11"], "num_students=11 must be between 1 and the number of class labels"),
    ],
)
def test_bad_partitions_are_config_errors(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        msd(tmp_path, *overrides).setup()


def test_bad_keys_and_objects(tmp_path):
    with pytest.raises(ConfigError, match="partition has 2 lists but num_students is 3"):
        msd(tmp_path, "num_students=3", "partition=[[0], [1, 2, 3, 4, 5, 6, 7, 8, 9]]")
    with pytest.raises(ConfigError, match="fake_cond_dropout.*fake_score_per_student"):
        msd(tmp_path, "fake_score_per_student=true", "fake_cond_dropout=0.1")
    with pytest.raises(ConfigError, match="generator_mode must be 'full'"):
        msd(tmp_path, "generator_mode=lora")
    from stepdistill.trainers.msd import MSDConfig, MSDTrainer

    with pytest.raises(ObjectError, match="generator: MSD's students .* start as copies of one UNet2DModel or ToyMLP"):
        MSDTrainer(MSDConfig(), generator=torch.nn.Linear(2, 2))


def test_msd_ddp_matches_one_process_and_skips_a_student_without_rows(tmp_path):
    """2 CPU processes (DDP, gloo; what is where: the module doc). Every process holds both students and both fake
    scores (nothing is sharded); each routes its own rows and the gradients are averaged, so both ranks end equal
    to a 1-process run of the same global batch. A student with no row on any process (student 0's labels only
    from step 1 on: tests/msd_ddp_worker.py) keeps its weights bit for bit, in the generator and in the fake
    scores, although weight decay is on and Adam's moments are non-zero from step 0: DDP (find_unused_parameters)
    leaves a gradient that no process produced at None and AdamW skips parameters without one."""
    import sys

    from safetensors.torch import load_file
    from test_ddp import HERE, _launch_two, _spec

    sys.path.insert(0, HERE)
    from msd_ddp_worker import run

    from stepdistill.assets import digits_teacher_path

    config = dict(
        teacher=digits_teacher_path(),
        dataset="digits",
        num_students=2,
        fake_score_per_student=True,
        max_steps=3,
        global_batch=8,
        dfake_gen_update_ratio=1,
        learning_rate=1e-4,
        warmup_steps=0,
        weight_decay=0.01,
        checkpoint_every=0,
        sample_every=0,
        progress=False,
    )
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _launch_two(_spec(tmp_path, "two", "msd", dict(config, output_dir=two)), two, worker="msd_ddp_worker.py")
    run(_spec(tmp_path, "one", "msd", dict(config, output_dir=one)))
    teacher = load_file(os.path.join(config["teacher"], "unet", "diffusion_pytorch_model.safetensors"))

    def weights(name, k, step, rank, out=two):
        return load_file(os.path.join(out, f"{name}_student{k}_step{step}_rank{rank}.safetensors"))

    for name in ("generator", "fake_score"):
        for rank, out in ((0, two), (1, two), (0, one)):
            s0 = [weights(name, 1, step, rank, out) for step in range(3)]
            assert any(not torch.equal(s0[0][n], teacher[n]) for n in teacher), f"{name}: student 1 never trained"
            for step in (1, 2):  # no row of student 1 on any process: not stepped
                assert all(torch.equal(s0[step][n], s0[0][n]) for n in s0[0]), f"{name} student 1, step {step}"
            # student 0 has every row: it keeps training, equally on both ranks
            a, b = weights(name, 0, 1, rank, out), weights(name, 0, 2, rank, out)
            assert any(not torch.equal(a[n], b[n]) for n in a), f"{name}: student 0 did not train at step 2"
        d1, d2 = [], []  # the update of every weight from the teacher (students start as the teacher)
        for k in (0, 1):
            for step in range(3):
                r0, r1 = weights(name, k, step, 0), weights(name, k, step, 1)
                assert all(torch.equal(r0[n], r1[n]) for n in r0), f"{name} student {k} differs between ranks"
            ref = weights(name, k, 2, 0, one)
            d1 += [(ref[n] - teacher[n]).flatten() for n in ref]
            d2 += [(r0[n] - teacher[n]).flatten() for n in ref]
        # Adam's first steps move a weight by up to lr however small its gradient, and the first generator
        # gradients are near zero (the fake score starts as the teacher): the reduction-order noise of near-zero
        # gradients shows at a fraction of lr in single weights, so compare the whole update (a rank reading the
        # wrong rows or skipping the average gives a far lower cosine)
        d1, d2 = torch.cat(d1).double(), torch.cat(d2).double()
        assert d1.norm() > 0
        assert torch.nn.functional.cosine_similarity(d1, d2, dim=0) > 0.99, name
        assert abs(d2.norm() / d1.norm() - 1) < 1e-2, name


SD_RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "msd", "sd15.yaml")
PROMPTS = ["a cat", "a dog", "the cat", "a red dog", "a red car", "the blue car", "two cats", "a dog and a cat"]


def test_prompt_partition_routes_each_prompt_to_its_nearest_centre_and_exports(tmp_path):
    """Text teacher (a tiny SD1.5 twin): k-means centres of the training prompts' text features; each prompt runs
    exactly the student of its nearest centre (forward hooks), in the trainer and in the exported pipeline, whose
    plain pipe(prompt=[...]) call evaluates one student per image and gives the trainer's samples."""
    from diffusers import DiffusionPipeline
    from test_real_recipes import SIDE, _save_sd

    from stepdistill.models.routed import prompt_features

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    keys = [f"teacher={_save_sd(tmp_path / 'sd')}", f"dataset={tmp_path / 'prompts.txt'}", f"resolution={SIDE}"]
    keys += ["num_students=3", "max_steps=1", "mixed_precision=no", "dfake_gen_update_ratio=1"]
    trainer = make_trainer(SD_RECIPE, [f"output_dir={tmp_path / 'run'}", "global_batch=2", "checkpoint_every=0",
                                       "sample_every=0", "progress=false", *keys])  # fmt: skip
    trainer.train()
    cond = trainer.conditioner(PROMPTS)
    feats = prompt_features(cond.kwargs["encoder_hidden_states"])
    centres = trainer.centres()
    assert centres.shape == (3, feats.shape[1]) and torch.allclose(centres.norm(dim=1), torch.ones(3))
    nearest = (feats @ centres.T).argmax(dim=1)
    assert sorted(set(nearest.tolist())) == [0, 1, 2]  # k-means: every cluster holds training prompts
    for j in range(3):  # a Lloyd fixed point: each centre is the (unit) mean of its prompts
        mean = feats[nearest == j].mean(0)
        torch.testing.assert_close(centres[j], mean / mean.norm(), atol=1e-5, rtol=0)

    def hooked(nets, seen):
        return [
            s.register_forward_hook(lambda m, args, out, k=k: seen[k].append(args[0].shape[0]))
            for k, s in enumerate(nets)
        ]

    seen = {k: [] for k in range(3)}
    hooks = hooked(students(trainer), seen)
    noise = torch.randn(len(PROMPTS), *trainer.sample_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = trainer.generator.sample(noise, cond, generator=torch.Generator().manual_seed(1))
    for h in hooks:
        h.remove()
    assert {k: sum(v) for k, v in seen.items()} == {k: int((nearest == k).sum()) for k in range(3)}

    pipe = DiffusionPipeline.from_pretrained(trainer.export())
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.unet).__name__ == "RoutedUNet2DConditionModel"
    torch.testing.assert_close(pipe.unet.centre_table, centres, atol=1e-6, rtol=0)
    seen = {k: [] for k in range(3)}
    hooks = hooked(pipe.unet.nets, seen)
    latents = pipe(PROMPTS, generator=torch.Generator().manual_seed(1), output_type="latent").images
    for h in hooks:
        h.remove()
    assert {k: sum(v) for k, v in seen.items()} == {k: int((nearest == k).sum()) for k in range(3)}  # 1 per image
    torch.testing.assert_close(latents.float(), ref.float(), atol=2e-4, rtol=2e-4)


def test_toy_students_each_label_reaches_exactly_its_toymlp_and_exports(tmp_path):
    """A class-conditional ToyMLP teacher (the mixture mode as the class): K ToyMLP students behind a RoutedToyMLP;
    forward hooks see each label at its student only, in the trainer and in the reloaded toy pipeline, which
    samples the trainer's points per label."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    import stepdistill  # noqa: F401  (registers the pipeline classes)
    from stepdistill.models.toy import ToyMLP

    torch.manual_seed(0)  # a small class-conditional toy teacher folder, as recipes/sfd/teacher_toy2d.yaml writes
    ToyMLP(dim=2, hidden=16, layers=2, num_class_embeds=8).save_pretrained(str(tmp_path / "teacher" / "unet"))
    DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing",
                  clip_sample=False).save_pretrained(str(tmp_path / "teacher" / "scheduler"))  # fmt: skip
    recipe = os.path.join(os.path.dirname(RECIPE), "toy2d.yaml")
    trainer = make_trainer(recipe, [f"teacher={tmp_path / 'teacher'}", f"output_dir={tmp_path / 'run'}",
                                    "num_students=3", "max_steps=1", "global_batch=16", "regression_pairs=64",
                                    "checkpoint_every=0", "progress=false"])  # fmt: skip
    trainer.train()
    assert trainer.partition() == [[0, 1, 2], [3, 4, 5], [6, 7]]
    net = students(trainer)
    assert all(type(s) is ToyMLP for s in net)
    assert type(trainer.fake.net).__name__ == "ToyMLP"  # one shared fake score (a teacher copy)

    def seen_by(nets, call):
        seen = {k: [] for k in range(len(nets))}
        hooks = [s.register_forward_hook(lambda m, a, kw, out, k=k: seen[k].extend(kw["cond"].tolist()),
                                         with_kwargs=True) for k, s in enumerate(nets)]  # fmt: skip
        try:
            out = call()
        finally:
            for h in hooks:
                h.remove()
        return {k: sorted(v) for k, v in seen.items()}, out

    labels = torch.tensor([7, 0, 3, 5, 1, 6, 2, 4, 4])
    noise = torch.randn(len(labels), 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        seen, ref = seen_by(net, lambda: trainer.generator.sample(noise, trainer.conditioner(labels)))
    assert seen == {0: [0, 1, 2], 1: [3, 4, 4, 5], 2: [6, 7]}

    pipe = DiffusionPipeline.from_pretrained(trainer.export())
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.unet).__name__ == "RoutedToyMLP" and pipe.unet.partition() == trainer.partition()
    call = lambda: pipe(class_labels=labels.tolist(), generator=torch.Generator().manual_seed(1)).samples  # noqa: E731
    seen, points = seen_by(pipe.unet.nets, call)
    assert seen == {0: [0, 1, 2], 1: [3, 4, 4, 5], 2: [6, 7]}  # one student evaluation per point
    torch.testing.assert_close(points, ref, atol=1e-5, rtol=0)
    # without labels (the toy pipeline's plain call) point i takes label i mod 8
    seen, _ = seen_by(pipe.unet.nets, lambda: pipe(num_samples=10, generator=torch.Generator().manual_seed(1)))
    assert seen == {0: [0, 0, 1, 1, 2], 1: [3, 4, 5], 2: [6, 7]}


def test_a_generator_object_is_each_students_start_so_a_callable_teacher_distils(tmp_path):
    """The exact class-conditional mixture (a callable, no network to copy) with a ToyMLP ``generator=``: every
    student starts as a copy of it, each fake score (per student here) as a copy of ``fake_score=``, and the
    students train."""
    from stepdistill.models.analytic import MixtureDataset, mixture_teacher, toy_mixture
    from stepdistill.models.toy import ToyMLP
    from stepdistill.trainers.msd import MSDConfig, MSDTrainer

    mix = toy_mixture("gmm8")
    torch.manual_seed(0)
    gen, fake = (ToyMLP(dim=2, hidden=16, layers=1, num_class_embeds=8) for _ in range(2))
    cfg = MSDConfig(output_dir=str(tmp_path), num_students=2, fake_score_per_student=True, max_steps=2,
                    dfake_gen_update_ratio=1, global_batch=16, checkpoint_every=0, progress=False)  # fmt: skip
    trainer = MSDTrainer(cfg, teacher=mixture_teacher(mix), generator=gen, fake_score=fake,
                         dataset=MixtureDataset(mix, 64))  # fmt: skip
    trainer.setup()
    for name, given in (("generator", gen), ("fake", fake)):
        for s in students(trainer, name):
            assert type(s) is ToyMLP and unchanged(s, snapshot(given))
    before = [snapshot(s) for s in students(trainer)]
    trainer.train()
    assert not any(unchanged(s, b) for s, b in zip(students(trainer), before))
