"""DistillTrainer: the training loop every method shares, on accelerate.

A method writes only hooks:

* ``build()``                      create networks, data and anything else (called once, before prepare);
* ``networks() -> {name: NetSpec}`` the trainable networks and their optimiser settings;
* ``phase(step) -> tuple[str]``    which networks are updated at this step (two-time-scale rules);
* ``compute_loss(batch, phase)``   returns ``{"loss": tensor, other scalars to log}``;
* ``on_step_end(step)``            optional (target-network EMA, progressive halving, ...);
* ``sample_images(step)``          optional: a (N, C, H, W) tensor in [-1, 1] for the periodic grid;
* ``extra_state()`` / ``load_extra_state(tensors, meta)``  optional: state outside the trainable networks
  that a checkpoint must carry for an exact resume (a consistency target network, a progressive round's
  frozen teacher and step count): tensors go to ``extra.safetensors``, JSON-able meta to the state file.

The base class owns: accelerate preparation (one ``prepare`` call per network with its own optimiser and
LR schedule, so FSDP2's one-model rule holds), the per-phase ``requires_grad`` flips, one
``accumulate`` block per micro-batch over every network, gradient clipping, AdamW + warm-up, EMA,
atomic checkpoints with exact resume, the non-finite-loss guard, tqdm, trackers and sample grids.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import uuid
import weakref
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from .. import io
from ..config import ConfigError, UserError, check_ranges
from .randomness import GlobalBatchRandom

CHECKPOINT_PREFIX = "step_"
RUN_FILE = "run.json"  # the folder's current run: its id (checkpoints carry it too)
LOG_FILE = "train_log.jsonl"  # one line per optimiser step: every logged scalar

# keys that may change between a checkpoint and its resume: they do not alter the trained trajectory
SAFE_RESUME_KEYS = frozenset(
    {
        "output_dir", "resume", "overwrite", "max_steps", "log_every", "checkpoint_every", "checkpoints_total_limit",
        "sample_every", "sample_steps", "report_to", "progress", "max_nonfinite", "export_dir", "save_rounds",
        "ema_decay", "gradient_checkpointing", "teacher_offload", "cache_text_embeddings", "max_bad_samples",
        "compile", "compile_mode", "compile_backend",
    }
)  # fmt: skip


@dataclass
class TrainConfig:
    """Settings shared by every trainer (method configs subclass this).

    > Parameters that control the run
    output_dir (`str`, defaults to `"outputs/run"`): where checkpoints, samples, logs and exports go.
    seed (`int`, defaults to `0`): seeds python, numpy and torch (per process: seed + rank).
    max_steps (`int`, defaults to `1000`): optimiser steps.
    > Parameters that control the batch
    global_batch (`int`, defaults to `64`): samples per optimiser step over all processes;
        must equal per-device batch x grad_accum x processes.
    grad_accum (`int`, defaults to `1`): micro-batches accumulated per optimiser step.
    > Optimisation
    learning_rate (`float`, defaults to `1e-4`), adam_beta1 / adam_beta2 (`0.9` / `0.999`), weight_decay (`0.0`),
    warmup_steps (`int`, `0`): linear warm-up; warmup_unit (`str`, `"iteration"`): what the warm-up counts:
    "iteration" (training steps, as DMD2 steps every schedule once per iteration) or "update" (each network's
    own optimiser steps: a network updated every k-th iteration warms up k times slower);
    max_grad_norm (`float`, `1.0`; 0 disables clipping);
    ema_decay (`float`, `0.0`: off): EMA of the networks named by ``ema_networks``.
    mixed_precision (`str`, `"no"`): "no" or "bf16" (autocast; weights and optimiser stay fp32).
    > Checkpoints and logging
    checkpoint_every (`int`, `500`), checkpoints_total_limit (`int`, `2`), resume (`str`, `""`: "latest" or a
    checkpoint folder), log_every (`int`, `10`), sample_every (`int`, `0`: off), report_to (`str`, `""` or
    "tensorboard"), max_nonfinite (`int`, `10`): abort after this many non-finite losses in a row.
    overwrite (`bool`, `false`): let a fresh run (no ``resume``) start in an ``output_dir`` that holds another
        run's checkpoints (they are left in place, never rotated nor resumed by ``resume: latest``).
    > Compilation
    compile (`bool`, `false`): torch.compile the networks of the generator, the fake score, the teacher (and a
        consistency target / progressive round teacher present at setup): each inner network's own call is
        compiled in place, so wrappers, parameter names, state-dict keys, checkpoints, EMA and export are
        unchanged. The first calls of each kind (grad / no grad, adapters on / off) compile; later ones reuse.
    compile_mode (`str`, `"default"`): torch.compile's mode ("default", "reduce-overhead", "max-autotune",
        ...; inductor only). compile_backend (`str`, `"inductor"`): torch.compile's backend ("aot_eager" needs
        no C++ compiler).
    Launcher settings: ``mixed_precision`` and ``grad_accum`` set in the recipe or on the command line win; left
    unset, the values of ``accelerate launch`` / its config (ACCELERATE_MIXED_PRECISION,
    ACCELERATE_GRADIENT_ACCUMULATION_STEPS) are used; an explicit value that differs from the launcher's is
    refused. The run prints which values it uses and where they came from.
    """

    output_dir: str = "outputs/run"
    seed: int = 0
    max_steps: int = 1000
    global_batch: int = 64
    grad_accum: int = 1
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_unit: str = "iteration"
    max_grad_norm: float = 1.0
    ema_decay: float = 0.0
    mixed_precision: str = "no"
    checkpoint_every: int = 500
    checkpoints_total_limit: int = 2
    resume: str = ""
    log_every: int = 10
    sample_every: int = 0
    report_to: str = ""
    max_nonfinite: int = 10
    progress: bool = True
    overwrite: bool = False
    compile: bool = False
    compile_mode: str = "default"
    compile_backend: str = "inductor"


@dataclass
class NetSpec:
    """A trainable network and its optimiser settings (None: use the config's)."""

    module: nn.Module
    lr: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    params: list | None = None  # default: the parameters that require grad when the trainer starts
    extra: dict = field(default_factory=dict)


def check_compile_settings(c) -> None:
    """``compile_mode`` / ``compile_backend`` are ones torch.compile knows (imports torch._dynamo: only when set)."""
    import torch._dynamo
    from torch._inductor import list_mode_options

    modes = ["default", *[m for m in list_mode_options() if m != "default"]]
    if c.compile_mode not in modes:
        raise ConfigError(f"compile_mode must be one of {modes}, got {c.compile_mode!r}")
    backends = torch._dynamo.list_backends(exclude_tags=())
    if c.compile_backend not in backends:
        raise ConfigError(
            f"compile_backend must be one of torch.compile's backends {backends}, got {c.compile_backend!r}"
        )
    if c.compile_mode != "default" and c.compile_backend != "inductor":
        raise ConfigError(
            f"compile_mode={c.compile_mode!r} is an inductor setting; compile_backend={c.compile_backend!r} ignores it"
        )


class NonFiniteLossError(UserError, RuntimeError):
    pass


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Every ``checkpoints/step_N`` folder, complete or not, oldest first."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = [
        d
        for d in os.listdir(root)
        if d.startswith(CHECKPOINT_PREFIX)
        and d[len(CHECKPOINT_PREFIX) :].isdigit()
        and os.path.isdir(os.path.join(root, d))
    ]
    return [os.path.join(root, d) for d in sorted(names, key=lambda d: int(d[len(CHECKPOINT_PREFIX) :]))]


