"""Cond utilities, class / text conditioners; text embeddings match the stock diffusers pipelines."""

import os

import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from tiny_models import (
    build_tiny_pipeline,
    save_tiny_pipeline,
    tiny_dit,
    tiny_sd3_components,
    tiny_sd_components,
    tiny_sdxl_components,
    tiny_unet2d,
)

from stepdistill.models.conditioning import ClassConditioner, Cond, TextConditioner, cat_kwargs

PROMPTS = ["the cat", "a red dog and the cat", "the cat"]  # duplicate on purpose
T5_LEN = 24  # shorter than diffusers' default 256 to keep the SD3 tests fast


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _nested_cond(b=5, seed=0):
    g = _gen(seed)
    kwargs = {
        "encoder_hidden_states": torch.randn(b, 3, 4, generator=g, dtype=torch.float64),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(b, 2, generator=g),
            "time_ids": torch.arange(b * 6, dtype=torch.float32).view(b, 6),
        },
        "labels": torch.arange(b),
        "return_dict": False,
    }
    null = {
        "encoder_hidden_states": torch.zeros(b, 3, 4, dtype=torch.float64),
        "added_cond_kwargs": {
            "text_embeds": -torch.ones(b, 2),
            "time_ids": kwargs["added_cond_kwargs"]["time_ids"],
        },
        "labels": torch.full((b,), 99),
        "return_dict": False,
    }
    return Cond(kwargs=kwargs, null=null)


# ------------------------------------------------------------------------------------------------------------
# Cond utilities
# ------------------------------------------------------------------------------------------------------------


def test_cat_kwargs_nested_and_errors():
    c = _nested_cond(3)
    out = cat_kwargs(c.kwargs, c.null)
    assert out["encoder_hidden_states"].shape == (6, 3, 4)
    assert out["added_cond_kwargs"]["text_embeds"].shape == (6, 2)
    assert torch.equal(out["added_cond_kwargs"]["text_embeds"][3:], -torch.ones(3, 2))
    assert torch.equal(out["labels"], torch.tensor([0, 1, 2, 99, 99, 99]))
    assert out["return_dict"] is False
    with pytest.raises(ValueError, match="return_dict"):
        cat_kwargs({"return_dict": False}, {"return_dict": True})
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        cat_kwargs({"added_cond_kwargs": {"a": torch.zeros(1)}}, {"added_cond_kwargs": {"b": torch.zeros(1)}})
    with pytest.raises(TypeError, match="x"):
        cat_kwargs({"x": torch.zeros(1)}, {"x": 1})


def test_with_cfg_batch_order_and_missing_null():
    c = _nested_cond(4)
    both = c.with_cfg_batch()
    assert len(c) == 4
    assert torch.equal(both["encoder_hidden_states"][:4], c.kwargs["encoder_hidden_states"])
    assert torch.equal(both["encoder_hidden_states"][4:], c.null["encoder_hidden_states"])
    assert torch.equal(both["labels"], torch.tensor([0, 1, 2, 3, 99, 99, 99, 99]))
    no_null = Cond(kwargs={"class_labels": torch.arange(2)})
    with pytest.raises(ValueError, match="no unconditional branch"):
        no_null.with_cfg_batch()
    with pytest.raises(ValueError, match="no unconditional branch"):
        no_null.drop(0.5)
    assert no_null.drop(0.0) is no_null


def test_index_repeat_to():
    c = _nested_cond(5)
    s = c.index(slice(1, 3))
    assert len(s) == 2 and torch.equal(s.kwargs["labels"], torch.tensor([1, 2]))
    assert torch.equal(s.null["labels"], torch.tensor([99, 99]))
    t = c.index(torch.tensor([4, 0]))
    assert torch.equal(t.kwargs["added_cond_kwargs"]["time_ids"][0], c.kwargs["added_cond_kwargs"]["time_ids"][4])
    m = c.index(torch.tensor([True, False, True, False, False]))
    assert torch.equal(m.kwargs["labels"], torch.tensor([0, 2]))
    one = c.index(3)  # int keeps the batch dim
    assert len(one) == 1 and one.kwargs["encoder_hidden_states"].shape == (1, 3, 4)
    r = c.index(slice(0, 2)).repeat(3)
    assert len(r) == 6 and torch.equal(r.kwargs["labels"], torch.tensor([0, 0, 0, 1, 1, 1]))
    assert r.null["added_cond_kwargs"]["text_embeds"].shape == (6, 2)
    with pytest.raises(ValueError, match="repeat"):
        c.repeat(0)
    moved = c.to("cpu", torch.float16)
    assert moved.kwargs["encoder_hidden_states"].dtype == torch.float16
    assert moved.null["added_cond_kwargs"]["text_embeds"].dtype == torch.float16
    assert moved.kwargs["labels"].dtype == torch.int64 and moved.kwargs["return_dict"] is False
    assert c.kwargs["encoder_hidden_states"].dtype == torch.float64  # not in place
    with pytest.raises(ValueError, match="dtype"):
        c.to(dtype=torch.int32)


