"""Datasets: bundled digits, toy 2-D distributions and metrics, image folders, prompt files."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from stepdistill.data import (
    NUM_CLASSES,
    DigitsDataset,
    ImageFolderDataset,
    Toy2DDataset,
    gmm_centers,
    load_digits_tensors,
    load_prompts,
    mode_coverage,
    sample_toy2d,
    sliced_wasserstein,
)

# ---------------------------------------------------------------- digits


@pytest.mark.parametrize("resolution", [8, 16, 32])
def test_digits_shapes_range_labels(resolution):
    images, labels = load_digits_tensors("all", resolution)
    assert images.shape == (1797, 1, resolution, resolution) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert images.min() >= -1 and images.max() <= 1
    assert images.min() == -1 and images.max() == 1
    assert set(labels.tolist()) == set(range(NUM_CLASSES))


def test_digits_native_values_and_upsampling():
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images).float()
    x8, _ = load_digits_tensors("all", 8)
    torch.testing.assert_close(x8[:, 0], raw / 16 * 2 - 1)
    x16, _ = load_digits_tensors("all", 16)
    expected = torch.nn.functional.interpolate(x8, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(x16, expected)


def test_digits_split_disjoint_and_stratified():
    all_images, all_labels = load_digits_tensors("all", 8)
    train_images, train_labels = load_digits_tensors("train", 8)
    test_images, test_labels = load_digits_tensors("test", 8)
    assert len(train_labels) + len(test_labels) == len(all_labels) == 1797
    assert len(test_labels) == 450
    assert len(train_images) + len(test_images) == len(all_images)
    frac_all = torch.bincount(all_labels, minlength=10) / len(all_labels)
    frac_test = torch.bincount(test_labels, minlength=10) / len(test_labels)
    frac_train = torch.bincount(train_labels, minlength=10) / len(train_labels)
    assert (frac_test - frac_all).abs().max() < 0.01 and (frac_train - frac_all).abs().max() < 0.01


def test_digits_split_indices_are_fixed():
    from stepdistill.data.digits import _split_indices

    idx = _split_indices()
    assert not set(idx["train"]) & set(idx["test"])
    assert sorted(set(idx["train"]) | set(idx["test"])) == list(range(1797))
    # Pinned: the split must never change, or FD-digits numbers stop being comparable.
    assert idx["test"][:8].tolist() == [21, 24, 28, 34, 35, 37, 39, 42]
    train, _ = load_digits_tensors("train", 8)
    all_images, _ = load_digits_tensors("all", 8)
    torch.testing.assert_close(train, all_images[idx["train"]])


def test_digits_returns_copies():
    a, _ = load_digits_tensors("test", 16)
    a.fill_(0)
    b, _ = load_digits_tensors("test", 16)
    assert b.min() == -1


@pytest.mark.parametrize("resolution", [4, 7, 16.0, "16", True])
def test_digits_bad_resolution(resolution):
    with pytest.raises(ValueError, match=repr(resolution).strip("'")):
        load_digits_tensors("train", resolution)


def test_digits_bad_split():
    with pytest.raises(ValueError, match="valid"):
        load_digits_tensors("valid")
    with pytest.raises(ValueError, match="bogus"):
        DigitsDataset("bogus")


def test_digits_dataset_items():
    ds = DigitsDataset("test", 16)
    assert len(ds) == 450
    item = ds[3]
    assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].dim() == 0
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert batch["image"].shape == (8, 1, 16, 16) and batch["label"].shape == (8,)


# ---------------------------------------------------------------- toy 2-D


def test_gmm_centers():
    c8 = gmm_centers("gmm8")
    assert c8.shape == (8, 2)
    torch.testing.assert_close(c8.norm(dim=1), torch.full((8,), 2.0))
    c25 = gmm_centers("gmm25")
    assert c25.shape == (25, 2) and set(c25.flatten().tolist()) == {-2.0, -1.0, 0.0, 1.0, 2.0}
    with pytest.raises(ValueError, match="checkerboard"):
        gmm_centers("checkerboard")


@pytest.mark.parametrize("name", ["gmm8", "gmm25", "checkerboard", "two_moons"])
def test_sample_toy2d(name):
    x, labels = sample_toy2d(name, 2000, torch.Generator().manual_seed(0))
    assert x.shape == (2000, 2) and x.dtype == torch.float32
    assert labels.shape == (2000,) and labels.dtype == torch.int64
    assert x.abs().max() < 2.6
    x2, labels2 = sample_toy2d(name, 2000, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(labels, labels2)
    n_labels = {"gmm8": 8, "gmm25": 25, "checkerboard": 8, "two_moons": 2}[name]
    assert set(labels.tolist()) == set(range(n_labels))


def test_gmm_samples_near_their_centre():
    for name, std in [("gmm8", 0.1), ("gmm25", 0.05)]:
        x, labels = sample_toy2d(name, 5000, torch.Generator().manual_seed(1))
        err = x - gmm_centers(name)[labels]
        assert abs(err.std().item() - std) < 0.1 * std


def test_checkerboard_cells():
    x, labels = sample_toy2d("checkerboard", 4000, torch.Generator().manual_seed(0))
    assert x.min() >= -2 and x.max() <= 2
    cell = torch.floor(x + 2).long()  # (row, col) cell indices in 0..3
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()
    for k in range(8):  # each label is one cell
        assert len(torch.unique(cell[labels == k], dim=0)) == 1


def test_sample_toy2d_errors():
    with pytest.raises(ValueError, match=r"gmm8.*gmm25.*checkerboard.*two_moons"):
        sample_toy2d("swiss_roll", 10)
    with pytest.raises(ValueError, match="0"):
        sample_toy2d("gmm8", 0)


def test_toy2d_dataset():
    ds = Toy2DDataset("gmm8", 100, seed=3)
    assert len(ds) == 100
    item = ds[5]
    assert item["x"].shape == (2,) and item["label"].dim() == 0
    torch.testing.assert_close(Toy2DDataset("gmm8", 100, seed=3)[5]["x"], item["x"])


def test_mode_coverage():
    x, _ = sample_toy2d("gmm8", 1000, torch.Generator().manual_seed(0))
    frac, counts = mode_coverage(x, "gmm8")
    assert frac == 1.0 and counts.shape == (8,) and counts.sum() == 1000
    # Drop three modes.
    _, labels = sample_toy2d("gmm8", 1000, torch.Generator().manual_seed(0))
    frac, counts = mode_coverage(x[labels >= 3], "gmm8")
    assert frac == pytest.approx(5 / 8) and (counts[:3] == 0).all() and (counts[3:] > 0).all()
    # A collapsed generator hits one mode of the grid.
    frac, counts = mode_coverage(torch.zeros(50, 2), "gmm25")
    assert frac == pytest.approx(1 / 25) and counts.max() == 50
    frac, _ = mode_coverage(gmm_centers("gmm25") + 0.3, "gmm25")  # just outside the default radius
    assert frac == 0.0
    frac, _ = mode_coverage(gmm_centers("gmm25") + 0.3, "gmm25", radius=0.5)
    assert frac == 1.0
    with pytest.raises(ValueError, match="two_moons"):
        mode_coverage(x, "two_moons")
    with pytest.raises(ValueError, match="shape"):
        mode_coverage(torch.zeros(5, 3), "gmm8")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_sliced_wasserstein_properties():
    a, _ = sample_toy2d("gmm8", 1000, _gen(0))
    b, _ = sample_toy2d("gmm8", 1000, _gen(1))
    assert sliced_wasserstein(a, a, generator=_gen()) == 0.0
    d_ab = sliced_wasserstein(a, b, generator=_gen())
    assert d_ab == pytest.approx(sliced_wasserstein(b, a, generator=_gen()), rel=1e-6)
    shifted = [sliced_wasserstein(a, b + torch.tensor([s, 0.0]), generator=_gen()) for s in (0.5, 1.0, 2.0)]
    assert d_ab < shifted[0] < shifted[1] < shifted[2]
    # A shift by v of a point cloud gives a per-direction W2 of |<v, u>|: SW2 = |v| / sqrt(D).
    assert sliced_wasserstein(a, a + torch.tensor([1.0, 0.0]), n_proj=4096, generator=_gen()) == pytest.approx(
        1 / math.sqrt(2), rel=0.05
    )


def test_sliced_wasserstein_unequal_sizes():
    a, _ = sample_toy2d("gmm8", 1000, _gen(0))
    b, _ = sample_toy2d("gmm8", 600, _gen(1))
    d = sliced_wasserstein(a, b, generator=_gen())
    assert d == pytest.approx(sliced_wasserstein(b, a, generator=_gen()), rel=1e-6)
    assert 3 * d < sliced_wasserstein(a, b + 1.0, generator=_gen())  # shift by (1, 1): SW2 about 1
    assert sliced_wasserstein(a, a[::2], generator=_gen()) < d


@pytest.mark.parametrize("m", [0.5, 2.0])
def test_sliced_wasserstein_1d_gaussians(m):
    # With D = 1 every projection is +-1, so SW2 is the W2 distance of N(0, 1) and N(m, 1), i.e. |m|.
    x = torch.randn(20000, 1, generator=_gen(0), dtype=torch.float64)
    y = torch.randn(20000, 1, generator=_gen(1), dtype=torch.float64) + m
    assert sliced_wasserstein(x, y, n_proj=16, generator=_gen()) == pytest.approx(m, abs=0.03)
    assert sliced_wasserstein(x[:, 0], y[:15000, 0], n_proj=16, generator=_gen()) == pytest.approx(m, abs=0.03)


def test_sliced_wasserstein_errors():
    with pytest.raises(ValueError, match="point clouds"):
        sliced_wasserstein(torch.zeros(5, 2), torch.zeros(5, 3))


# ---------------------------------------------------------------- image folders


def _write_png(path, size=(40, 24), color=(255, 0, 0)):
    Image.new("RGB", size, color).save(path)


def test_image_folder_txt_captions(tmp_path):
    _write_png(tmp_path / "b.png", color=(0, 0, 255))
    _write_png(tmp_path / "a.png", size=(24, 40))
    (tmp_path / "a.txt").write_text("  a red square \n")
    (tmp_path / "notes.md").write_text("ignored")
    ds = ImageFolderDataset(tmp_path, resolution=16)
    assert len(ds) == 2 and [p.name for p in ds.files] == ["a.png", "b.png"]
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["caption"] == "a red square" and ds[1]["caption"] == ""
    torch.testing.assert_close(item["image"][:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(ds[1]["image"][:, 3, 3], torch.tensor([-1.0, -1.0, 1.0]))
    assert ImageFolderDataset(tmp_path, resolution=16, caption_source="none")[0]["caption"] == ""


def test_image_folder_center_crop(tmp_path):
    # Left half black, right half white: a centre crop of a 2:1 image keeps both halves equally.
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, 20:] = 255
    Image.fromarray(arr).save(tmp_path / "x.jpg", quality=100)
    img = ImageFolderDataset(tmp_path, resolution=10)[0]["image"]
    assert img.shape == (3, 10, 10) and img.min() >= -1 and img.max() <= 1
    assert img[:, :, :3].mean() < -0.9 and img[:, :, -3:].mean() > 0.9
    squashed = ImageFolderDataset(tmp_path, resolution=10, center_crop=False)[0]["image"]
    assert squashed.shape == (3, 10, 10)


def test_image_folder_metadata(tmp_path):
    for name in ("one.png", "two.webp", "three.jpeg"):
        Image.new("RGB", (12, 8)).save(tmp_path / name)
    (tmp_path / "two.txt").write_text("from txt")
    (tmp_path / "three.txt").write_text("fallback txt")
    lines = [{"file_name": "one.png", "text": "first"}, {"file_name": "two.webp", "text": "second"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    ds = ImageFolderDataset(tmp_path, resolution=8)
    assert dict(zip([p.name for p in ds.files], ds.captions, strict=True)) == {
        "one.png": "first", "three.jpeg": "fallback txt", "two.webp": "second"
    }  # fmt: skip
    meta_only = ImageFolderDataset(tmp_path, resolution=8, caption_source="metadata")
    assert meta_only.captions == ["first", "", "second"]
    txt_only = ImageFolderDataset(tmp_path, resolution=8, caption_source="txt")
    assert txt_only.captions == ["", "fallback txt", "from txt"]


def test_image_folder_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderDataset(missing, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        ImageFolderDataset(tmp_path / "empty", 16)
    _write_png(tmp_path / "a.png")
    with pytest.raises(ValueError, match="caption_source"):
        ImageFolderDataset(tmp_path, 16, caption_source="exif")
    with pytest.raises(ValueError, match="resolution"):
        ImageFolderDataset(tmp_path, 0)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:2"):
        ImageFolderDataset(tmp_path, 16)


# ---------------------------------------------------------------- prompt files


def test_load_prompts_txt(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("a cat\n\n   \n  a dog on a sofa  \n")
    assert load_prompts(p) == ["a cat", "a dog on a sofa"]


def test_load_prompts_jsonl(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"prompt": "one"}\n\n{"text": "two", "id": 3}\n{"caption": " three "}\n')
    assert load_prompts(str(p)) == ["one", "two", "three"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "one"}\n{"title": "two"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_prompts(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "one"\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:1"):
        load_prompts(broken)


def test_load_prompts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        load_prompts(tmp_path / "missing.txt")
    for name, text in [("empty.txt", "\n  \n"), ("empty.jsonl", "\n")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"empty prompt file.*{name}"):
            load_prompts(tmp_path / name)
    (tmp_path / "prompts.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"prompts\.csv"):
        load_prompts(tmp_path / "prompts.csv")
