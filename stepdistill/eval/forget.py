"""``stepdistill eval --forget-label L [--remap-label M]``: how well a class-conditional digits model forgot a class.

With the bundled digits classifier (the FD-digits feature network, :func:`stepdistill.eval.fd_digits.load_classifier`):

* ``forget_fraction``: the fraction of ``forget_samples`` samples generated with label L that the classifier
  assigns to L (SFD's goal: below 5%; the teacher: about 100%);
* ``remap_fraction``: the fraction of them it assigns to M (with ``--remap-label``), and ``forget_predictions``,
  the classifier's counts over all classes;
* ``fd_digits_remaining``: FD-digits of ``num_samples`` samples with the other labels in turn (L skipped)
  against the held-out digits of those labels only, and ``remaining_accuracy``, the fraction of them the
  classifier assigns to their own label.

Sources: an exported class-conditional pipeline (``model_index.json``), sampled as ``stepdistill eval`` samples
it (one ``torch.Generator`` seeded ``seed``), or a teacher ("digits", the bundled teacher, or a diffusers folder
with ``unet/`` and ``scheduler/``) sampled with ``teacher_steps`` DDIM steps (trailing), the teacher@N reference.
The forget samples use a generator seeded ``seed + 1``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import ConfigError


def forget_fractions(pred: torch.Tensor, forget_label: int, remap_label: int | None, num_classes: int) -> dict:
    """Fractions of the predicted labels ``pred`` equal to ``forget_label`` and to ``remap_label``, and the
    per-class counts (SFD's forgetting metrics, Chen et al. 2025, Sec. 5.1)."""
    pred = pred.reshape(-1).long()
    n = max(len(pred), 1)
    out = {
        "forget_fraction": float((pred == forget_label).sum()) / n,
        "forget_predictions": torch.bincount(pred, minlength=num_classes).tolist(),
    }
    if remap_label is not None:
        out["remap_fraction"] = float((pred == remap_label).sum()) / n
    return out


def remaining_labels(num_samples: int, num_classes: int, forget_label: int) -> torch.Tensor:
    """Labels 0..num_classes-1 in turn with ``forget_label`` skipped."""
    kept = torch.tensor([k for k in range(num_classes) if k != forget_label], dtype=torch.long)
    return kept[torch.arange(num_samples) % len(kept)]


class _Sampler:
    """``images(labels, generator)`` in [-1, 1] from an exported pipeline or a teacher (DDIM)."""

    def __init__(self, source: str, teacher_steps: int, device):
        import stepdistill  # noqa: F401  (registers the pipeline classes)

        path = Path(source)
        self.teacher = None
        if source == "digits" or (path.is_dir() and not (path / "model_index.json").is_file()
                                  and (path / "unet").is_dir() and (path / "scheduler").is_dir()):
            from ..models import Teacher

            if source == "digits":
                from ..assets import digits_teacher_path

                source = digits_teacher_path()
            self.teacher = Teacher.from_pretrained(source)
            self.teacher.net.to(device)
            net = self.teacher.net
            self.steps = teacher_steps
            self.what = f"teacher, {teacher_steps} DDIM steps"
        elif (path / "model_index.json").is_file():
            from diffusers import DiffusionPipeline

            self.pipe = DiffusionPipeline.from_pretrained(str(path)).to(device)
            self.pipe.set_progress_bar_config(disable=True)
            net = getattr(self.pipe, "unet", None)
            self.what = "exported pipeline"
        else:
            raise ConfigError(
                f"--pipeline: {source!r} is neither an exported pipeline folder (model_index.json) nor a teacher "
                "('digits' or a folder with unet/ and scheduler/); --forget-label needs a class-conditional model"
            )
        classes = getattr(getattr(net, "config", None), "num_class_embeds", None)
        if not classes:
            raise ConfigError(f"--forget-label needs a class-conditional model; {source!r} takes no class labels")
        self.num_classes = int(classes) - 1  # the last embedding is the null class
        self.net, self.device = net, device

    @torch.no_grad()
    def images(self, labels: torch.Tensor, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        from ..models.conditioning import ClassConditioner
        from ..sampling import sample

        out = []
        for chunk in labels.split(batch_size):
            if self.teacher is None:
                x = self.pipe(class_labels=chunk, generator=generator, output_type="pt").images * 2 - 1
            else:
                size = self.net.config.sample_size
                noise = torch.randn((len(chunk), self.net.config.in_channels, size, size), generator=generator)
                cond = ClassConditioner.for_unet2d(self.net)(chunk.to(self.device))
                x = sample(
                    lambda x, t, cond=cond: self.teacher.raw(x, t, cond, 1.0),
                    self.teacher.schedule,
                    noise.to(self.device),
                    self.steps,
                    pred_type=self.teacher.prediction_type,
                )
            out.append(x.float().cpu())
        return torch.cat(out)


def forget_report(
    source: str,
    forget_label: int,
    remap_label: int | None = None,
    *,
    num_samples: int = 1000,
    forget_samples: int = 500,
    teacher_steps: int = 50,
    batch_size: int = 250,
    seed: int = 0,
    out_dir: str | None = None,
    device=None,
) -> dict:
    """The forgetting report of ``source`` (see the module docstring); writes ``forget_metrics.json`` and
    ``forget_samples.png`` (the first forget samples, then remaining ones) to ``out_dir`` when given."""
    from ..data.digits import load_digits_tensors
    from ..utils import save_image_grid, write_json
    from .fd_digits import FDDigits, load_classifier

    if isinstance(forget_label, bool) or not isinstance(forget_label, int) or forget_label < 0:
        raise ConfigError(f"--forget-label must be a non-negative class label, got {forget_label!r}")
    if remap_label is not None and remap_label == forget_label:
        raise ConfigError(f"--remap-label {remap_label} is the forget label; name the class it was remapped to")
    for key, value in (("--num-samples", num_samples), ("--forget-samples", forget_samples),
                       ("--teacher-steps", teacher_steps), ("--batch-size", batch_size)):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sampler = _Sampler(source, teacher_steps, device)
    k = sampler.num_classes
    for key, label in (("--forget-label", forget_label), ("--remap-label", remap_label)):
        if label is not None and not 0 <= label < k:
            raise ConfigError(f"{key} {label} is not a class of {source!r} (labels 0..{k - 1})")
    classifier = load_classifier()
    ref_x, ref_y = load_digits_tensors("test", int(sampler.net.config.sample_size))
    keep = ref_y != forget_label
    metric = FDDigits(classifier=classifier, reference=ref_x[keep])
    if num_samples < metric.min_samples:
        raise ConfigError(f"--num-samples must be >= {metric.min_samples} for FD-digits, got {num_samples}")

    forget_x = sampler.images(torch.full((forget_samples,), forget_label, dtype=torch.long),
                              torch.Generator().manual_seed(seed + 1), batch_size)
    labels = remaining_labels(num_samples, k, forget_label)
    remain_x = sampler.images(labels, torch.Generator().manual_seed(seed), batch_size)
    with torch.no_grad():
        forget_pred = torch.cat([classifier(c).argmax(1) for c in forget_x.split(500)])
        remain_pred = torch.cat([classifier(c).argmax(1) for c in remain_x.split(500)])
    report = {
        "source": str(source),
        "sampler": sampler.what,
        "forget_label": forget_label,
        "remap_label": remap_label,
        "forget_samples": forget_samples,
        **forget_fractions(forget_pred, forget_label, remap_label, k),
        "num_samples": num_samples,
        "fd_digits_remaining": metric.score(remain_x),
        "remaining_accuracy": float((remain_pred == labels).double().mean()),
        "reference": f"held-out digits without label {forget_label} ({int(keep.sum())} images)",
        "seed": seed,
    }
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        write_json(report, os.path.join(out_dir, "forget_metrics.json"))
        grid = torch.cat([forget_x[:20], remain_x[:80]])
        save_image_grid(grid, os.path.join(out_dir, "forget_samples.png"), nrow=10, scale=4)
    return report
