"""Evaluation metrics (FD-digits: Frechet distance in a small digits classifier's feature space).

Names are imported lazily, so ``python -m stepdistill.eval.fd_digits`` does not import the module twice.
"""

from importlib import import_module

__all__ = [
    "DEFAULT_CLASSIFIER_DIR",
    "DigitsClassifier",
    "FDDigits",
    "fd_digits",
    "load_classifier",
    "train_classifier",
]


def __getattr__(name: str):
    if name in __all__:
        return getattr(import_module(".fd_digits", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