def test_drop_fraction_rows_and_determinism():
    n = 4000
    g = _gen(1)
    c = Cond(
        kwargs={
            "e": torch.randn(n, 2, 3, generator=g),
            "added": {"p": torch.randn(n, 4, generator=g)},
            "class_labels": torch.randint(0, 10, (n,), generator=g),
        },
        null={
            "e": torch.zeros(n, 2, 3),
            "added": {"p": torch.full((n, 4), 7.0)},
            "class_labels": torch.full((n,), 10),
        },
    )
    d = c.drop(0.3, generator=_gen(123))
    dropped = d.kwargs["class_labels"] == 10
    assert abs(dropped.float().mean().item() - 0.3) < 0.03
    # dropped rows are null rows in every key, kept rows unchanged
    assert torch.equal(d.kwargs["e"][dropped], c.null["e"][dropped])
    assert torch.equal(d.kwargs["added"]["p"][dropped], c.null["added"]["p"][dropped])
    assert torch.equal(d.kwargs["e"][~dropped], c.kwargs["e"][~dropped])
    assert torch.equal(d.kwargs["added"]["p"][~dropped], c.kwargs["added"]["p"][~dropped])
    assert torch.equal(d.kwargs["class_labels"][~dropped], c.kwargs["class_labels"][~dropped])
    assert d.null is c.null
    again = c.drop(0.3, generator=_gen(123))
    assert torch.equal(again.kwargs["class_labels"], d.kwargs["class_labels"])
    assert c.drop(0.0) is c
    assert torch.equal(c.drop(1.0).kwargs["e"], c.null["e"])
    with pytest.raises(ValueError, match="probability"):
        c.drop(1.5)


def test_cond_none():
    c = Cond.none(3)
    assert len(c) == 3 and c.kwargs == {} and c.null == {}
    assert c.with_cfg_batch() == {}
    assert len(c.index(slice(0, 2))) == 2 and len(c.repeat(2)) == 6 and len(c.drop(0.5)) == 3
    assert len(c.to("cpu", torch.float16)) == 3
    with pytest.raises(ValueError, match="batch_size"):
        Cond.none(-1)


# ------------------------------------------------------------------------------------------------------------
# class conditioning
# ------------------------------------------------------------------------------------------------------------


def test_class_conditioner_basic_and_errors():
    cc = ClassConditioner(10)
    c = cc(torch.tensor([0, 3, 9]))
    assert torch.equal(c.kwargs["class_labels"], torch.tensor([0, 3, 9]))
    assert torch.equal(c.null["class_labels"], torch.tensor([10, 10, 10]))
    assert ClassConditioner(10, null_class=12)([1]).null["class_labels"].tolist() == [12]
    with pytest.raises(ValueError, match="10"):
        cc(torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="-1"):
        cc([-1])
    with pytest.raises(ValueError, match="integer"):
        cc(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="null_class"):
        ClassConditioner(10, null_class=3)
    with pytest.raises(ValueError, match="num_classes"):
        ClassConditioner(0)


def test_class_conditioner_for_unet2d_forward():
    unet = tiny_unet2d(class_conditional=True, num_class_embeds=11).double()  # batch 4 vs 2: no BLAS-path noise
    cc = ClassConditioner.for_unet2d(unet, num_classes=10)
    assert cc.null_class == 10
    cond = cc(torch.tensor([2, 7]))
    x = torch.randn(2, 3, 8, 8, generator=_gen(), dtype=torch.float64)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        out = unet(x, t, **cond.kwargs).sample
        both = unet(torch.cat([x, x]), torch.cat([t, t]), **cond.with_cfg_batch()).sample
    assert out.shape == x.shape and both.shape == (4, 3, 8, 8)
    torch.testing.assert_close(both[:2], out, atol=1e-10, rtol=0)

    assert ClassConditioner.for_unet2d(unet).null_class == 10  # default: the last row is the null class
    no_null = ClassConditioner.for_unet2d(unet, num_classes=11)  # all 11 rows are real classes
    assert no_null.null_class is None and no_null.num_classes == 11
    c2 = no_null(torch.tensor([10]))
    assert c2.null is None
    with pytest.raises(ValueError, match="no unconditional branch.*null"):
        c2.with_cfg_batch()
    with pytest.raises(ValueError, match="not label-conditional"):
        ClassConditioner.for_unet2d(tiny_unet2d(class_conditional=False))
    with pytest.raises(ValueError, match="num_classes=12"):
        ClassConditioner.for_unet2d(unet, num_classes=12)


