"""The one model contract: a network + a schedule + its prediction type.

``Denoiser.predict(x_t, t, cond, target="x0", guidance_scale=w)`` is how every trainer and sampler talks
to a network. It hides three things: how each network class is called (UNet2DModel with class labels,
UNet2DConditionModel with text / SDXL added conditions, DiT with learned sigma, SD3's transformer, or a
plain callable ``model(x_t, timestep, cond)``), what time input it expects (from the schedule), and which
parameterisation it outputs (converted by the schedule). CFG runs cond and uncond in ONE batched forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..guidance import CFG_COND, CFG_UNCOND, cfg_combine, guidance_scale_embedding, to_convention
from ..schedules import NoiseSchedule
from ..trainers import randomness as rnd
from .conditioning import Cond

_UNET_CLASSES = (
    "UNet2DModel",
    "UNet2DConditionModel",
    "GuidedUNet2DModel",
    "RoutedUNet2DModel",
    "RoutedUNet2DConditionModel",
)
_DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
_SD3_CLASSES = ("SD3Transformer2DModel",)
SUPPORTED_NETWORKS = _UNET_CLASSES + _DIT_CLASSES + _SD3_CLASSES


def _unwrap(net):
    """The module under DDP / FSDP / torch.compile wrappers."""
    while True:
        inner = getattr(net, "module", None) or getattr(net, "_orig_mod", None)
        if inner is None or not isinstance(inner, nn.Module):
            return net
        net = inner


def _output(out):
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def network_call(net) -> Callable:
    """Return ``call(net, x_in, time, kwargs) -> raw output`` for the network's class."""
    name = type(_unwrap(net)).__name__
    if name in _UNET_CLASSES:
        return lambda m, x, time, kw: _output(m(x, time, **kw))
    if name in _DIT_CLASSES:
        inner = _unwrap(net)
        in_ch, out_ch = inner.config.in_channels, inner.config.out_channels

        def call_dit(m, x, time, kw):
            out = _output(m(x, timestep=time, **kw))
            if out_ch == 2 * in_ch:  # learned sigma (DiT): the first half is the mean prediction
                out = out[:, :in_ch]
            return out

        return call_dit
    if name in _SD3_CLASSES:
        return lambda m, x, time, kw: _output(m(hidden_states=x, timestep=time, **kw))
    if name.endswith(("Model", "Transformer2DModel")) and hasattr(net, "config") and hasattr(net, "save_pretrained"):
        raise ValueError(
            f"unsupported diffusers network class {name!r}; supported: {', '.join(SUPPORTED_NETWORKS)}"
            " or a plain callable model(x_t, timestep, cond)"
        )

    def call_plain(m, x, time, kw):
        extra = set(kw) - {"cond", "timestep_cond"}
        if extra:
            raise ValueError(
                f"plain callables take model(x_t, timestep, cond); unexpected condition keys {sorted(extra)}"
            )
        if "timestep_cond" in kw:  # a second time / guidance input (ToyMLP with time_cond_proj_dim)
            return _output(m(x, time, kw.get("cond"), timestep_cond=kw["timestep_cond"]))
        return _output(m(x, time, kw.get("cond")))

    return call_plain


