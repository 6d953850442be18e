"""Hyper-SD's HFL stage on digits: label accuracy and FD-digits of exported class-conditional pipelines.

For each pipeline folder: N samples with labels i % 10 (the same noise stream for every pipeline, as
``stepdistill eval`` draws it), the bundled digits classifier's accuracy on the requested labels, its mean
log-confidence in them (the HFL reward) and FD-digits against the held-out test split.

    python benchmarks/bench_hyper_sd.py outputs/consistency_digits_tscd/pipeline outputs/hyper_sd_digits/pipeline
"""

from __future__ import annotations

import argparse
import json

import torch
from diffusers import DiffusionPipeline

import stepdistill  # noqa: F401  (registers the pipeline classes)
from stepdistill.eval.fd_digits import FDDigits, load_classifier


@torch.no_grad()
def class_samples(folder: str, n: int = 1000, seed: int = 0, batch: int = 250):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    out = [pipe(class_labels=labels[s : s + batch], generator=g, output_type="pt").images for s in range(0, n, batch)]
    return torch.cat(out).float() * 2 - 1, labels


@torch.no_grad()
def label_scores(images, labels, classifier=None) -> dict:
    """Accuracy of the classifier's argmax on the requested labels and its mean log-confidence in them."""
    classifier = classifier or load_classifier()
    logp = classifier(images).log_softmax(-1)
    return {
        "label_accuracy": float((logp.argmax(-1) == labels).float().mean()),
        "mean_log_confidence": float(logp.gather(1, labels[:, None]).mean()),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("pipelines", nargs="+")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--out", default="", help="write the rows as JSON here")
    p.add_argument("--grid", default="", help="PNG: each pipeline's first 20 samples, stacked")
    args = p.parse_args(argv)
    fd = FDDigits()
    rows, firsts = [], []
    for folder in args.pipelines:
        images, labels = class_samples(folder, args.num_samples)
        firsts.append(images[:20])
        rows.append({"pipeline": folder, **label_scores(images, labels), "fd_digits": fd.score(images)})
        print(json.dumps(rows[-1]), flush=True)
    if args.grid:
        from stepdistill.utils import save_image_grid

        save_image_grid(torch.cat(firsts), args.grid, nrow=10, scale=2)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
