"""Evaluation metrics (FD-digits: Frechet distance in a small digits classifier's feature space)."""

import warnings

# Eager import: it makes the package attribute `fd_digits` the function, not the submodule of that name.
from .fd_digits import (
    DEFAULT_CLASSIFIER_DIR,
    DigitsClassifier,
    FDDigits,
    fd_digits,
    load_classifier,
    train_classifier,
)

__all__ = [
    "DEFAULT_CLASSIFIER_DIR",
    "DigitsClassifier",
    "FDDigits",
    "fd_digits",
    "load_classifier",
    "train_classifier",
]

# `python -m stepdistill.eval.fd_digits` imports this package (so the submodule) before running the
# submodule as __main__; runpy then warns about that harmless second execution. Silence only that warning.
warnings.filterwarnings("ignore", message="'stepdistill.eval.fd_digits' found in sys.modules", category=RuntimeWarning)
