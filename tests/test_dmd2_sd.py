"""DMD2 on tiny text-to-image teachers saved as local pipeline folders (SD1.5-class: one CLIP encoder; SDXL-class:
two encoders and added_cond_kwargs): two iterations with the GAN head and backward simulation in full and LoRA
modes, gradient isolation between the update groups, export, reload through diffusers, the model card's
stock-diffusers calls, the LoRA file on the original teacher; the recipes; bad input on this path."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file
from tiny_models import save_tiny_pipeline, tiny_sd_components, tiny_sdxl_components

import stepdistill  # noqa: F401  (registers the StepDistill* pipelines with diffusers)
from stepdistill.config import ConfigError, build_config
from stepdistill.pipelines import StepDistillSDPipeline, StepDistillSDXLPipeline
from stepdistill.train import make_trainer
from stepdistill.trainers.dmd2 import DMD2Config, DMD2Trainer
from stepdistill.trainers.dsm import DSMConfig

ROOT = Path(__file__).resolve().parents[1]
KINDS = {
    "sd": (tiny_sd_components, StableDiffusionPipeline, StepDistillSDPipeline),
    "sdxl": (tiny_sdxl_components, StableDiffusionXLPipeline, StepDistillSDXLPipeline),
}
CAPTIONS = ["a cat", "a dog", "the cat", "a red dog"]
TIMESTEPS = [999, 499]
SIDE = 8  # latent side of the tiny UNets; the tiny VAE has 2 blocks: 16 px images


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i_teachers")
    out = {}
    for kind, (components, stock_cls, _) in KINDS.items():
        out[kind] = save_tiny_pipeline(components(root / f"{kind}_src"), stock_cls, root / kind)
    return out


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Real images for the GAN: RGB PNGs (not square, so they are resized and cropped) with .txt captions."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(caption)
    return str(root)


def _config(teacher, images, out, **kw):
    base = dict(
        output_dir=str(out),
        teacher=teacher,
        dataset=images,
        resolution=SIDE,
        seed=0,  # backward simulation's shared step index is k = 0 at step 0 and k = 1 at step 1
        max_steps=2,
        dfake_gen_update_ratio=1,  # the generator updates in both iterations
        global_batch=2,
        learning_rate=1e-3,
        warmup_steps=0,
        denoising_timesteps=TIMESTEPS,
        backward_simulation=True,
        real_guidance_scale=2.0,
        gan_generator_weight=5e-3,
        gan_discriminator_weight=1e-2,
        lora_rank=4,
        lora_alpha=8.0,
        checkpoint_every=0,
        progress=False,
    )
    base.update(kw)
    return build_config(DMD2Config, base)


def _base_weights(net) -> dict[str, torch.Tensor]:
    """A network's own weights under their diffusers names (peft's LoRA layers and weights left out)."""
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in net.named_parameters() if "lora_" not in n}


def _grads(params):
    """(number of parameters without .grad, sum of |grad|)."""
    none = sum(p.grad is None for p in params)
    total = sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)
    return none, total


class Spy:
    """Watches a trainer during ``train()``: the gradients of every network after each group's backward, the
    backward-simulation step index of each generator input, and the weights right after preparation."""

    def __init__(self, trainer: DMD2Trainer):
        from accelerate import Accelerator

        self.trainer = trainer
        self.events, self.ks, self.before = [], [], {}
        trainer._accelerator = acc = Accelerator(cpu=True)
        loss, gen_input, prepared, backward = (
            trainer.compute_loss,
            trainer._generator_input,
            trainer.on_prepared,
            acc.backward,
        )

        def compute_loss(batch, group):
            self.group = group
            return loss(batch, group)

        def generator_input(batch, cond, k):
            self.ks.append(k)
            return gen_input(batch, cond, k)

        def on_prepared():
            prepared()
            self.before = {name: [p.detach().clone() for p in ps] for name, ps in trainer.params.items()}
            self.teacher_params = [p for n, p in trainer.teacher.net.named_parameters() if "lora_" not in n]

        def after_backward(loss_, **kw):
            backward(loss_, **kw)
            state = {name: _grads(ps) for name, ps in trainer.params.items()}
            state["teacher"] = _grads(self.teacher_params)
            self.events.append((self.group, state))

        trainer.compute_loss = compute_loss
        trainer._generator_input = generator_input
        trainer.on_prepared = on_prepared
        acc.backward = after_backward

    def changed(self, name) -> bool:
        return any(not torch.equal(a, b) for a, b in zip(self.before[name], self.trainer.params[name]))


def _card_block(folder, heading) -> str:
    card = Path(folder, "README.md").read_text()
    m = re.search(rf"## {re.escape(heading)}\n.*?```python\n(.*?)```", card, re.S)
    assert m, f"no python block under '## {heading}' in the model card:\n{card}"
    return m.group(1)


def _run_card(code):
    """Execute a model-card snippet as written (it seeds its own generator with 0), except that its call returns
    arrays."""
    call = 'pipe("a photo of a cat", '
    assert code.count(call) == 1 and "generator = torch.Generator().manual_seed(0)" in code, code
    code = code.replace(call, call + 'output_type="np", ')
    ns = {}
    exec(compile(code, "<model card>", "exec"), ns)
    return ns


@pytest.mark.parametrize(
    "kind, generator_mode, fake_score_mode",
    [("sd", "full", "full"), ("sd", "lora", "full"), ("sdxl", "full", "full"), ("sdxl", "lora", "lora")],
)
def test_dmd2_text_to_image_train_export_reload(
    kind, generator_mode, fake_score_mode, teachers, image_folder, tmp_path
):
    _, stock_cls, our_cls = KINDS[kind]
    teacher = teachers[kind]
    lora = generator_mode == "lora"
    cfg = _config(
        teacher, image_folder, tmp_path / "run", generator_mode=generator_mode, fake_score_mode=fake_score_mode
    )
    trainer = DMD2Trainer(cfg)
    spy = Spy(trainer)
    trainer.train()

    # ---- the data and the conditioning are at the generator's size
    assert trainer.sample_shape == (4, SIDE, SIDE)
    assert tuple(trainer.dataset.images.shape[1:]) == trainer.sample_shape  # real latents, VAE-encoded
    if kind == "sdxl":  # time_ids in pixels, not latents
        assert trainer.conditioner.resolution == (2 * SIDE, 2 * SIDE)

    # ---- two iterations, the generator and the GAN in both; backward simulation hit k = 1
    assert [h["step"] for h in trainer.history] == [0, 1]
    for h in trainer.history:
        for key in (
            "loss_dm/generator",
            "loss_gan_g/generator",
            "loss_fake/fake_score+head",
            "loss_gan_d/fake_score+head",
        ):
            assert np.isfinite(h[key]), (key, h)
    assert spy.ks == [trainer.shared_step_index(0), trainer.shared_step_index(1)] == [0, 1]

    # ---- gradients: each group's backward reaches its own networks only
    assert [g for g, _ in spy.events] == [("generator",), ("fake_score", "head")] * 2
    for i in (0, 2):
        gen, fake = spy.events[i][1], spy.events[i + 1][1]
        n_fake, n_head = len(trainer.params["fake_score"]), len(trainer.params["head"])
        assert gen["fake_score"] == (n_fake, 0.0), "the generator loss put gradients on the fake score"
        assert gen["head"] == (n_head, 0.0), "the generator loss put gradients on the GAN head"
        assert gen["generator"][1] > 0
        assert fake["generator"] == gen["generator"], "the fake-score loss changed the generator's gradients"
        assert fake["fake_score"][1] > 0 and fake["head"][1] > 0
        assert gen["teacher"][0] == fake["teacher"][0] == len(spy.teacher_params)

    # ---- weights: generator (its adapter in LoRA mode), fake score and head train; the teacher stays exact
    assert spy.changed("generator") and spy.changed("fake_score") and spy.changed("head")
    on_disk = _base_weights(DiffusionPipeline.from_pretrained(teacher).unet)
    teacher_now = _base_weights(trainer.teacher.net)
    assert teacher_now.keys() == on_disk.keys()
    assert all(torch.equal(teacher_now[k], on_disk[k]) for k in on_disk), "teacher weights changed"
    gen_now = _base_weights(trainer.generator.net)
    if lora:  # the generator's base is the teacher's network: unchanged; its adapter is what trained
        assert trainer.generator.net is trainer.teacher.net
        assert all(torch.equal(gen_now[k], on_disk[k]) for k in on_disk)
        assert all(
            "lora_" in n and ".generator." in n
            for n, p in trainer.generator.net.named_parameters()
            if any(p is q for q in trainer.params["generator"])
        )
    else:
        assert any(not torch.equal(gen_now[k], on_disk[k]) for k in on_disk)
    if fake_score_mode == "full":  # a plain copy of the teacher: no adapter copied from a LoRA generator
        assert not any("lora_" in n for n, _ in trainer.fake.net.named_parameters())

    # ---- export, reload through diffusers, plain call: one UNet call per trained timestep, batch 1 (no CFG)
    folder = trainer.export()
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe) is our_cls and isinstance(pipe.scheduler, LCMScheduler)
    assert list(pipe.config.trained_timesteps) == TIMESTEPS
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(int(args[1] if len(args) > 1 else kwargs["timestep"])) or None,
        with_kwargs=True,
    )
    batches = []
    pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: batches.append((args[0] if args else kwargs["sample"]).shape[0]) or None,
        with_kwargs=True,
    )
    images = pipe("a cat", output_type="np").images
    assert calls == TIMESTEPS and batches == [1, 1]
    assert images.shape == (1, 2 * SIDE, 2 * SIDE, 3) and np.isfinite(images).all()

    # the exported UNet is the trained generator (LoRA fused into it)
    x = torch.randn(1, *trainer.sample_shape, generator=torch.Generator().manual_seed(3))
    cond = trainer.conditioner(["a cat"])
    with torch.no_grad():
        ref = trainer.generator.raw(x, trainer.gen_times[0], cond)
        out = pipe.unet(x, TIMESTEPS[0], **cond.kwargs).sample
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)

    # ---- the model card's stock-diffusers call gives the same image as our pipeline, same seed
    ours = pipe("a photo of a cat", output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    code = _card_block(folder, "With stock diffusers classes only")
    assert f"num_inference_steps={len(TIMESTEPS)}, timesteps={TIMESTEPS}, guidance_scale=0.0" in code
    ns = _run_card(code)
    assert type(ns["pipe"]) is stock_cls
    np.testing.assert_allclose(ns["image"], ours, atol=1e-6, rtol=0)

    # ---- LoRA: lora/ loads with stock load_lora_weights on the ORIGINAL teacher folder and matches the fused unet/
    card = Path(folder, "README.md").read_text()
    if not lora:
        assert not os.path.exists(os.path.join(folder, "lora")) and "load_lora_weights" not in card
        return
    lora_file = os.path.join(folder, "lora", "pytorch_lora_weights.safetensors")
    keys = load_file(lora_file).keys()
    assert keys and all(k.startswith("unet.") and "lora_" in k and "fake_score" not in k for k in keys)
    code = _card_block(folder, "The LoRA on the original teacher")
    assert f'from_pretrained("{teacher}"' in code and f'load_lora_weights("{folder}/lora")' in code
    ns = _run_card(code)
    assert type(ns["pipe"]) is stock_cls and isinstance(ns["pipe"].scheduler, LCMScheduler)
    assert ns["pipe"].get_list_adapters().get("unet"), "load_lora_weights loaded nothing into the UNet"
    np.testing.assert_allclose(ns["image"], ours, atol=1e-4, rtol=0)
    # ... and the LoRA is not a no-op: the teacher alone with the same scheduler gives another image
    bare = stock_cls.from_pretrained(teacher)
    bare.scheduler = LCMScheduler.from_pretrained(folder, subfolder="scheduler")
    bare.set_progress_bar_config(disable=True)
    plain = bare(
        "a photo of a cat",
        num_inference_steps=len(TIMESTEPS),
        timesteps=TIMESTEPS,
        guidance_scale=0.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert np.abs(plain - ours).max() > 1e-3


HUB_SCRIPT = """
import stepdistill, sys
from diffusers import DiffusionPipeline
from stepdistill.config import build_config
from stepdistill.trainers.dmd2 import DMD2Config, DMD2Trainer

