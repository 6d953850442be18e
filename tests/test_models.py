"""Teacher / FakeScore / Generator wrappers agree with diffusers and with hand-combined forwards."""

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler
from tiny_models import tiny_dit, tiny_sd3_transformer, tiny_sd_unet, tiny_sdxl_unet, tiny_unet2d

from stepdistill.guidance import cfg_combine
from stepdistill.models import Cond, FakeScore, Generator, Teacher
from stepdistill.models.adapters import adapters_disabled, add_lora, lora_state_dict, merge_lora
from stepdistill.models.conditioning import ClassConditioner
from stepdistill.sampling import sample
from stepdistill.schedules import EDMSchedule, FlowSchedule, VPSchedule, from_diffusers


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0] if i else None))
    return calls


@pytest.mark.parametrize("spacing,pred", [("leading", "epsilon"), ("trailing", "v_prediction")])
def test_teacher_ddim_reproduces_ddim_pipeline(spacing, pred):
    unet = tiny_unet2d(class_conditional=False)
    sched = DDIMScheduler(clip_sample=False, timestep_spacing=spacing, prediction_type=pred)
    pipe = DDIMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=10, eta=0.0, output_type="np"
    ).images
    teacher = Teacher(unet, from_diffusers(sched), pred)
    noise = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    x = sample(lambda x, t: teacher.raw(x, t), teacher.schedule, noise, 10, spacing=spacing, pred_type=pred)
    got = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_cfg_is_one_batched_forward_equal_to_two_forwards():
    # float64 network: a float32 forward of a batch of 6 and two of 3 take different BLAS paths and differ by
    # ~1e-6, which x0 at t=0.9 amplifies past any fixed tolerance on a loaded machine; in float64 the batched
    # forward equals the two forwards to ~1e-13, so the comparison checks the CFG plumbing, not the BLAS
    unet = tiny_unet2d(class_conditional=True, num_class_embeds=11).double()
    schedule = VPSchedule.from_config({})
    teacher = Teacher(unet, schedule, "epsilon")
    cond = ClassConditioner(10)(torch.tensor([1, 7, 3]))
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    calls = count_calls(unet)
    got = teacher.predict(x, t, cond, target="x0", guidance_scale=3.0)
    assert calls == [6], "cond and uncond must run as ONE forward of the doubled batch"
    ts = schedule.t_to_timestep(t).float()
    with torch.no_grad():
        out_c = unet(x, ts, class_labels=torch.tensor([1, 7, 3])).sample
        out_u = unet(x, ts, class_labels=torch.full((3,), 10)).sample
    eps = out_u + 3.0 * (out_c - out_u)
    x0 = schedule.convert(eps, x, t, "eps", "x0")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, x0, atol=1e-10, rtol=0)
    # guidance 1 in the uncond+w convention is the plain conditional output, one forward of B rows
    calls.clear()
    torch.testing.assert_close(teacher.predict(x, t, cond, target="eps", guidance_scale=1.0), out_c, atol=1e-10, rtol=0)
    assert calls == [3]


def test_cfg_conventions_differ_by_one():
    c, u = torch.randn(4), torch.randn(4)
    torch.testing.assert_close(cfg_combine(c, u, 2.0, "cond+w"), cfg_combine(c, u, 3.0, "uncond+w"))
    with pytest.raises(ValueError, match="finite"):
        cfg_combine(c, u, float("nan"))


def test_sd_and_sdxl_unets_through_wrapper():
    sched = VPSchedule.from_config(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([0.3, 0.6], dtype=torch.float64)
    # SD1.5-style
    unet = tiny_sd_unet()
    emb, null = torch.randn(2, 5, 32), torch.zeros(2, 5, 32)
    cond = Cond({"encoder_hidden_states": emb}, {"encoder_hidden_states": null})
    teacher = Teacher(unet, sched, "epsilon")
    with torch.no_grad():
        ref_c = unet(x, sched.t_to_timestep(t).float(), encoder_hidden_states=emb).sample
        ref_u = unet(x, sched.t_to_timestep(t).float(), encoder_hidden_states=null).sample
    torch.testing.assert_close(teacher.predict(x, t, cond, target="eps"), ref_c, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        teacher.predict(x, t, cond, target="eps", guidance_scale=5.0), ref_u + 5 * (ref_c - ref_u), atol=1e-4, rtol=0
    )
    # SDXL-style: added_cond_kwargs nest one level and are batched for CFG too
    unet = tiny_sdxl_unet()
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]] * 2)}
    null_added = {"text_embeds": torch.zeros(2, 32), "time_ids": added["time_ids"]}
    cond = Cond(
        {"encoder_hidden_states": torch.randn(2, 5, 64), "added_cond_kwargs": added},
        {"encoder_hidden_states": torch.zeros(2, 5, 64), "added_cond_kwargs": null_added},
    )
    teacher = Teacher(unet, sched, "v_prediction")
    calls = count_calls(unet)
    out = teacher.predict(x, t, cond, target="x0", guidance_scale=2.0)
    assert out.shape == x.shape and calls == [4]