class Denoiser(nn.Module):
    """A network with its schedule and prediction type.

    Args:
        net: the network (a diffusers model or any callable ``model(x_t, timestep, cond)``), possibly wrapped
            by accelerate (DDP/FSDP); wrappers go around the prepared module, never the other way round.
        schedule: the :class:`~stepdistill.schedules.NoiseSchedule` the network was trained with.
        prediction_type: what the network outputs (``eps``/``epsilon``, ``x0``/``sample``, ``v``, ``flow``, ``edm``).
        cfg_convention: ``"uncond+w"`` (default; diffusers) or ``"cond+w"`` (LCM / Imagen).

    A w-conditioned network (its config has ``time_cond_proj_dim``: guided-distillation and LCM students)
    takes the guidance scale as an input instead: ``guidance_scale`` then costs no second pass; it is fed as
    the embedding of w - 1 (w in the uncond+w convention), as diffusers' SD / LCM pipelines do.
    """

    def __init__(self, net, schedule: NoiseSchedule, prediction_type: str, *, cfg_convention: str = CFG_UNCOND):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.prediction_type = schedule.check_prediction_type(prediction_type)
        self.cfg_convention = cfg_convention
        self._call = network_call(net)
        config = getattr(_unwrap(net), "config", None)
        self.w_embedding_dim = int(getattr(config, "time_cond_proj_dim", None) or 0) if config is not None else 0

    @property
    def w_conditioned(self) -> bool:
        return self.w_embedding_dim > 0

    def guidance_embedding(self, guidance_scale, batch: int, device) -> torch.Tensor:
        """``timestep_cond`` for a w-conditioned network: embed(w - 1) per sample (w = 1 when None)."""
        w = torch.as_tensor(1.0 if guidance_scale is None else guidance_scale, dtype=torch.float32)
        if not torch.isfinite(w).all():
            raise ValueError(f"guidance scale must be finite, got {guidance_scale}")
        w_lcm = to_convention(w, self.cfg_convention, CFG_COND).reshape(-1).expand(batch) if w.ndim == 0 else None
        if w_lcm is None:
            if w.shape != (batch,):
                raise ValueError(f"per-sample guidance scale has shape {tuple(w.shape)}, expected ({batch},)")
            w_lcm = to_convention(w, self.cfg_convention, CFG_COND)
        return guidance_scale_embedding(w_lcm, self.w_embedding_dim).to(device)

    # ------------------------------------------------------------------------------------------------
    def _time(self, t, x_t):
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        return t

    def _forward(self, x_t, t, kwargs: dict):
        time = self.schedule.model_time(t).to(device=x_t.device, dtype=torch.float32)
        x_in = self.schedule.model_input(x_t, t).to(x_t.dtype)
        return self._call(self.net, x_in, time, kwargs)

    def forward(self, x_t: torch.Tensor, t, cond: Cond | None = None) -> torch.Tensor:
        """The raw network output (of ``self.prediction_type``) at continuous time ``t``."""
        t = self._time(t, x_t)
        return self._forward(x_t, t, cond.kwargs if cond is not None else {})

    def _is_plain(self, w) -> bool:
        if w is None:
            return True
        if isinstance(w, torch.Tensor):
            return False
        return (self.cfg_convention == CFG_UNCOND and w == 1.0) or (self.cfg_convention == CFG_COND and w == 0.0)

    def raw(self, x_t, t, cond: Cond | None = None, guidance_scale=None) -> torch.Tensor:
        """Raw output, with classifier-free guidance when ``guidance_scale`` asks for it (one forward of
        the doubled batch [cond; uncond])."""
        t = self._time(t, x_t)
        if self.w_conditioned:
            kwargs = dict(cond.kwargs) if cond is not None else {}
            kwargs["timestep_cond"] = self.guidance_embedding(guidance_scale, x_t.shape[0], x_t.device)
            return self._forward(x_t, t, kwargs)
        if self._is_plain(guidance_scale):
            return self._forward(x_t, t, cond.kwargs if cond is not None else {})
        if cond is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs a condition with an unconditional branch")
        both = self._forward(torch.cat([x_t, x_t]), torch.cat([t, t]), cond.with_cfg_batch())
        out_c, out_u = both.chunk(2)
        return cfg_combine(out_c, out_u, guidance_scale, self.cfg_convention)

    def predict(
        self, x_t, t, cond: Cond | None = None, *, target: str = "x0", guidance_scale=None, float64: bool = False
    ) -> torch.Tensor:
        """Prediction of type ``target`` (x0, eps, v, flow, score, edm). ``float64=True`` converts in float64
        (e.g. x0 from eps at high noise) and returns float64."""
        out = self.raw(x_t, t, cond, guidance_scale)
        t = self._time(t, x_t)
        if float64:
            return self.schedule.convert(out.double(), x_t.double(), t, self.prediction_type, target)
        return self.schedule.convert(out, x_t, t, self.prediction_type, target).to(x_t.dtype)

    # ------------------------------------------------------------------------------------------------
    def dsm_loss(
        self,
        x0: torch.Tensor,
        cond: Cond | None = None,
        *,
        t=None,
        noise=None,
        t_dist: str = "uniform",
        t_min: float = 0.0,
        t_max: float = 1.0,
        weighting: str = "native",
        weight_fn=None,
        guidance_scale=None,
        **t_kwargs,
    ):
        """Denoising score matching (Ho et al. 2020; Vincent 2011): noise x0 to x_t at t ~ t_dist and regress
        the network's own parameterisation onto its target (``weighting="native"``), or compare x0 / eps
        (``weighting="x0"`` / ``"eps"``), optionally with a per-sample weight ``weight_fn(t)``. A
        ``guidance_scale`` fits the guided output (SiD-LSG's kappa1: cond and uncond both get gradients).
        Returns the scalar loss."""
        from ..losses import denoising_loss

        if t is None:
            t = self.schedule.sample_t(x0.shape[0], t_dist, t_min=t_min, t_max=t_max, **t_kwargs)
        t = self._time(t, x0).to(x0.device)
        if noise is None:
            noise = rnd.randn_like(x0)
        x_t = self.schedule.add_noise(x0, noise, t)
        if self._is_plain(guidance_scale):
            out = self._forward(x_t, t, cond.kwargs if cond is not None else {})
        else:
            out = self.raw(x_t, t, cond, guidance_scale)
        space = self.prediction_type if weighting == "native" else weighting
        if space != self.prediction_type:
            out = self.schedule.convert(out, x_t, t, self.prediction_type, space)
        target = self.schedule.from_x0_eps(x0, noise, x_t, t, space)
        weight = weight_fn(t).to(out.device) if weight_fn is not None else None
        return denoising_loss(out, target, weight)