def list_checkpoints(output_dir: str) -> list[str]:
    """The checkpoints that have their state file, oldest first."""
    return [d for d in checkpoint_dirs(output_dir) if os.path.isfile(os.path.join(d, "trainer_state.json"))]


def read_checkpoint_state(path: str) -> dict | None:
    """A checkpoint's trainer_state.json, or None when it is missing or unreadable."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def checkpoint_problem(path: str) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed (None: intact). Every file is checked against the
    size and sha256 recorded in its trainer_state.json (checkpoints written before checksums were recorded
    are checked for their state file only)."""
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        return "no trainer_state.json (incomplete or damaged)"
    state = read_checkpoint_state(path)
    if state is None or "global_step" not in state:
        return "trainer_state.json is unreadable"
    for name, rec in sorted(state.get("files", {}).items()):
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            return f"{name} is missing"
        if os.path.getsize(f) != rec["bytes"]:
            return f"{name} has {os.path.getsize(f)} bytes, {rec['bytes']} were written"
        if io.sha256_file(f) != rec["sha256"]:
            return f"{name} fails its sha256 checksum"
    return None


def _short(path: str) -> str:
    return os.path.basename(path.rstrip("/"))


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless, seeded, per-process shard of shuffled indices; its position is part of the checkpoint."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        if n < 1:
            raise ConfigError("dataset: the training dataset is empty")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.consumed = 0  # indices yielded by this process

    def __iter__(self):
        cache_epoch, perm = None, None
        while True:
            g = self.consumed * self.world + self.rank
            epoch, pos = divmod(g, self.n)
            if epoch != cache_epoch:
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
                cache_epoch = epoch
            self.consumed += 1
            yield int(perm[pos])

    def __len__(self):  # effectively infinite
        return 2**62