def test_class_conditioner_for_dit_forward():
    dit = tiny_dit(num_classes=4).eval()  # eval: in train mode DiT itself drops labels at random
    cc = ClassConditioner.for_dit(dit)
    assert cc.num_classes == 4 and cc.null_class == 4
    cond = cc(torch.tensor([0, 3]))
    x = torch.randn(2, 4, 8, 8, generator=_gen())
    t = torch.tensor([1, 999])
    with torch.no_grad():
        out = dit(torch.cat([x, x]), torch.cat([t, t]), **cond.with_cfg_batch()).sample
    assert out.shape == (4, 8, 8, 8)
    with pytest.raises(ValueError, match="outside"):
        cc([4])


# ------------------------------------------------------------------------------------------------------------
# text conditioning
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    comps = tiny_sd_components(tmp_path_factory.mktemp("sd"))
    return comps, build_tiny_pipeline(comps, StableDiffusionPipeline)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    comps = tiny_sdxl_components(tmp_path_factory.mktemp("sdxl"))
    return comps, build_tiny_pipeline(comps, StableDiffusionXLPipeline)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    comps = tiny_sd3_components(tmp_path_factory.mktemp("sd3"), with_t5=False)
    return comps, build_tiny_pipeline(comps, StableDiffusion3Pipeline)


@pytest.fixture(scope="module")
def sd3_t5(tmp_path_factory):
    comps = tiny_sd3_components(tmp_path_factory.mktemp("sd3_t5"), with_t5=True)
    return comps, build_tiny_pipeline(comps, StableDiffusion3Pipeline)


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _count_encoder_calls(encoders):
    calls = []
    handles = [
        enc.register_forward_hook(
            lambda mod, args, kwargs, out, i=i: calls.append((i, args[0].shape[0])), with_kwargs=True
        )
        for i, enc in enumerate(encoders)
        if enc is not None
    ]
    return calls, handles


def test_sd_text_matches_pipeline_and_runs_unet(sd):
    comps, pipe = sd
    tc = TextConditioner("sd", [comps["tokenizer"]], [comps["text_encoder"]])
    cond = tc(PROMPTS)
    pe, ne = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    assert len(cond) == 3 and cond.kwargs["encoder_hidden_states"].shape == (3, 16, 32)
    _close(cond.kwargs["encoder_hidden_states"], pe)
    _close(cond.null["encoder_hidden_states"], ne)
    assert not cond.kwargs["encoder_hidden_states"].requires_grad
    assert not any(p.requires_grad for p in comps["text_encoder"].parameters())

    unet = comps["unet"]
    x = torch.randn(3, 4, 8, 8, generator=_gen())
    t = torch.tensor([1, 500, 999])
    with torch.no_grad():
        out = unet(x, t, **cond.kwargs).sample
        both = unet(torch.cat([x, x]), torch.cat([t, t]), **cond.with_cfg_batch()).sample
    assert out.shape == x.shape
    _close(both[:3], out)


def test_sdxl_text_matches_pipeline_and_runs_unet(sdxl):
    comps, pipe = sdxl
    tc = TextConditioner(
        "sdxl",
        [comps["tokenizer"], comps["tokenizer_2"]],
        [comps["text_encoder"], comps["text_encoder_2"]],
        resolution=(16, 24),
    )
    cond = tc(PROMPTS)
    pe, ne, ppe, nppe = pipe.encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    assert cond.kwargs["encoder_hidden_states"].shape == (3, 16, 64)
    _close(cond.kwargs["encoder_hidden_states"], pe)
    _close(cond.kwargs["added_cond_kwargs"]["text_embeds"], ppe)
    _close(cond.null["encoder_hidden_states"], ne)
    _close(cond.null["added_cond_kwargs"]["text_embeds"], nppe)
    assert not cond.null["encoder_hidden_states"].any()  # force_zeros_for_empty_prompt
    time_ids = pipe._get_add_time_ids(
        (16, 24),
        (0, 0),
        (16, 24),
        dtype=pe.dtype,
        text_encoder_projection_dim=comps["text_encoder_2"].config.projection_dim,
    )
    assert torch.equal(cond.kwargs["added_cond_kwargs"]["time_ids"], time_ids.repeat(3, 1))
    assert torch.equal(cond.null["added_cond_kwargs"]["time_ids"], time_ids.repeat(3, 1))

    unet = comps["unet"]
    x = torch.randn(3, 4, 8, 8, generator=_gen())
    t = torch.tensor([1, 500, 999])
    with torch.no_grad():
        out = unet(x, t, **cond.kwargs).sample
        both = unet(torch.cat([x, x]), torch.cat([t, t]), **cond.with_cfg_batch()).sample
    assert out.shape == x.shape
    _close(both[:3], out)
    with pytest.raises(ValueError, match="resolution"):
        TextConditioner(
            "sdxl",
            [comps["tokenizer"], comps["tokenizer_2"]],
            [comps["text_encoder"], comps["text_encoder_2"]],
        )


