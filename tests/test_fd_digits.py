"""FD-digits: shipped classifier, metric sanity, agreement with an independent scipy computation."""

import itertools
import json

import numpy as np
import pytest
import scipy.linalg
import torch

from stepdistill.data import load_digits_tensors
from stepdistill.eval import DEFAULT_CLASSIFIER_DIR, DigitsClassifier, FDDigits, fd_digits, load_classifier


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def metric(classifier):
    return FDDigits(classifier)


@pytest.fixture(scope="module")
def digits():
    return load_digits_tensors("train", 16)[0], load_digits_tensors("test", 16)[0]


@pytest.fixture(scope="module")
def floor(metric, digits):
    return metric.score(digits[0])


def test_shipped_classifier(classifier):
    files = [DEFAULT_CLASSIFIER_DIR / "model.safetensors", DEFAULT_CLASSIFIER_DIR / "config.json"]
    assert sum(f.stat().st_size for f in files) < 1_000_000
    config = json.loads(files[1].read_text())
    assert config["num_features"] == classifier.num_features == 64 and config["resolution"] == 16
    assert config["command"].startswith("python -m stepdistill.eval.fd_digits train --out")
    images, labels = load_digits_tensors("test", 16)
    accuracy = (classifier(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(config["test_accuracy"], abs=1e-4)
    feats = classifier.features(images[:5])
    assert feats.shape == (5, 64) and feats.dtype == torch.float32


def test_floor_matches_config(floor):
    config = json.loads((DEFAULT_CLASSIFIER_DIR / "config.json").read_text())
    assert floor == pytest.approx(config["fd_train_vs_test"], rel=1e-3)


def test_fd_of_reference_with_itself_is_zero(metric, digits, floor):
    assert abs(metric.score(digits[1])) < 1e-3 * floor


def test_real_digits_beat_noise(metric, floor):
    noise = torch.rand(500, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert metric.score(noise) > 20 * floor


def test_fd_grows_with_noise(metric, digits):
    gen = torch.Generator().manual_seed(0)
    test = digits[1]
    scores = [metric.score(test + std * torch.randn(test.shape, generator=gen)) for std in (0.0, 0.2, 0.5, 1.0)]
    assert all(a < b for a, b in itertools.pairwise(scores)), scores


def test_matches_independent_scipy_computation(classifier, metric, digits, floor):
    f1, f2 = (classifier.features(x).double().numpy() for x in digits)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert floor == pytest.approx(expected, rel=1e-3)
    assert fd_digits(digits[0], digits[1], classifier=classifier) == pytest.approx(floor, rel=1e-9)


def test_other_resolutions_are_resized(classifier, floor):
    # Bilinear 8 -> 16 inside the classifier is the same resize load_digits_tensors does.
    metric8 = FDDigits(classifier, reference="test", resolution=8)
    assert metric8.score(load_digits_tensors("train", 8)[0]) == pytest.approx(floor, rel=1e-3)


def test_too_few_samples(metric, digits):
    with pytest.raises(ValueError, match="65"):
        metric.score(digits[1][:64])
    with pytest.raises(ValueError, match="65"):
        FDDigits(metric.classifier, reference=digits[1][:10])
    with pytest.raises(ValueError, match="shape"):
        metric.score(torch.zeros(100, 3, 16, 16))
    with pytest.raises(ValueError, match="NaN"):
        metric.score(torch.full((100, 1, 16, 16), float("nan")))


def test_missing_classifier(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*python -m stepdistill\.eval\.fd_digits train --out"):
        load_classifier(tmp_path / "nowhere")


def test_train_classifier_smoke(tmp_path, capsys):
    from stepdistill.eval.fd_digits import main

    main(["train", "--out", str(tmp_path / "clf"), "--steps", "30", "--seed", "1"])
    out = capsys.readouterr().out
    assert "held-out (test split) accuracy" in out and "FD-digits floor" in out
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert (
        config["command"] == f"python -m stepdistill.eval.fd_digits train --out {tmp_path / 'clf'} --steps 30 --seed 1"
    )
    assert isinstance(load_classifier(tmp_path / "clf"), DigitsClassifier)
