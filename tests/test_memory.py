"""Memory options of every teacher -> student trainer (StudentConfig): gradient checkpointing (the module flag,
fewer saved activation bytes, the same losses and gradients, LoRA adapters recomputed in their forward state),
a bf16 teacher (cast after the fp32 copies, the student still trains in fp32; refused or base-only with a LoRA
on the teacher's base), teacher offload (weights on the host between calls, device copies during them, through
a fake device on CPU-only machines), cached text embeddings, and bad values. Tiny SDXL-class pipeline folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from tiny_models import save_tiny_pipeline, tiny_sdxl_components

from stepdistill.config import ConfigError, build_config
from stepdistill.models import Teacher
from stepdistill.models.conditioning import ClassConditioner, TextConditioner
from stepdistill.models.denoiser import _unwrap
from stepdistill.models.toy import ToyMLP
from stepdistill.train import trainer_classes
from stepdistill.trainers import student as student_module
from stepdistill.trainers.student import StudentConfig, StudentTrainer, enable_gradient_checkpointing

CAPTIONS = ["a cat", "a dog", "the cat", "a red dog"]
METHODS = ("dmd2", "sim", "vsd", "progressive", "consistency")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    teacher = save_tiny_pipeline(tiny_sdxl_components(root / "src"), StableDiffusionXLPipeline, root / "sdxl")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(caption)
    return {"teacher": teacher, "images": str(images), "root": root}


def _config(method, assets, **kw):
    cls = trainer_classes()[method]
    data = dict(
        teacher=assets["teacher"],
        dataset=assets["images"],
        output_dir=str(assets["root"] / "run"),
        resolution=8,
        global_batch=2,
        max_steps=2,
        learning_rate=1e-3,
        checkpoint_every=0,
        progress=False,
        lora_rank=4,
        lora_alpha=4.0,
        seed=0,
    )
    if method in ("dmd2", "sim", "vsd"):
        data.update(fake_score_mode="full", dfake_gen_update_ratio=1, lora_target_modules=[])
    if method == "progressive":
        data.update(start_steps=4, final_steps=2, steps_per_round=2, max_steps=0)
    if method == "consistency":
        data.update(num_ddim_timesteps=50, w_min=2.0, w_max=4.0)
    data.update(kw)
    return cls, build_config(cls.config_class, data)


def _trainer(method, assets, **kw):
    cls, cfg = _config(method, assets, **kw)
    return cls(cfg)  # setup() makes its accelerator (CUDA where there is one)


class Recorder:
    """Per update group: the bytes autograd saves while its loss is built, and the gradients after backward;
    the storage of every saved tensor as backward reads it back."""

    def __init__(self, trainer):
        self.saved, self.grads, self.unpacked = [], [], set()
        self.trainer = trainer
        loss, backward = trainer.compute_loss, trainer.accelerator.backward

        def compute_loss(batch, group):
            seen = {}

            def pack(t):
                seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
                return t

            def unpack(t):
                self.unpacked.add(t.data_ptr())
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                out = loss(batch, group)
            self.saved.append((group, sum(seen.values())))
            return out

        def after_backward(value, **kw):
            backward(value, **kw)
            grads = {n: [p.grad.clone() for p in ps if p.grad is not None] for n, ps in trainer.params.items()}
            self.grads.append(grads)

        trainer.compute_loss = compute_loss
        trainer.accelerator.backward = after_backward

    def bytes_of(self, name):
        return max(b for g, b in self.saved if name in g)


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _changed(before, params):
    return any(not torch.equal(a, b) for a, b in zip(before, params))


# --------------------------------------------------------------------------------------------------------
# gradient checkpointing
# --------------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_flag_fewer_saved_bytes_same_training(assets):
    runs = {}
    for ckpt in (False, True):
        trainer = _trainer("dmd2", assets, gradient_checkpointing=ckpt)
        trainer.setup()
        rec = Recorder(trainer)
        before = _snapshot(trainer.params["generator"])
        trainer.train()
        assert _changed(before, trainer.params["generator"]), "the generator did not train"
        runs[ckpt] = (trainer, rec)
    trainer, rec = runs[True]
    for name in ("generator", "fake_score"):
        assert _unwrap(trainer._inner(name)).is_gradient_checkpointing, name
        assert not _unwrap(runs[False][0]._inner(name)).is_gradient_checkpointing, name
        # activations inside the checkpointed blocks are recomputed in backward, not kept
        assert rec.bytes_of(name) < 0.8 * runs[False][1].bytes_of(name), (name, rec.saved, runs[False][1].saved)
    # the teacher too (a no-op under no_grad; SIM differentiates through it)
    assert trainer.teacher.net.is_gradient_checkpointing
    # the same computation: equal losses and gradients at every group of both steps
    for a, b in zip(runs[False][0].history, trainer.history):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    for ga, gb in zip(runs[False][1].grads, rec.grads):
        for name in ga:
            for x, y in zip(ga[name], gb[name]):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)


def _lora_sim_grads(assets):
    trainer = _trainer("sim", assets, generator_mode="lora", fake_score_mode="lora", gradient_checkpointing=True)
    trainer.config.max_steps = 1
    trainer.setup()
    rec = Recorder(trainer)
    trainer.train()
    return rec.grads


def test_gradient_checkpointing_recomputes_lora_blocks_in_their_forward_state(assets, monkeypatch):
    """SIM with a LoRA generator and a LoRA fake score on the teacher's base: the generator's forward runs with
    its adapter, the teacher's (differentiated) forward with adapters off, the fake score with its adapter. The
    recompute in backward must see the same states: gradients equal those without checkpointing."""
    ref = _trainer("sim", assets, generator_mode="lora", fake_score_mode="lora")
    ref.config.max_steps = 1
    ref.setup()
    rec = Recorder(ref)
    ref.train()
    expected = rec.grads
    got = _lora_sim_grads(assets)

    def max_diff(a, b):
        return max(float((x - y).abs().max()) for ga, gb in zip(a, b) for n in ga for x, y in zip(ga[n], gb[n]))

    scale = max(float(x.abs().max()) for g in expected for n in g for x in g[n])
    assert max_diff(expected, got) <= 1e-5 * scale

    # diffusers' stock checkpoint function recomputes with whatever adapter is active at backward time: wrong
    # gradients, or (where the saved tensors differ in number) torch's CheckpointError; the test above catches it
    def stock(module, *args):
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)

    monkeypatch.setattr(student_module, "checkpoint_with_adapter_state", stock)
    try:
        diff = max_diff(expected, _lora_sim_grads(assets))
    except torch.utils.checkpoint.CheckpointError:
        diff = float("inf")
    assert diff > 1e-3 * scale


# --------------------------------------------------------------------------------------------------------
# teacher dtype
# --------------------------------------------------------------------------------------------------------


def test_teacher_bf16_cast_after_copies_student_trains_in_fp32(assets):
    trainer = _trainer("dmd2", assets, teacher_dtype="bf16")
    trainer.setup()
    device = trainer.accelerator.device
    fp32 = Teacher.from_pretrained(assets["teacher"])
    fp32.net.to(device)
    # the full copies were taken from the fp32 weights, then the teacher was cast
    gen = _unwrap(trainer._inner("generator")).state_dict()
    for k, v in fp32.net.state_dict().items():
        assert torch.equal(gen[k], v), k
    teacher_params = list(trainer.teacher.net.parameters())
    assert {p.dtype for p in teacher_params} == {torch.bfloat16}
    for name in ("generator", "fake_score"):
        assert {p.dtype for p in trainer.params[name]} == {torch.float32}, name
    assert trainer.teacher.weight_dtype == torch.bfloat16
    frozen = _snapshot(teacher_params)
    before = _snapshot(trainer.params["generator"])
    # the bf16 teacher takes and returns fp32, close to the fp32 teacher
    x = torch.randn(2, *trainer.sample_shape, device=device)
    cond = trainer._cond_batch(trainer.dataset.example(2))
    t = torch.full((2,), 0.5, dtype=torch.float64)
    out, ref = trainer.teacher.raw(x, t, cond, 2.0), fp32.raw(x, t, cond, 2.0)
    assert out.dtype == torch.float32
    assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())
    trainer.train()
    assert not _changed(frozen, teacher_params), "the frozen teacher changed"
    assert _changed(before, trainer.params["generator"]), "the generator did not train"
    assert {p.dtype for p in trainer.params["generator"]} == {torch.float32}
    assert all(np.isfinite(v) for h in trainer.history for v in h.values())


def test_teacher_dtype_with_a_lora_on_the_teacher_base(assets):
    # without autocast the LoRA student's forward would run on the bf16 base: refused, naming both keys
    for kw, key in ((dict(generator_mode="lora"), "generator_mode"), (dict(fake_score_mode="lora"), "fake_score_mode")):
        with pytest.raises(ConfigError, match=rf"teacher_dtype=bf16 with {key}=lora.*mixed_precision"):
            _config("dmd2", assets, teacher_dtype="bf16", **kw)
    with pytest.raises(ConfigError, match="teacher_dtype=fp16 with generator_mode=lora"):
        _config("consistency", assets, teacher_dtype="fp16", generator_mode="lora", mixed_precision="bf16")
    # progressive LoRA rounds fold into the base: refused before any model loads
    trainer = _trainer("progressive", assets, mixed_precision="bf16", teacher_dtype="bf16", generator_mode="lora")
    with pytest.raises(ConfigError, match="teacher_dtype=bf16 with generator_mode=lora.*folds"):
        trainer.setup()
    # with bf16 autocast: the shared base's own weights are cast, the LoRA weights stay fp32 and train
    trainer = _trainer("dmd2", assets, mixed_precision="bf16", teacher_dtype="bf16", generator_mode="lora")
    trainer.setup()
    base = [p for n, p in trainer.teacher.net.named_parameters() if "lora_" not in n]
    lora = [p for n, p in trainer.teacher.net.named_parameters() if "lora_" in n]
    assert trainer.teacher.shares_base and lora
    assert {p.dtype for p in base} == {torch.bfloat16}
    assert {p.dtype for p in lora} == {torch.float32}
    frozen, before = _snapshot(base), _snapshot(trainer.params["generator"])
    trainer.train()
    assert not _changed(frozen, base)
    assert _changed(before, trainer.params["generator"])
    assert all(np.isfinite(v) for h in trainer.history for v in h.values())


# --------------------------------------------------------------------------------------------------------
# teacher offload
# --------------------------------------------------------------------------------------------------------


class FakeDevice:
    """Makes an offloaded teacher's device copies real copies on a CPU-only machine (``Teacher._stage`` clones),
    and watches the weights the teacher's forward passes use."""

    def __init__(self, monkeypatch):
        self.copies = 0
        self.calls, self.staged = [], []

        def stage(teacher, t):
            self.copies += 1
            self.staged.append(t.detach().to(teacher.offload_device, copy=True))
            return self.staged[-1]

        monkeypatch.setattr(Teacher, "_stage", stage)

    def watch(self, teacher):
        host = {id(m): m.weight for m in teacher.net.modules() if isinstance(m, torch.nn.Conv2d)}

        def hook(module, args):
            w = module._parameters["weight"]
            self.calls.append(w is not host[id(module)] and w.data_ptr() != host[id(module)].data_ptr())

        for m in teacher.net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_pre_hook(hook)