@pytest.mark.parametrize("which", ["sd3", "sd3_t5"])
def test_sd3_text_matches_pipeline_and_runs_transformer(which, request):
    comps, pipe = request.getfixturevalue(which)
    te3 = comps["text_encoder_3"]
    tc = TextConditioner(
        "sd3",
        [comps["tokenizer"], comps["tokenizer_2"], comps["tokenizer_3"]],
        [comps["text_encoder"], comps["text_encoder_2"], te3],
        max_sequence_length=T5_LEN,
        joint_attention_dim=comps["transformer"].config.joint_attention_dim,
    )
    cond = tc(PROMPTS)
    pe, ne, ppe, nppe = pipe.encode_prompt(
        PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True, max_sequence_length=T5_LEN
    )
    assert cond.kwargs["encoder_hidden_states"].shape == (3, 16 + T5_LEN, 96)
    assert cond.kwargs["pooled_projections"].shape == (3, 64)
    _close(cond.kwargs["encoder_hidden_states"], pe)
    _close(cond.kwargs["pooled_projections"], ppe)
    _close(cond.null["encoder_hidden_states"], ne)
    _close(cond.null["pooled_projections"], nppe)
    # CLIP part zero-padded from 64 to the T5 width; T5 part zero when there is no T5
    assert not cond.kwargs["encoder_hidden_states"][:, :16, 64:].any()
    assert cond.kwargs["encoder_hidden_states"][:, 16:].any() == (te3 is not None)
    assert cond.null["pooled_projections"].any()  # SD3 null = embeddings of "", not zeros

    tr = comps["transformer"]
    x = torch.randn(3, 4, 8, 8, generator=_gen())
    t = torch.tensor([1.0, 500.0, 999.0])
    with torch.no_grad():
        out = tr(hidden_states=x, timestep=t, **cond.kwargs).sample
        both = tr(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]), **cond.with_cfg_batch()).sample
    assert out.shape == x.shape
    _close(both[:3], out)


def test_sd3_without_t5_needs_joint_attention_dim(tmp_path):
    comps = tiny_sd3_components(tmp_path)
    with pytest.raises(ValueError, match="joint_attention_dim"):
        TextConditioner(
            "sd3",
            [comps["tokenizer"], comps["tokenizer_2"]],
            [comps["text_encoder"], comps["text_encoder_2"]],
        )
    tc = TextConditioner(
        "sd3",
        [comps["tokenizer"], comps["tokenizer_2"]],
        [comps["text_encoder"], comps["text_encoder_2"]],
        joint_attention_dim=96,
    )
    assert tc(["a"]).kwargs["encoder_hidden_states"].shape == (1, 16 + 256, 96)  # diffusers' default length


def test_text_encoders_run_once_per_prompt(sdxl, sd):
    comps, _ = sd
    tc = TextConditioner("sd", [comps["tokenizer"]], [comps["text_encoder"]])
    calls, handles = _count_encoder_calls([comps["text_encoder"]])
    try:
        first = tc(PROMPTS)
        assert sorted(n for _, n in calls) == [1, 2]  # 2 distinct prompts in one batch + the null prompt
        second = tc(list(reversed(PROMPTS)))
        tc(PROMPTS)
        assert len(calls) == 2  # everything cached
        _close(second.kwargs["encoder_hidden_states"], first.kwargs["encoder_hidden_states"].flip(0))
        tc(["the cat", "a dog"])
        assert calls[-1] == (0, 1)  # only the new prompt
    finally:
        for h in handles:
            h.remove()

    comps, _ = sdxl
    encs = [comps["text_encoder"], comps["text_encoder_2"]]
    tc = TextConditioner("sdxl", [comps["tokenizer"], comps["tokenizer_2"]], encs, resolution=16)
    calls, handles = _count_encoder_calls(encs)
    try:
        for _ in range(3):
            tc(PROMPTS)
        assert sorted(calls) == [(0, 2), (1, 2)]  # SDXL null is zeros: no encoder run for ""
    finally:
        for h in handles:
            h.remove()

    uncached = TextConditioner("sd", [sd[0]["tokenizer"]], [sd[0]["text_encoder"]], cache_size=0)
    calls, handles = _count_encoder_calls([sd[0]["text_encoder"]])
    try:
        uncached(PROMPTS)
        uncached(PROMPTS)
        assert len(calls) == 3  # null once, prompts every time
    finally:
        for h in handles:
            h.remove()