def test_dit_learned_sigma_and_sd3_flow_through_wrapper():
    dit = tiny_dit(num_classes=4)
    sched = VPSchedule.from_config({})
    teacher = Teacher(dit, sched, "epsilon")
    cond = ClassConditioner.for_dit(dit)(torch.tensor([0, 3]))
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([0.5, 0.5], dtype=torch.float64)
    out = teacher.predict(x, t, cond, target="eps", guidance_scale=4.0)
    with torch.no_grad():
        full = dit(
            torch.cat([x, x]),
            timestep=sched.t_to_timestep(torch.cat([t, t])).float(),
            class_labels=torch.tensor([0, 3, 4, 4]),
        ).sample
    c, u = full[:2, :4], full[2:, :4]  # first half of the channels: the eps mean; second: learned variance
    torch.testing.assert_close(out, u + 4 * (c - u), atol=1e-5, rtol=0)

    sd3 = tiny_sd3_transformer()
    flow = FlowSchedule(shift=3.0)
    teacher = Teacher(sd3, flow, "flow")
    kw = {"encoder_hidden_states": torch.randn(2, 6, 96), "pooled_projections": torch.randn(2, 64)}
    with torch.no_grad():
        v = sd3(hidden_states=x, timestep=flow.t_to_timestep(t).float(), **kw).sample
    x0 = teacher.predict(x, t, Cond(kw), target="x0")
    torch.testing.assert_close(x0, x - 0.5 * v, atol=1e-5, rtol=0)  # x0 = x_t - t * u


def test_plain_callable_with_declared_schedule():
    def model(x, timestep, cond):  # an "EDM-style" callable: output F with x0 = c_skip x + c_out F
        return 0.1 * x + cond[:, None, None, None] * torch.ones_like(x) + 0.0 * timestep[:, None, None, None]

    edm = EDMSchedule()
    teacher = Teacher(model, edm, "edm")
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    c_skip, c_out, c_in = edm.scalings(t)
    y = torch.tensor([1.0, -1.0], dtype=torch.float64)
    F = model(x * c_in[:, None, None, None], 0.25 * torch.log(edm.sigma(t)), y)
    expect = c_skip[:, None, None, None] * x + c_out[:, None, None, None] * F
    torch.testing.assert_close(teacher.predict(x, t, Cond({"cond": y}), target="x0"), expect)
    with pytest.raises(ValueError, match="unexpected condition keys"):
        teacher.predict(x, t, Cond({"class_labels": y}))


def test_teacher_is_frozen_and_stays_in_eval():
    unet = tiny_unet2d()
    teacher = Teacher(unet, VPSchedule.from_config({}), "epsilon")
    assert not any(p.requires_grad for p in unet.parameters())
    teacher.train()
    assert not unet.training
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = teacher.predict(x, 0.5, ClassConditioner(10)(torch.tensor([1, 2])))
    assert not out.requires_grad, "teacher predictions carry no graph"


def test_lora_adapters_off_equals_bare_teacher_exactly():
    bare = tiny_unet2d().eval()  # compare in the same mode: eval and train pick different CPU kernels
    unet = tiny_unet2d()  # same seed -> same weights
    schedule = VPSchedule.from_config({})
    teacher = Teacher(unet, schedule, "epsilon")
    fake = FakeScore.from_teacher(teacher, mode="lora", lora_rank=4)
    # give the adapter non-zero weights so that "on" and "off" really differ
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    assert teacher.shares_base
    assert all(p.requires_grad == ("lora_" in n) for n, p in unet.named_parameters())
    x = torch.randn(2, 3, 8, 8)
    cond = ClassConditioner(10)(torch.tensor([4, 5]))
    t = torch.tensor([0.4, 0.7], dtype=torch.float64)
    with torch.no_grad():
        ref = bare(x, schedule.t_to_timestep(t).float(), class_labels=torch.tensor([4, 5])).sample
    unet.train()  # the fake score trains; the teacher view must still run in eval mode
    assert torch.equal(teacher.raw(x, t, cond), ref)
    assert unet.training, "the teacher call restores the shared network's mode"
    assert not torch.equal(fake.raw(x, t, cond), ref)
    assert all(p.requires_grad == ("lora_" in n) for n, p in unet.named_parameters()), "grad flags restored"
    # freezing the adapter for a phase survives a teacher call
    for p in unet.parameters():
        p.requires_grad_(False)
    teacher.raw(x, t, cond)
    assert not any(p.requires_grad for p in unet.parameters())
    # adapter weights: state dict keys, and merging folds them into a plain network with the same output
    assert lora_state_dict(unet, "fake_score")
    with torch.no_grad():
        with_lora = fake.raw(x, t, cond)
    merged = merge_lora(unet, "fake_score")
    with torch.no_grad():
        torch.testing.assert_close(
            merged(x, schedule.t_to_timestep(t).float(), class_labels=torch.tensor([4, 5])).sample,
            with_lora,
            atol=1e-5,
            rtol=1e-5,
        )