def test_teacher_offload_weights_on_host_between_calls(assets, monkeypatch):
    fake = FakeDevice(monkeypatch)
    trainer = _trainer("dmd2", assets, teacher_offload=True)
    trainer.setup()
    teacher = trainer.teacher
    assert teacher.offload_device == trainer.accelerator.device
    params = dict(teacher.net.named_parameters())
    host = _snapshot(params.values())
    fake.watch(teacher)
    before = _snapshot(trainer.params["generator"])
    trainer.train()
    assert fake.calls and all(fake.calls), "a teacher forward ran on the host weights instead of device copies"
    assert fake.copies >= len(params)
    # between calls: the same parameter objects, on the CPU, unchanged
    assert dict(teacher.net.named_parameters()) == params
    assert all(p.device.type == "cpu" for p in params.values())
    assert not _changed(host, params.values())
    assert trainer.vae.device.type == "cpu"
    assert _changed(before, trainer.params["generator"])
    # the student copies live on the accelerator device, not on the host with the teacher
    assert all(p.device == trainer.accelerator.device for p in trainer.params["generator"])


def test_teacher_offload_keeps_the_device_copies_a_graph_needs(assets, monkeypatch):
    """SIM differentiates through the teacher: its backward runs after the teacher's forward has put the host
    weights back, and must use the device copies of that forward; with gradient checkpointing the teacher's
    blocks are recomputed in backward on freshly staged copies. Gradients equal a resident teacher's."""
    runs = {}
    fake = FakeDevice(monkeypatch)
    for offload, ckpt in ((False, False), (True, False), (True, True)):
        fake.staged.clear()
        trainer = _trainer("sim", assets, teacher_offload=offload, gradient_checkpointing=ckpt)
        trainer.config.max_steps = 1
        trainer.setup()
        fake.calls.clear()
        fake.watch(trainer.teacher)
        rec = Recorder(trainer)
        trainer.train()
        runs[offload, ckpt] = rec
        # every teacher forward (and, with checkpointing, every recompute in backward) ran on device copies
        assert not offload or (fake.calls and all(fake.calls))
        if offload and not ckpt:
            # backward read the device copies of the teacher's forward, never the host weights it went back to
            host = {p.data_ptr() for p in trainer.teacher.net.parameters()}
            assert not host & rec.unpacked
            assert {t.data_ptr() for t in fake.staged} & rec.unpacked
    plain = runs[False, False]
    for key in ((True, False), (True, True)):
        for ga, gb in zip(plain.grads, runs[key].grads):
            for name in ga:
                for x, y in zip(ga[name], gb[name]):
                    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-8)
    # checkpointing the generator, the fake score and the differentiated teacher pass
    assert runs[True, True].bytes_of("generator") < 0.3 * plain.bytes_of("generator")