def test_text_bad_input(sd):
    comps, _ = sd
    tc = TextConditioner("sd", [comps["tokenizer"]], [comps["text_encoder"]])
    with pytest.raises(ValueError, match="empty prompt list"):
        tc([])
    with pytest.raises(TypeError, match="strings"):
        tc(["ok", 3])
    with pytest.raises(ValueError, match="kind"):
        TextConditioner("sd2", [comps["tokenizer"]], [comps["text_encoder"]])
    with pytest.raises(ValueError, match="text encoders"):
        TextConditioner("sdxl", [comps["tokenizer"]], [comps["text_encoder"]], resolution=16)
    assert len(tc("a single prompt")) == 1


@pytest.mark.parametrize("which", ["sd", "sdxl", "sd3", "sd3_t5"])
def test_from_pretrained_local_folder(which, tmp_path, request):
    comps, pipe = request.getfixturevalue(which)
    kind = which.split("_")[0]
    cls = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline}[kind]
    path = save_tiny_pipeline(comps, cls, tmp_path / "pipe")
    tc = TextConditioner.from_pretrained(path, max_sequence_length=T5_LEN)
    assert tc.kind == kind
    cond = tc(PROMPTS)
    if kind == "sd":
        pe, ne = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    elif kind == "sdxl":
        assert tc.resolution == (16, 16)  # unet sample_size 8 * vae factor 2, the pipeline's default size
        pe, ne, ppe, nppe = pipe.encode_prompt(PROMPTS, device="cpu")
        _close(cond.kwargs["added_cond_kwargs"]["text_embeds"], ppe)
    else:
        assert (tc.text_encoders[2] is None) == (comps["text_encoder_3"] is None)
        pe, ne, ppe, nppe = pipe.encode_prompt(PROMPTS, None, None, device="cpu", max_sequence_length=T5_LEN)
        _close(cond.kwargs["pooled_projections"], ppe)
        _close(cond.null["pooled_projections"], nppe)
    _close(cond.kwargs["encoder_hidden_states"], pe)
    _close(cond.null["encoder_hidden_states"], ne)
    assert TextConditioner.from_pretrained(path, kind=kind, resolution=32).kind == kind


def test_from_pretrained_missing_path(tmp_path):
    missing = tmp_path / "no_such_pipeline"
    with pytest.raises(FileNotFoundError, match="no_such_pipeline"):
        TextConditioner.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="does/not/exist"):
        TextConditioner.from_pretrained("./does/not/exist")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        TextConditioner.from_pretrained(tmp_path)  # exists but is not a pipeline folder
    with pytest.raises(FileNotFoundError, match="stepdistill-test/definitely-absent"):
        TextConditioner.from_pretrained("stepdistill-test/definitely-absent", local_files_only=True)


# ------------------------------------------------------------------------------------------------------------
# the tiny components themselves: the stock pipelines run on them
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["sd", "sdxl", "sd3", "sd3_t5"])
def test_stock_pipelines_run_on_tiny_components(which, request):
    _, pipe = request.getfixturevalue(which)
    kwargs = {"max_sequence_length": T5_LEN} if which.startswith("sd3") else {}
    images = pipe(
        ["the cat", "a dog"],
        num_inference_steps=2,
        height=16,
        width=16,
        guidance_scale=3.0,
        output_type="pt",
        generator=_gen(),
        **kwargs,
    ).images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_tiny_pipeline_reloads_with_diffusers(sd, tmp_path):
    comps, _ = sd
    path = save_tiny_pipeline(comps, StableDiffusionPipeline, tmp_path / "sd")
    assert os.path.isfile(os.path.join(path, "model_index.json"))
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    assert pipe.tokenizer.model_max_length == 16 and pipe.unet.config.cross_attention_dim == 32