class DistillTrainer:
    """Base trainer; see the module docstring for the hooks a method implements."""

    config_class = TrainConfig

    def __init__(self, config: TrainConfig, accelerator=None):
        self.config = config
        self._accelerator = accelerator
        self.global_step = 0
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.history: list[dict] = []
        self.run_id = ""
        self.resumed_from: str | None = None
        self._log_file = None

    # ------------------------------------------------------------------ hooks
    def build(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def networks(self) -> dict[str, NetSpec]:  # pragma: no cover - abstract
        raise NotImplementedError

    def phase(self, step: int):
        """Networks updated at ``step``: a tuple of names (one group), or a list of tuples (groups run one
        after the other in the same step, each with its own ``compute_loss`` and backward, e.g. DMD2's
        generator update followed by the fake-score update on the same, detached, samples)."""
        return tuple(self.specs)

    def compute_loss(self, batch, phase: tuple[str, ...]) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_step_end(self, step: int) -> None:
        pass

    def on_step_skipped(self, step: int) -> None:
        """Called when a step is skipped for a non-finite loss or gradient (drop any per-step state)."""

    def lr_factor(self, name: str, step: int) -> float:
        """Multiplier of network ``name``'s learning rate at its ``step``-th schedule step (an iteration, or its
        own optimiser step with ``warmup_unit: update``) after warm-up;
        default 1 (constant). Progressive distillation anneals it to 0 within each round."""
        return 1.0

    def extra_state(self) -> tuple[dict, dict]:
        """(tensors, meta) to checkpoint besides the networks, optimisers, EMA and RNG; default none."""
        return {}, {}

    def load_extra_state(self, tensors: dict, meta: dict) -> None:
        """Restore what :meth:`extra_state` saved (called after the networks are loaded)."""

    def ema_networks(self) -> tuple[str, ...]:
        return tuple(self.specs)[:1]

    def train_dataset(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def collate(self, items):
        return torch.utils.data.default_collate(items)

    def sample_images(self, step: int):
        return None

    # ------------------------------------------------------------------ setup
    @property
    def accelerator(self):
        return self._accelerator

    def validate(self):
        """Checks that need no model: called before anything loads."""
        c = self.config
        if c.mixed_precision not in ("no", "bf16"):
            raise ConfigError(f"mixed_precision must be 'no' or 'bf16', got {c.mixed_precision!r}")
        if c.warmup_unit not in ("iteration", "update"):
            raise ConfigError(f"warmup_unit must be 'iteration' or 'update', got {c.warmup_unit!r}")
        if c.grad_accum < 1:
            raise ConfigError(f"grad_accum must be >= 1, got {c.grad_accum}")
        if c.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {c.max_steps}")
        if c.resume and c.overwrite:
            raise ConfigError("resume and overwrite: true exclude each other (overwrite only applies to a fresh run)")
        check_ranges(c)
        if c.compile or c.compile_mode != "default" or c.compile_backend != "inductor":
            check_compile_settings(c)
        if not 0.0 <= c.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {c.ema_decay}")
        if c.resume not in ("", "latest") and not os.path.isdir(c.resume):
            raise ConfigError(f"resume: checkpoint folder {c.resume!r} does not exist")
        if self.trains_several_networks and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
            raise ConfigError(
                f"DeepSpeed cannot train the several networks of {type(self).__name__} with one Accelerator "
                "(one model per engine); use DDP (accelerate launch --multi_gpu) or FSDP (recipes/accelerate/)"
            )

    def setup(self):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType

        c = self.config
        self.validate()
        settings = None
        if self._accelerator is None:
            settings = self._launcher_settings()
            # one process may build several trainers (notebooks, tests): accelerate keeps mixed precision and
            # similar settings in a process-wide state; reset those (not the process group) for this trainer
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=False)
            self._accelerator = Accelerator(
                gradient_accumulation_steps=c.grad_accum,
                # warmup_steps counts optimiser steps: do not step the LR schedule once per process
                step_scheduler_with_optimizer=False,
                mixed_precision=c.mixed_precision,
                log_with=c.report_to or None,
                project_dir=c.output_dir,
                kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=self.find_unused_parameters)],
            )
        acc = self._accelerator
        if settings and acc.is_main_process:
            print(f"stepdistill: {settings}", flush=True)
        per_device, rem = divmod(c.global_batch, c.grad_accum * acc.num_processes)
        if rem or per_device < 1:
            raise ConfigError(
                f"global_batch={c.global_batch} is not divisible by grad_accum={c.grad_accum} x "
                f"{acc.num_processes} processes; choose global_batch = per-device batch x grad_accum x processes"
            )
        self.per_device_batch = per_device
        if self._sharded() and c.ema_decay > 0:
            raise ConfigError(
                "ema_decay > 0 under FSDP is not supported (the EMA would be a full unsharded copy on every "
                "process); use ema_decay: 0, or DDP (recipes/accelerate/ddp.yaml)"
            )
        # the settings this run was started with (before build() derives anything): checkpoints carry them
        self.run_config = json.loads(json.dumps(asdict(c)))
        resume_path = self._main_decides(self._prepare_run)  # refusals come before any model loads
        self._seed_everything(c.seed + acc.process_index)
        self.build()
        self.specs = self.networks()
        if acc.distributed_type == DistributedType.DEEPSPEED and len(self.specs) > 1:
            raise ConfigError(
                f"DeepSpeed cannot train several networks with one Accelerator ({', '.join(self.specs)}); "
                "use DDP (accelerate launch --multi_gpu) or FSDP (recipes/accelerate/fsdp*.yaml)"
            )
        self.opts, self.lr_scheds, self.params = {}, {}, {}
        for name, spec in self.specs.items():
            params = (
                spec.params if spec.params is not None else [p for p in spec.module.parameters() if p.requires_grad]
            )
            if not params:
                raise ValueError(f"network {name!r} has no trainable parameter")
            opt = torch.optim.AdamW(
                params,
                lr=spec.lr if spec.lr is not None else c.learning_rate,
                betas=spec.betas or (c.adam_beta1, c.adam_beta2),
                weight_decay=spec.weight_decay if spec.weight_decay is not None else c.weight_decay,
            )
            warm = max(c.warmup_steps, 0)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s, w=warm, n=name: (min(1.0, (s + 1) / w) if w else 1.0) * self.lr_factor(n, s)
            )
            for p in params:  # DDP registers the parameters that require grad when it wraps the module
                p.requires_grad_(True)
            module, opt, sched = acc.prepare(spec.module, opt, sched)
            spec.module = module
            self.opts[name], self.lr_scheds[name], self.params[name] = opt, sched, params
        self.on_prepared()
        if c.compile:
            self.compile_networks()
        self.ema = {}
        if c.ema_decay > 0:
            for name in self.ema_networks():
                self.ema[name] = {k: v.detach().clone().float() for k, v in self._inner(name).state_dict().items()}
        ds = self.train_dataset()
        # a streamed dataset (stepdistill.data.shards) splits its shards over processes and workers itself: its
        # reader is the loader, and the reader's `consumed` (its reading position) is checkpointed as the sampler's
        streamed = isinstance(ds, torch.utils.data.IterableDataset)
        if streamed:
            self.sampler = ds.reader(per_device, acc.process_index, acc.num_processes, c.seed)
        else:
            self.sampler = InfiniteSampler(len(ds), c.seed, acc.process_index, acc.num_processes)
        self.loader = self.sampler if streamed else torch.utils.data.DataLoader(
            ds,
            batch_size=per_device,
            sampler=self.sampler,
            collate_fn=self.collate,
            num_workers=0,
            drop_last=True,
            # its own generator: creating an iterator must not draw from
            # the global RNG, or a resumed run would diverge
            generator=torch.Generator().manual_seed(c.seed),
        )
        if c.report_to:
            acc.init_trackers(
                "stepdistill", config={k: v for k, v in asdict(c).items() if isinstance(v, (int, float, str, bool))}
            )
        if resume_path:
            self.load_checkpoint(resume_path)
        if acc.is_main_process:
            io.write_json(os.path.join(c.output_dir, "config.json"), asdict(c))
            self._open_log()
        self._set_up = True

    # ------------------------------------------------------------------ run lifecycle
    def export_target(self) -> str | None:
        """Where ``export()`` writes by default (None: the method exports nothing); checked before training."""
        return None

    def _launcher_settings(self) -> str:
        """Resolve ``mixed_precision`` and ``grad_accum`` against ``accelerate launch`` (see TrainConfig) and
        return the line that says which values are used and where they came from."""
        c = self.config
        given = getattr(c, "_given_keys", None)  # keys the recipe / command line set (make_trainer records them)
        defaults = type(c)()
        parts = []
        for key, env in (
            ("mixed_precision", "ACCELERATE_MIXED_PRECISION"),
            ("grad_accum", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"),
        ):
            raw = os.environ.get(env, "").strip()
            # accelerate launch writes mixed_precision "no" when nothing asked for one: that is no request
            launcher = None if raw.lower() in ("", "no", "1") else raw.lower()
            ours = getattr(c, key)
            explicit = key in given if given is not None else ours != getattr(defaults, key)
            if launcher is None:
                parts.append(f"{key}={ours} ({'recipe' if explicit else 'default'})")
                continue
            if key == "grad_accum":
                if not launcher.isdigit() or int(launcher) < 1:
                    raise ConfigError(f"{env}={raw!r} from the launcher is not a positive integer")
                launcher = int(launcher)
            elif launcher not in ("no", "bf16"):
                raise ConfigError(
                    f"mixed_precision={launcher!r} from accelerate launch / its config ({env}) is not supported: "
                    "stepdistill trains with 'no' or 'bf16'"
                )
            if explicit and ours != launcher:
                raise ConfigError(
                    f"{key}={ours!r} in the recipe / command line conflicts with {launcher!r} from accelerate launch "
                    f"/ its config ({env}); remove one of them or make them equal"
                )
            setattr(c, key, launcher)
            parts.append(f"{key}={launcher} ({'recipe and ' if explicit else ''}accelerate launch: {env})")
        return "using " + ", ".join(parts)

    def _main_decides(self, fn):
        """Run ``fn`` on the main process only; every process gets its result, or raises its ConfigError."""
        acc = self.accelerator
        out = [None]
        if acc.is_main_process:
            try:
                out = [("ok", fn())]
            except ConfigError as e:
                out = [("error", str(e))]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(out)
        kind, value = out[0]
        if kind == "error":
            raise ConfigError(value)
        if isinstance(value, dict):  # what every process needs of the decision
            self.run_id = value["run_id"]
            return value["resume"]
        return value

    def _run_of(self, path: str) -> str | None:
        state = read_checkpoint_state(path)
        return None if state is None else state.get("run_id", "")

    def _prepare_run(self) -> dict:
        """Main process, before any model loads: the export folder is usable; a fresh run does not start over
        another run's checkpoints (unless ``overwrite``); a resume picks an intact checkpoint whose settings
        allow an exact resume. Returns the run id and the checkpoint to load (None: fresh)."""
        c = self.config
        target = self.export_target()
        if target:
            io.check_export_dir(target)
        os.makedirs(c.output_dir, exist_ok=True)
        run_file = os.path.join(c.output_dir, RUN_FILE)
        ckpts = checkpoint_dirs(c.output_dir)
        if not c.resume:
            if ckpts and not c.overwrite:
                names = ", ".join(_short(p) for p in ckpts)
                raise ConfigError(
                    f"output_dir {c.output_dir!r} holds checkpoints of an earlier run ({names}): continue it with "
                    "resume=latest, choose another output_dir, or set overwrite=true to start a new run there (the "
                    "earlier checkpoints are then left alone: never rotated, never resumed by resume=latest)"
                )
            run_id = uuid.uuid4().hex[:12]
            io.write_json(run_file, {"run_id": run_id, "trainer": type(self).__name__, "started": time.time()})
            self._reset_log()
            return {"run_id": run_id, "resume": None}
        path = self._select_checkpoint(c.resume, ckpts)
        state = read_checkpoint_state(path)
        changes = self._check_resume_config(path, state)
        run_id = state.get("run_id", "")
        others = [p for p in ckpts if self._run_of(p) not in (None, "", run_id)]
        own_folder = os.path.abspath(os.path.join(c.output_dir, "checkpoints"))
        if others and os.path.dirname(os.path.abspath(path)) != own_folder:
            raise ConfigError(
                f"resume={c.resume!r}: output_dir {c.output_dir!r} holds checkpoints of another run "
                f"({', '.join(_short(p) for p in others)}); resume into the checkpoint's own output_dir or another one"
            )
        step = state["global_step"]
        if step > c.max_steps:
            raise ConfigError(
                f"max_steps={c.max_steps} is below the step of checkpoint {path!r} ({step}): nothing to train and "
                f"the exported model would be the step-{step} one; raise max_steps or resume an earlier checkpoint"
            )
        print(f"stepdistill: resuming from {path} (step {step})", flush=True)
        if changes:
            print(f"stepdistill: {changes}", flush=True)
        if step == c.max_steps:
            print(f"stepdistill: the checkpoint is at max_steps={c.max_steps}: nothing left to train", flush=True)
        io.write_json(run_file, {"run_id": run_id, "trainer": type(self).__name__, "resumed_from": path})
        self._truncate_log(step)
        return {"run_id": run_id, "resume": path}

    def _select_checkpoint(self, where: str, ckpts: list[str]) -> str:
        """The checkpoint to resume: ``where`` (a folder) if intact; for "latest" the newest intact one of the
        folder's current run (a damaged newer one is reported). A damaged explicit checkpoint is refused with
        the latest intact one named."""
        c = self.config
        root = os.path.join(c.output_dir, "checkpoints")
        if where != "latest":
            problem = checkpoint_problem(where)
            if problem is None:
                return where
            siblings = checkpoint_dirs(os.path.dirname(os.path.dirname(os.path.abspath(where))))
            here = os.path.abspath(where)
            intact = [p for p in siblings if os.path.abspath(p) != here and checkpoint_problem(p) is None]
            hint = f"; the latest intact one there is {intact[-1]!r}" if intact else "; no intact checkpoint is left"
            raise ConfigError(f"resume: checkpoint {where!r} is damaged ({problem}){hint}")
        if not ckpts:
            raise ConfigError(f"resume=latest: no checkpoint under {root!r}")
        current = None
        try:
            with open(os.path.join(c.output_dir, RUN_FILE)) as f:
                current = json.load(f).get("run_id")
        except (OSError, ValueError, AttributeError):
            pass
        mine = [p for p in ckpts if current is None or self._run_of(p) in (None, current)]
        if not mine:
            raise ConfigError(
                f"resume=latest: no checkpoint of the current run (run.json: {current}) under {root!r}; the others "
                f"({', '.join(_short(p) for p in ckpts)}) belong to earlier runs: resume one of them by its path"
            )
        damaged = []
        for path in reversed(mine):
            problem = checkpoint_problem(path)
            if problem is None:
                for bad, why in damaged:
                    print(
                        f"stepdistill: checkpoint {bad} is damaged ({why}); resume=latest falls back to "
                        f"{_short(path)}, the latest intact one",
                        flush=True,
                    )
                return path
            damaged.append((_short(path), problem))
        raise ConfigError(
            f"resume=latest: no intact checkpoint under {root!r} ("
            + "; ".join(f"{name}: {why}" for name, why in damaged)
            + ")"
        )

    def _check_resume_config(self, path: str, state: dict) -> str:
        """Refuse settings that differ from the checkpoint's and would break an exact resume; return the line
        that lists the safe ones (empty: none changed)."""
        saved = state.get("config")
        if saved is None:  # written before checkpoints carried their settings
            return "the checkpoint records no settings (written by an older version): they are not compared"
        now = self.run_config
        changed = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}
        unsafe = {k: v for k, v in changed.items() if k not in SAFE_RESUME_KEYS}
        if unsafe:
            listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(unsafe.items()))
            raise ConfigError(
                f"resume: settings differ from checkpoint {path!r} and would break an exact resume ({listed}); "
                "set them back, or start a new run in another output_dir"
            )
        shown = {k: v for k, v in changed.items() if k not in ("resume", "output_dir")}
        if not shown:
            return ""
        return "changed since the checkpoint (safe for an exact resume): " + ", ".join(
            f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(shown.items())
        )

    # the per-step JSONL log (main process)
    def _log_path(self) -> str:
        return os.path.join(self.config.output_dir, LOG_FILE)

    def _reset_log(self):
        if os.path.exists(self._log_path()):
            io.write_text(self._log_path(), "")

    def _truncate_log(self, step: int):
        """Keep the log's lines up to ``step`` (a resumed curve then has no duplicate steps)."""
        if not os.path.exists(self._log_path()):
            return
        kept = []
        with open(self._log_path()) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut by a kill
                    continue
                if rec.get("step", step + 1) <= step:
                    kept.append(json.dumps(rec) + "\n")
        io.write_text(self._log_path(), "".join(kept))

    def _open_log(self):
        self._log_file = open(self._log_path(), "a")

    def _append_log(self, logs: dict):
        if self._log_file is not None:
            rec = {"step": self.global_step, "time": round(time.time(), 3), **logs}
            self._log_file.write(json.dumps(rec) + "\n")
            self._log_file.flush()

    def _close_log(self):
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def finish(self):
        """End the run: every process waits for the others, then the process group is released (call after
        ``export()``; trackers are closed by ``train()``)."""
        acc = self.accelerator
        if acc is None:
            return
        acc.wait_for_everyone()
        acc.state.destroy_process_group()

    find_unused_parameters = False
    trains_several_networks = False  # methods with a fake score / head set this (DeepSpeed check)

    def on_prepared(self):
        """Called after every network is prepared (e.g. to wrap prepared modules into Denoisers)."""

    def compile_networks(self):
        """``compile: true``: compile each Denoiser network's own call in place (``Module.compile``), once per
        network (a LoRA generator / fake score and the teacher share one)."""
        from ..models.denoiser import _unwrap

        c, done = self.config, set()
        for name in ("generator", "fake", "teacher", "target", "round_teacher"):
            net = getattr(getattr(self, name, None), "net", None)
            inner = _unwrap(net) if isinstance(net, nn.Module) else None
            if inner is not None and id(inner) not in done:
                done.add(id(inner))
                inner.compile(mode=None if c.compile_mode == "default" else c.compile_mode, backend=c.compile_backend)

    def _sharded(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    def _optim_file(self, name: str) -> str:
        return f"{name}_optim_rank{self.accelerator.process_index}.pt" if self._sharded() else f"{name}_optim.pt"

    def _inner(self, name) -> nn.Module:
        return self.accelerator.unwrap_model(self.specs[name].module)

    @staticmethod
    def _seed_everything(seed):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # ------------------------------------------------------------------ loop
    def _set_phase(self, active):
        """Trainable flags of the active group on, the others off; the active networks in train mode (a whole-tree
        ``train()`` the first time a network is active or when something left it in eval, not every call)."""
        trained = self.__dict__.setdefault("_trained", weakref.WeakSet())
        for name, params in self.params.items():
            on = name in active
            for p in params:
                if p.requires_grad is not on:
                    p.requires_grad_(on)
            module = self.specs[name].module
            if on and (module not in trained or not module.training):
                module.train(True)
                trained.add(module)

    def _all_finite(self, x: torch.Tensor) -> bool:
        """True when ``x`` is finite on every process (a sum of non-finite counts, reduced across processes)."""
        bad = (~torch.isfinite(x.detach().float())).sum().reshape(1).to(self.accelerator.device)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, "sum")
        return bad.item() == 0

    def _groups(self, step):
        groups = self.phase(step)
        groups = [tuple(groups)] if groups and isinstance(next(iter(groups)), str) else [tuple(g) for g in groups]
        for g in groups:
            unknown = set(g) - set(self.specs)
            if unknown or not g:
                raise ValueError(f"phase({step}) returned unknown or empty network group {g}")
        return groups

    def train(self):
        if not getattr(self, "_set_up", False):  # a caller may have run setup() to inspect the networks
            self.setup()
        c, acc = self.config, self.accelerator
        data = iter(self.loader)
        bar = None
        if c.progress and acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=c.max_steps, initial=self.global_step, desc=type(self).__name__, dynamic_ncols=True)
        modules = [s.module for s in self.specs.values()]
        window: dict[str, list] = {}  # key -> [sum, count] over the current logging window
        t_start = time.time()
        while self.global_step < c.max_steps:
            step = self.global_step
            groups = self._groups(step)
            active = tuple(dict.fromkeys(n for g in groups for n in g))
            logs: dict[str, float] = {}
            skipped = False
            for micro in range(c.grad_accum):
                batch = next(data)
                rng = GlobalBatchRandom(
                    (c.seed * 1_000_003 + step) * 257 + micro,
                    acc.process_index,
                    acc.num_processes,
                    self.per_device_batch,
                )
                with acc.accumulate(*modules), rng:
                    for group in groups:
                        self._set_phase(group)
                        out = self.compute_loss(batch, group)
                        loss = out["loss"]
                        if not self._all_finite(loss.detach()):  # every process skips together
                            skipped = True
                            break
                        acc.backward(loss)
                        for k, v in out.items():
                            key = k if len(self.specs) == 1 else f"{k}/{'+'.join(group)}"
                            logs[key] = logs.get(key, 0.0) + float(v.detach().float().mean()) / c.grad_accum
                    if skipped:
                        break
                    if acc.sync_gradients:
                        norms = [
                            acc.clip_grad_norm_(
                                self.params[n], c.max_grad_norm if c.max_grad_norm > 0 else float("inf")
                            )
                            for n in active
                        ]
                        if not self._all_finite(torch.stack([torch.as_tensor(x).float().cpu() for x in norms])):
                            skipped = True  # a non-finite gradient with a finite loss: do not step
                            break
                        for n in active:
                            self.opts[n].step()
                        # warmup_unit "iteration": every schedule advances once per step, updated or not
                        for n in active if c.warmup_unit == "update" else self.specs:
                            self.lr_scheds[n].step()
                    for n in self.specs:  # every network: no gradient leaks into a later group or step
                        if acc.sync_gradients:
                            self.opts[n].zero_grad(set_to_none=True)
            if skipped:
                for n in self.specs:  # the inner optimisers: the wrapped ones ignore zero_grad off-sync
                    self.opts[n].optimizer.zero_grad(set_to_none=True)
                acc.step = 0  # realign gradient accumulation with the next step's first micro-batch
                acc.gradient_state._set_sync_gradients(False)
                self.on_step_skipped(step)
                self.nonfinite_in_row += 1
                self.nonfinite_total += 1
                if self.nonfinite_in_row >= c.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{self.nonfinite_in_row} non-finite losses in a row at step {step}; lower learning_rate, "
                        "check the data range, or resume from the last checkpoint"
                    )
                continue
            self.nonfinite_in_row = 0
            self._update_ema(active)
            self.on_step_end(step)
            self.global_step += 1
            self.history.append({"step": step, **logs})
            self._append_log(logs)
            for key, v in logs.items():
                acc_sum = window.setdefault(key, [0.0, 0])
                acc_sum[0] += v
                acc_sum[1] += 1
            for g in groups:
                count = window.setdefault("window_steps" + ("" if len(self.specs) == 1 else "/" + "+".join(g)), [0, 0])
                count[0] += 1
            if bar is not None:
                bar.update(1)
                post = {k.split("/")[0]: f"{v:.4g}" for k, v in logs.items()}
                if self.nonfinite_total:  # skipped steps so far (not counted as steps)
                    post["nonfinite"] = self.nonfinite_total
                bar.set_postfix(post, refresh=False)
            if self.global_step % max(c.log_every, 1) == 0 or self.global_step == c.max_steps:
                if c.report_to and window:
                    acc.log(_window_means(window), step=self.global_step)
                window = {}
            if c.sample_every and self.global_step % c.sample_every == 0:
                self._save_samples()
            if c.checkpoint_every and (self.global_step % c.checkpoint_every == 0 or self.global_step == c.max_steps):
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        if self.nonfinite_total and acc.is_main_process:
            print(f"{self.nonfinite_total} step(s) skipped for a non-finite loss or gradient (not counted as steps)")
        self.train_seconds = time.time() - t_start
        self._close_log()
        acc.wait_for_everyone()
        if c.report_to:  # close the trackers only: export() and finish() still need the process group
            for tracker in acc.trackers:
                tracker.finish()
        return self.history

    def ema_decay_now(self) -> float:
        """The EMA decay of this step's update (default: the constant ``ema_decay``)."""
        return self.config.ema_decay

    @torch.no_grad()
    def _update_ema(self, active):
        d = self.ema_decay_now()
        for name, shadow in self.ema.items():
            if name not in active:
                continue
            for k, v in self._inner(name).state_dict().items():
                if v.dtype.is_floating_point:
                    shadow[k].lerp_(v.detach().float(), 1 - d)
                else:
                    shadow[k].copy_(v)

    def ema_state_dict(self, name):
        return self.ema.get(name)

    def _save_samples(self):
        imgs = self.sample_images(self.global_step)
        if imgs is None or not self.accelerator.is_main_process:
            return
        from ..utils import save_image_grid

        path = os.path.join(self.config.output_dir, "samples", f"step_{self.global_step:07d}.png")
        save_image_grid(imgs, path)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> str | None:
        """Write ``checkpoints/step_N``: a temp folder, every file's size and sha256 in its trainer_state.json,
        fsynced, then swapped into place (an existing step_N stays until the new one is complete). Rotation
        removes the oldest checkpoints of this run only."""
        acc = self.accelerator
        c = self.config
        root = os.path.join(c.output_dir, "checkpoints")
        final = os.path.join(root, f"{CHECKPOINT_PREFIX}{self.global_step:07d}")
        tmp = os.path.join(root, f".tmp_{CHECKPOINT_PREFIX}{self.global_step:07d}")
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp, exist_ok=True)
        acc.wait_for_everyone()
        sharded = self._sharded()
        for name in self.specs:
            sd = acc.get_state_dict(self.specs[name].module)  # FSDP: full weights gathered to rank 0
            if acc.is_main_process:
                io.save_safetensors(sd, os.path.join(tmp, f"{name}.safetensors"))
                if name in self.ema:
                    io.save_safetensors(self.ema[name], os.path.join(tmp, f"{name}_ema.safetensors"))
            if acc.is_main_process or sharded:  # FSDP: every rank holds its own shard of the optimiser state
                io.torch_save(
                    {"optimizer": self.opts[name].state_dict(), "lr_scheduler": self.lr_scheds[name].state_dict()},
                    os.path.join(tmp, self._optim_file(name)),
                )
        rng = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "sampler_consumed": self.sampler.consumed,
        }
        io.torch_save(_rng_to_tensors(rng), os.path.join(tmp, f"rng_{acc.process_index}.pt"))
        extra_tensors, extra_meta = self.extra_state()
        acc.wait_for_everyone()
        if acc.is_main_process:
            if extra_tensors:
                io.save_safetensors(extra_tensors, os.path.join(tmp, "extra.safetensors"))
            files = {
                f: {"bytes": os.path.getsize(os.path.join(tmp, f)), "sha256": io.sha256_file(os.path.join(tmp, f))}
                for f in sorted(os.listdir(tmp))
            }
            state = {
                "global_step": self.global_step,
                "run_id": self.run_id,
                "nonfinite_total": self.nonfinite_total,
                "networks": list(self.specs),
                "extra": extra_meta,
                "config": self.run_config,
                "files": files,
                "history_tail": self.history[-50:],
            }
            io.write_json(os.path.join(tmp, "trainer_state.json"), state, indent=None)
            io.fsync_tree(tmp)
            if self._log_file is not None:
                os.fsync(self._log_file.fileno())
            io.swap_dir(tmp, final)
            mine = [p for p in list_checkpoints(c.output_dir) if self._run_of(p) == self.run_id]
            for old in mine[: max(len(mine) - max(c.checkpoints_total_limit, 1), 0)]:
                io.remove_dir(old)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, where: str):
        """Load a checkpoint folder (``setup()`` has checked it: see ``_select_checkpoint``)."""
        path = where
        state_file = os.path.join(path, "trainer_state.json")
        if not os.path.isfile(state_file):
            raise ConfigError(f"resume: {path!r} is not a complete checkpoint (no trainer_state.json)")
        try:
            with open(state_file) as f:
                state = json.load(f)
            missing = set(self.specs) - set(state["networks"])
            if missing:
                raise ValueError(f"checkpoint {path!r} has no weights for networks {sorted(missing)}")
            for name in self.specs:
                sd = load_file(os.path.join(path, f"{name}.safetensors"))
                if self._sharded():  # full weights into the sharded module
                    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                    set_model_state_dict(
                        self.specs[name].module, sd, options=StateDictOptions(full_state_dict=True, strict=True)
                    )
                else:
                    self._inner(name).load_state_dict(sd)
                ema_file = os.path.join(path, f"{name}_ema.safetensors")
                if name in self.ema and os.path.isfile(ema_file):
                    self.ema[name] = {k: v.float() for k, v in load_file(ema_file).items()}
                elif name in self.ema:  # EMA switched on at resume: start it from the resumed weights
                    self.ema[name] = {k: v.detach().clone().float() for k, v in self._inner(name).state_dict().items()}
                opt_state = torch.load(os.path.join(path, self._optim_file(name)), weights_only=True)
                self.opts[name].load_state_dict(opt_state["optimizer"])
                self.lr_scheds[name].load_state_dict(opt_state["lr_scheduler"])
            extra_file = os.path.join(path, "extra.safetensors")
            extra = load_file(extra_file) if os.path.isfile(extra_file) else {}
            self.load_extra_state(extra, state.get("extra", {}))
            rng_file = os.path.join(path, f"rng_{self.accelerator.process_index}.pt")
            rng = _rng_from_tensors(torch.load(rng_file, weights_only=True))
        except Exception as e:  # noqa: BLE001 - any unreadable file (safetensors, torch, json) means corrupt
            raise ConfigError(
                f"resume: checkpoint {path!r} is unreadable or corrupt ({type(e).__name__}: {e}); earlier "
                f"checkpoints in {os.path.dirname(path)!r} are untouched: resume from one of them"
            ) from e
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.sampler.consumed = rng["sampler_consumed"]
        self.global_step = state["global_step"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.resumed_from = path
        return path


def _window_means(window: dict) -> dict:
    """Tracker scalars of a logging window: each scalar's mean over the steps that produced it, and per
    update group the number of its steps in the window (``window_steps[/group]``)."""
    return {k: (v[0] if k.startswith("window_steps") else v[0] / v[1]) for k, v in window.items()}


def _rng_to_tensors(rng):
    """RNG states as tensors / plain types so that ``torch.load(weights_only=True)`` can read them."""
    py = rng["python"]
    np_state = rng["numpy"]
    return {
        "python": (py[0], torch.tensor(py[1], dtype=torch.int64), py[2]),
        "numpy": (
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ),
        "torch": rng["torch"],
        "cuda": rng["cuda"],
        "sampler_consumed": rng["sampler_consumed"],
    }


def _rng_from_tensors(d):
    py = d["python"]
    npst = d["numpy"]
    return {
        "python": (py[0], tuple(int(v) for v in py[1].tolist()), py[2]),
        "numpy": (npst[0], npst[1].numpy().astype(np.uint32), npst[2], npst[3], npst[4]),
        "torch": d["torch"],
        "cuda": d["cuda"],
        "sampler_consumed": d["sampler_consumed"],
    }