def test_teacher_offload_refused_with_a_lora_on_the_teacher_base(assets):
    with pytest.raises(ConfigError, match="teacher_offload=true with generator_mode=lora"):
        _config("progressive", assets, teacher_offload=True, generator_mode="lora")
    with pytest.raises(ConfigError, match="teacher_offload=true with fake_score_mode=lora"):
        _config("dmd2", assets, teacher_offload=True, fake_score_mode="lora")
    with pytest.raises(ConfigError, match="fake_score_mode=lora"):  # VSD's default fake score is a LoRA
        build_config(trainer_classes()["vsd"].config_class, {"teacher_offload": True})


# --------------------------------------------------------------------------------------------------------
# text embeddings
# --------------------------------------------------------------------------------------------------------


def _encoder_calls(conditioner):
    calls = []
    for enc in conditioner.text_encoders:
        if enc is not None:
            enc.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    return calls


def test_cache_text_embeddings_encodes_once_and_frees_the_encoders(assets):
    # default: the encoders stay next to the denoiser and run at each new prompt during training
    plain = _trainer("dmd2", assets)
    plain.setup()
    calls = _encoder_calls(plain.conditioner)
    plain.train()
    assert calls

    trainer = _trainer("dmd2", assets, cache_text_embeddings=True)
    trainer.setup()
    cond = trainer.conditioner
    assert isinstance(cond, TextConditioner)
    assert trainer.text_cache_bytes > 0
    assert all(p.device.type == "cpu" for enc in cond.text_encoders for p in enc.parameters())
    calls = _encoder_calls(cond)
    trainer.train()
    trainer.sample_images(0)
    assert calls == [], "a text encoder ran after the prompts were cached"
    # the cached conditions are the encoders' outputs, on the device of the batch
    fresh = TextConditioner.from_pretrained(assets["teacher"], resolution=16)
    got, want = trainer._cond_batch({"caption": CAPTIONS}), fresh(CAPTIONS).to(trainer.accelerator.device)
    torch.testing.assert_close(got.kwargs, want.kwargs)
    torch.testing.assert_close(got.null, want.null)
    assert got.kwargs["encoder_hidden_states"].device == trainer.accelerator.device