out, prompts = sys.argv[1:3]
cfg = dict(output_dir=out, teacher="tiny-org/tiny-sd", dataset=prompts, max_steps=1, dfake_gen_update_ratio=1,
           global_batch=2, checkpoint_every=0, progress=False)
trainer = DMD2Trainer(build_config(DMD2Config, cfg))
trainer.train()
pipe = DiffusionPipeline.from_pretrained(trainer.export())
print("EXPORTED", type(pipe).__name__, pipe("a cat", output_type="np").images.shape)
"""


def test_hub_id_teacher_trains_and_exports(teachers, tmp_path):
    """The real-model recipes name hub ids: everything (teacher, text encoders, VAE, the export's scheduler config
    and pipeline components) must read them through the hub cache, not as local paths. Offline, from a cache
    laid out as huggingface_hub writes it."""
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--tiny-org--tiny-sd"
    rev = "0" * 40
    shutil.copytree(teachers["sd"], repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, str(tmp_path / "run"), str(prompts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "EXPORTED StepDistillSDPipeline (1, 16, 16, 3)" in r.stdout


# --------------------------------------------------------------------------------------------------------
# recipes
# --------------------------------------------------------------------------------------------------------

DMD2_RECIPES = sorted(glob.glob(str(ROOT / "recipes" / "dmd2" / "*.yaml")))


def test_the_expected_dmd2_recipes_exist():
    names = {Path(p).name for p in DMD2_RECIPES}
    assert {"toy2d.yaml", "sd15.yaml", "sdxl_4step.yaml", "sdxl_4step_lora.yaml"} <= names


@pytest.mark.parametrize("recipe", DMD2_RECIPES, ids=lambda p: Path(p).stem)
def test_dmd2_recipes_parse(recipe, tmp_path, monkeypatch):
    # recipes name local teachers relative to the working directory (toy2d: made by recipes/teacher/toy2d.yaml);
    # hub ids need no download to parse
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "teacher_toy2d" / "model").mkdir(parents=True)
    trainer = make_trainer(recipe)
    assert type(trainer) is DMD2Trainer and isinstance(trainer.config, DMD2Config)


def test_dmd2_recipe_values(tmp_path, monkeypatch):
    def cfg(name):
        return make_trainer(str(ROOT / "recipes" / "dmd2" / name)).config

    sd15 = cfg("sd15.yaml")
    assert sd15.teacher == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (sd15.real_guidance_scale, sd15.dfake_gen_update_ratio, sd15.learning_rate) == (1.75, 10, 1e-5)
    assert (sd15.global_batch, sd15.denoising_timesteps, sd15.resolution) == (2048, [999], 64)
    assert (sd15.gan_generator_weight, sd15.weight_decay, sd15.max_grad_norm) == (0.0, 0.01, 10.0)
    assert (sd15.warmup_steps, sd15.mixed_precision) == (500, "bf16")
    xl = cfg("sdxl_4step.yaml")
    assert xl.teacher == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (xl.real_guidance_scale, xl.dfake_gen_update_ratio, xl.learning_rate, xl.global_batch) == (8, 5, 5e-7, 128)
    assert xl.denoising_timesteps == [999, 749, 499, 249] and xl.backward_simulation and xl.resolution == 128
    assert (xl.gan_generator_weight, xl.gan_discriminator_weight) == (5e-3, 1e-2)
    assert (xl.generator_mode, xl.fake_score_mode) == ("full", "full")
    xl_lora = cfg("sdxl_4step_lora.yaml")
    assert (xl_lora.generator_mode, xl_lora.fake_score_mode) == ("lora", "full")
    assert (xl_lora.lora_rank, xl_lora.lora_alpha, xl_lora.learning_rate) == (64, 8.0, 5e-5)
    same = ("teacher", "real_guidance_scale", "dfake_gen_update_ratio", "denoising_timesteps", "gan_generator_weight")
    assert all(getattr(xl, k) == getattr(xl_lora, k) for k in same)
    # the toy recipe needs its teacher first, and says which key is wrong when it is missing
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="teacher: path 'outputs/teacher_toy2d/model'"):
        cfg("toy2d.yaml")


def test_toy2d_teacher_recipe_parses():
    trainer = make_trainer(str(ROOT / "recipes" / "teacher" / "toy2d.yaml"))
    c = trainer.config
    assert isinstance(c, DSMConfig) and c.dataset == "toy2d:gmm8" and c.output_dir == "outputs/teacher_toy2d"
    assert (c.block_out_channels, c.attention_levels) == ([128] * 3, [False] * 3)
    assert (c.max_steps, c.global_batch, c.learning_rate, c.warmup_steps, c.ema_decay) == (1500, 256, 2e-3, 50, 0.99)


# --------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------


def test_gan_with_a_prompt_file_is_refused_through_a_recipe(teachers, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    recipe = tmp_path / "gan.yaml"
    recipe.write_text(
        f"method: dmd2\nteacher: {teachers['sd']}\ndataset: {prompts}\ngan_generator_weight: 0.005\n"
        "denoising_timesteps: [999]\n"
    )
    with pytest.raises(ConfigError, match=r"gan_generator_weight > 0 needs real images.*prompts\.txt"):
        make_trainer(str(recipe))
    # the same recipe without the GAN is fine
    recipe.write_text(recipe.read_text().replace("0.005", "0.0"))
    assert make_trainer(str(recipe)).config.gan_generator_weight == 0.0


def test_text_teacher_with_a_label_dataset_is_refused(teachers, tmp_path):
    trainer = DMD2Trainer(_config(teachers["sd"], "digits", tmp_path, gan_generator_weight=0.0))
    with pytest.raises(ConfigError, match="dataset: 'digits'.*text-conditional"):
        trainer.setup()