def test_fake_score_training_never_moves_the_teacher():
    unet = tiny_unet2d()
    schedule = VPSchedule.from_config({})
    teacher = Teacher(unet, schedule, "epsilon")
    before = [(n, p, p.detach().clone()) for n, p in unet.named_parameters()]  # LoRA wraps these same tensors
    for mode in ("full", "lora"):
        fake = FakeScore.from_teacher(teacher, mode=mode, lora_rank=4, adapter_name=f"fs_{mode}")
        opt = torch.optim.SGD(fake.trainable_parameters(), lr=0.1)
        x0 = torch.randn(4, 3, 8, 8)
        cond = ClassConditioner(10)(torch.tensor([0, 1, 2, 3]))
        loss = fake.dsm_loss(x0, cond)
        loss.backward()
        opt.step()
    assert any("lora_" in n and p.grad is not None for n, p in unet.named_parameters())
    for n, p, v in before:
        assert torch.equal(p, v) and p.grad is None, f"teacher weight {n} changed or got a gradient"


def test_generator_full_copy_and_few_step_sampling_counts_calls():
    unet = tiny_unet2d()
    schedule = VPSchedule.from_config({})
    teacher = Teacher(unet, schedule, "epsilon")
    gen = Generator.from_teacher(teacher, timesteps=torch.tensor([999, 499]) / 999)
    assert gen.net is not unet and all(p.requires_grad for p in gen.net.parameters())
    calls = count_calls(gen.net)
    cond = ClassConditioner(10)(torch.tensor([1, 2]))
    out = gen.sample(torch.randn(2, 3, 8, 8), cond, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 8, 8) and len(calls) == 2
    x0 = gen(torch.randn(2, 3, 8, 8), cond)
    assert x0.requires_grad
    with pytest.raises(ValueError, match="decreasing"):
        Generator.from_teacher(teacher, timesteps=[0.2, 0.5])


def test_generator_and_fake_score_as_two_lora_adapters_on_one_base():
    unet = tiny_unet2d()
    schedule = VPSchedule.from_config({})
    teacher = Teacher(unet, schedule, "epsilon")
    gen = Generator.from_teacher(teacher, mode="lora", lora_rank=4)
    fake = FakeScore.from_teacher(teacher, mode="lora", lora_rank=4)
    # adding the second adapter must not freeze the first (peft's set_adapter would)
    assert all(p.requires_grad for n, p in unet.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 0.5], dtype=torch.float64)
    cond = ClassConditioner(10)(torch.tensor([1, 2]))
    with torch.no_grad():
        a, b, c = gen.raw(x, t, cond), fake.raw(x, t, cond), teacher.raw(x, t, cond)
        with adapters_disabled(unet):
            ref = unet(x, schedule.t_to_timestep(t).float(), class_labels=torch.tensor([1, 2])).sample
    assert torch.equal(c, ref)
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    with pytest.raises(ValueError, match="already exists"):
        add_lora(unet, 4, adapter_name="generator")
    with pytest.raises(ValueError, match="also carries"):
        merge_lora(unet, "generator")


def test_from_pretrained_local_folder_and_bad_paths(tmp_path):
    unet = tiny_unet2d()
    unet.save_pretrained(tmp_path / "m" / "unet")
    DDIMScheduler(prediction_type="v_prediction").save_pretrained(tmp_path / "m" / "scheduler")
    teacher = Teacher.from_pretrained(str(tmp_path / "m"))
    assert teacher.prediction_type == "v" and isinstance(teacher.schedule, VPSchedule)
    for a, b in zip(unet.parameters(), teacher.net.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        Teacher.from_pretrained(str(tmp_path / "does_not_exist"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Teacher.from_pretrained(str(tmp_path / "empty"))


def test_teacher_prediction_with_input_gradient_leaves_weights_frozen():
    unet = tiny_unet2d()
    teacher = Teacher(unet, VPSchedule.from_config({}), "v_prediction")
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    cond = ClassConditioner(10)(torch.tensor([1, 2]))
    out = teacher.predict_with_input_grad(x, torch.tensor([0.3, 0.6]), cond, guidance_scale=2.0)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.abs().sum() > 0 and all(p.grad is None and not p.requires_grad for p in unet.parameters())
    torch.testing.assert_close(out.detach(), teacher.predict(x, torch.tensor([0.3, 0.6]), cond, guidance_scale=2.0))