def test_cache_text_embeddings_warns_for_a_class_conditional_teacher():
    stub = StudentTrainer.__new__(StudentTrainer)
    stub.conditioner = ClassConditioner(num_classes=10)
    with pytest.warns(UserWarning, match="cache_text_embeddings=true has no effect"):
        assert StudentTrainer.cache_text_embeddings(stub) == 0


# --------------------------------------------------------------------------------------------------------
# every method, and bad values
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_with_all_memory_options(method, assets, monkeypatch):
    fake = FakeDevice(monkeypatch)
    trainer = _trainer(
        method,
        assets,
        gradient_checkpointing=True,
        teacher_dtype="bf16",
        teacher_offload=True,
        cache_text_embeddings=True,
    )
    trainer.setup()
    fake.watch(trainer.teacher)
    teacher = trainer.teacher
    assert _unwrap(trainer._inner("generator")).is_gradient_checkpointing
    assert {p.dtype for p in teacher.net.parameters()} == {torch.bfloat16}
    assert all(p.device.type == "cpu" for p in teacher.net.parameters())
    before = _snapshot(trainer.params["generator"])
    trainer.train()
    assert fake.calls and all(fake.calls)
    assert _changed(before, trainer.params["generator"])
    assert {p.dtype for p in trainer.params["generator"]} == {torch.float32}
    assert len(trainer.history) == 2 and all(np.isfinite(v) for h in trainer.history for v in h.values())


@pytest.mark.parametrize(
    "data, key",
    [
        ({"teacher_dtype": "fp8"}, "teacher_dtype"),
        ({"teacher_dtype": "float16"}, "teacher_dtype"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing"),
        ({"teacher_offload": 1}, "teacher_offload"),
        ({"cache_text_embeddings": "true"}, "cache_text_embeddings"),
    ],
)
def test_bad_memory_values_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key):
        build_config(StudentConfig, data)
    cfg = StudentConfig()
    for k, v in data.items():
        setattr(cfg, k, v)
    with pytest.raises(ConfigError, match=key):  # configs built in code are checked too (trainer.validate)
        cfg.check_memory_options()


def test_gradient_checkpointing_refused_for_a_network_without_it():
    with pytest.raises(ConfigError, match="gradient_checkpointing: ToyMLP does not support it"):
        enable_gradient_checkpointing(ToyMLP(dim=2))
