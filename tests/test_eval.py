"""stepdistill.eval: FID / KID (torchmetrics), reference caches, CLIP score (open_clip), precision / recall,
and ``run_eval`` (sampling an exported pipeline or reading a folder; agreement with ``make demo``).

No Inception or CLIP weights are downloaded: FID/KID run on a small random conv feature module, the
Inception wrapper on a random weights file written here, CLIP on a tiny open_clip model registered and
fitted in the test."""

import itertools
import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from stepdistill.eval.fid import (
    INCEPTION_WEIGHTS_FILE,
    InceptionFeatures,
    ReferenceStats,
    StaleCacheError,
    center_crop_resize,
    extract_features,
    frechet_distance,
    kernel_distance,
    reference_stats,
    verify_reference_source,
)
from stepdistill.eval.precision_recall import knn_radii, precision_recall
from stepdistill.eval.run import run_eval

TINY_CLIP = "stepdistill-test-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


# ----------------------------------------------------------------------------------------------------------
# helpers and fixtures
# ----------------------------------------------------------------------------------------------------------


class ConvFeatures(nn.Module):
    """A small random conv net on uint8 images: (N, 3, H, W) -> (N, 8) float32."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.num_features = 8
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Conv2d(16, 8, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.requires_grad_(False).eval()

    def forward(self, x):
        return 10 * self.net(x.float() / 127.5 - 1)


@pytest.fixture(scope="module")
def conv():
    return ConvFeatures()


def noise_images(n, shift=0.0, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    return (128 + shift + 40 * torch.randn(n, 3, size, size, generator=g)).round().clamp(0, 255).to(torch.uint8)


def write_pngs(folder, images, prefix="img"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{prefix}{i:04d}.png")
    return folder


def scipy_fid(f1, f2):
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    return ((f1.mean(0) - f2.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)


# ----------------------------------------------------------------------------------------------------------
# FID / KID
# ----------------------------------------------------------------------------------------------------------


def test_fid_matches_torchmetrics_and_scipy(conv):
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = noise_images(200, seed=1), noise_images(150, shift=15, seed=2)
    f_real, f_fake = extract_features(real, conv, batch_size=64), extract_features(fake, conv, batch_size=64)
    ours = frechet_distance(f_real, f_fake)
    # the library's own computation, features extracted inside torchmetrics
    lib = FrechetInceptionDistance(feature=conv, normalize=False)
    lib.update(real, real=True)
    lib.update(fake, real=False)
    assert ours == pytest.approx(float(lib.compute()), rel=1e-5)
    assert ours == pytest.approx(scipy_fid(f_real, f_fake), rel=1e-6)
    assert ours > 0.01
    # float images in [-1, 1] are quantised with rounding to the same uint8 images
    assert torch.equal(extract_features(real.float() / 127.5 - 1, conv), f_real)
    # the statistics route (what the .npz cache stores) gives the same value
    assert frechet_distance(ReferenceStats.from_features(f_real), f_fake) == pytest.approx(ours, rel=1e-9)


def test_fid_of_a_set_with_itself_is_zero(conv):
    f = extract_features(noise_images(100), conv)
    assert abs(frechet_distance(f, f)) < 1e-9


def test_fid_grows_with_the_shift(conv):
    f_ref = extract_features(noise_images(200, seed=0), conv)
    fids = [frechet_distance(f_ref, extract_features(noise_images(200, s, seed=3), conv)) for s in (0, 8, 16, 32, 64)]
    assert all(a < b for a, b in itertools.pairwise(fids)), fids


def test_fid_too_few_samples():
    f = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"at least 9 generated samples, got 8"):
        frechet_distance(f, f[:8])
    with pytest.raises(ValueError, match=r"at least 9 reference samples, got 5"):
        frechet_distance(f[:5], f)


def test_kid_subset_size_and_values():
    g = torch.Generator().manual_seed(0)
    real, same, shifted = torch.randn(100, 8, generator=g), torch.randn(60, 8, generator=g), None
    shifted = torch.randn(60, 8, generator=g) + 1.0
    with pytest.raises(ValueError, match=r"subset_size=80 .* generated samples \(60\)"):
        kernel_distance(real, same, subsets=5, subset_size=80)
    with pytest.raises(ValueError, match=r"subset_size=200 .* reference samples \(100\)"):
        kernel_distance(real, same, subsets=5, subset_size=200)
    k_same = kernel_distance(real, same, subsets=20)  # default subset_size = min(1000, 100, 60) = 60
    k_shift = kernel_distance(real, shifted, subsets=20)
    assert abs(k_same[0]) < 0.1 * k_shift[0]
    assert kernel_distance(real, same, subsets=20, seed=0) == k_same  # seeded subsets


def test_center_crop_resize():
    img = torch.zeros(1, 3, 12, 20, dtype=torch.uint8)
    img[..., 4:16] = 200  # the centre 12x12 square
    out = center_crop_resize(img, 6)
    assert out.shape == (1, 3, 6, 6) and out.dtype == torch.uint8
    assert (out == 200).all()
    pil = Image.fromarray(np.full((10, 10, 3), 77, np.uint8))
    assert center_crop_resize([pil], 10).eq(77).all()


# ----------------------------------------------------------------------------------------------------------
# Inception weights
# ----------------------------------------------------------------------------------------------------------


def test_missing_inception_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError) as err:
        InceptionFeatures()
    msg = str(err.value)
    assert INCEPTION_WEIGHTS_FILE in msg and "--inception-weights" in msg and "allow_download=True" in msg
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in msg
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        InceptionFeatures(tmp_path / "nowhere.pth")
    folder = write_pngs(tmp_path / "imgs", noise_images(3))
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE):  # (pr: no minimum sample count)
        run_eval(str(folder), str(folder), str(tmp_path / "out"), num_samples=3, metrics=("pr",))


def random_inception_weights(folder):
    """Random weights of the right shapes, written as the torch-fidelity file would be (fp16)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi
    from torchmetrics.image.fid import NoTrainInceptionV3

    original = (tfi.load_state_dict_from_url, tfi.FeatureExtractorInceptionV3.load_state_dict)
    tfi.load_state_dict_from_url = lambda *a, **k: {}
    tfi.FeatureExtractorInceptionV3.load_state_dict = lambda self, *a, **k: None
    try:
        torch.manual_seed(0)
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    finally:
        tfi.load_state_dict_from_url, tfi.FeatureExtractorInceptionV3.load_state_dict = original
    path = folder / INCEPTION_WEIGHTS_FILE
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}, path)
    return path


def test_inception_from_a_local_weights_file(tmp_path, monkeypatch):
    path = random_inception_weights(tmp_path)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k))
    extractor = InceptionFeatures(path)
    assert loads == [True]  # opened here without unpickling code; torch-fidelity's weights_only=False load is unused
    feats = extract_features(noise_images(2, size=24), extractor)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    assert extractor.feature_id.startswith("torchmetrics-inception-v3-compat-pool3-antialias-")


def test_tf1_resize_equals_torch_fidelity_features(tmp_path):
    """--resize tf1 gives torch-fidelity's own features (its FeatureExtractorInceptionV3, same weights); the
    default torchmetrics resize differs from it even when upsampling small images (no TF1 equivalence)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = random_inception_weights(tmp_path)
    images = noise_images(2, size=24)
    u8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    fidelity = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    with torch.no_grad():
        expected = fidelity(u8)[0].float()
    tf1 = extract_features(u8, InceptionFeatures(path, resize="tf1"))
    scale = expected.abs().max()  # random weights: tiny features, so compare relative to their size
    assert scale > 0 and (tf1 - expected).abs().max() <= 1e-5 * scale
    default = extract_features(u8, InceptionFeatures(path))
    assert (default - expected).abs().max() > 1e-3 * scale
    with pytest.raises(ValueError, match="resize"):
        InceptionFeatures(path, resize="bicubic")


# ----------------------------------------------------------------------------------------------------------
# reference folders and the .npz cache
# ----------------------------------------------------------------------------------------------------------


def test_reference_cache_round_trip_and_stale_detection(tmp_path, conv, monkeypatch):
    import stepdistill.eval.fid as fid_mod

    folder = write_pngs(tmp_path / "ref", noise_images(12))
    cache = tmp_path / "cache"
    stats, path = reference_stats(folder, conv, cache_dir=cache)
    assert path.endswith(".npz") and path.split("-")[-1][:16] == stats.checksum[:16]
    expected = extract_features(noise_images(12), conv).double()
    np.testing.assert_allclose(stats.mu, expected.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(expected.numpy(), rowvar=False), rtol=1e-10, atol=1e-15)
    assert stats.n == 12 and stats.features.shape == (12, 8)

    # second call: served from the cache (no feature extraction) and identical after the round trip
    with monkeypatch.context() as m:
        m.setattr(fid_mod, "extract_features", lambda *a, **k: pytest.fail("cache not used"))
        again, path2 = reference_stats(folder, conv, cache_dir=cache)
    assert path2 == path
    for key in ("mu", "sigma", "features"):
        np.testing.assert_array_equal(getattr(again, key), getattr(stats, key))
    assert again.n == stats.n and again.meta == stats.meta

    # a changed image: new checksum, new cache file; the old file is recognised as stale
    write_pngs(folder, noise_images(1, seed=9), prefix="img")  # overwrites img0000.png
    fresh, path3 = reference_stats(folder, conv, cache_dir=cache)
    assert path3 != path and fresh.checksum != stats.checksum
    with pytest.raises(StaleCacheError, match="stale"):
        ReferenceStats.load(path, expected_checksum=fresh.checksum)
    with pytest.raises(StaleCacheError, match="changed"):
        verify_reference_source(ReferenceStats.load(path), path)
    assert verify_reference_source(ReferenceStats.load(path3), path3)
    # another feature extractor means another protocol, hence another cache file
    _, path4 = reference_stats(folder, ConvFeatures(seed=1), cache_dir=cache)
    assert path4 not in (path, path3)


def test_mixed_size_reference_folder(tmp_path, conv):
    folder = tmp_path / "mixed"
    write_pngs(folder, noise_images(2, size=16), prefix="a")
    write_pngs(folder, noise_images(1, size=20), prefix="b")
    with pytest.raises(ValueError, match=r"a0000\.png is 16x16 but .*b0000\.png is 20x20"):
        reference_stats(folder, conv, cache_dir=tmp_path / "cache")
    gen = write_pngs(tmp_path / "gen", noise_images(3))
    with pytest.raises(ValueError, match=r"a0000\.png is 16x16 but .*b0000\.png is 20x20"):
        run_eval(
            str(gen),
            str(folder),
            str(tmp_path / "out"),
            num_samples=3,
            metrics=("fid",),
            feature_extractor=conv,
            cache_dir=str(tmp_path / "cache"),
        )
    # the centre-crop protocol brings every image to one size
    stats, _ = reference_stats(folder, conv, cache_dir=tmp_path / "cache", center_crop_size=12)
    assert stats.n == 3


# ----------------------------------------------------------------------------------------------------------
# precision / recall
# ----------------------------------------------------------------------------------------------------------


def _modes(n_per_mode, modes, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0], [20.0, 20.0]])
    return torch.cat([centres[m] + torch.randn(n_per_mode, 2, generator=g) for m in modes])


def test_precision_recall():
    x = _modes(250, range(4), seed=0)
    r = knn_radii(x, k=3, chunk_size=100)
    brute = torch.cdist(x, x).sort(dim=1).values[:, 3]
    torch.testing.assert_close(r, brute)

    same = precision_recall(x, x, chunk_size=128)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    far = precision_recall(x, x + 1000.0)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    half = precision_recall(x, _modes(500, [0, 1], seed=1))
    assert half["precision"] > 0.95
    assert 0.45 < half["recall"] < 0.55
    other = precision_recall(x, _modes(250, range(4), seed=2))  # a fresh draw of the same distribution
    assert other["precision"] > 0.9 and other["recall"] > 0.9
    with pytest.raises(ValueError, match="dimensions differ"):
        precision_recall(x, torch.zeros(10, 3))


# ----------------------------------------------------------------------------------------------------------
# CLIP score
# ----------------------------------------------------------------------------------------------------------

COLOURS = {
    "red": (220, 20, 20),
    "green": (20, 200, 20),
    "blue": (20, 20, 220),
    "yellow": (230, 230, 20),
    "cyan": (20, 220, 220),
    "magenta": (220, 20, 220),
    "white": (240, 240, 240),
    "black": (10, 10, 10),
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny open_clip model fitted contrastively to 8 (solid colour, colour name) pairs; returns the name,
    the checkpoint path, the images in [-1, 1] and the captions."""
    import open_clip

    root = tmp_path_factory.mktemp("tiny_clip")
    cfg_path = root / f"{TINY_CLIP}.json"
    cfg_path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP)
    tokenizer = open_clip.get_tokenizer(TINY_CLIP)
    g = torch.Generator().manual_seed(0)
    u8 = torch.stack(
        [
            (torch.tensor(rgb).view(3, 1, 1) + 8 * torch.randn(3, 32, 32, generator=g)).round().clamp(0, 255)
            for rgb in COLOURS.values()
        ]
    ).to(torch.uint8)
    captions = [f"a {name} picture" for name in COLOURS]
    pixels = torch.stack([preprocess(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in u8])
    tokens = tokenizer(captions)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    target = torch.arange(len(captions))
    model.train()
    for _ in range(40):
        img = nn.functional.normalize(model.encode_image(pixels), dim=-1)
        txt = nn.functional.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        loss = (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = root / "tiny_clip.pt"
    torch.save(model.state_dict(), ckpt)
    return TINY_CLIP, str(ckpt), u8.float() / 127.5 - 1, captions


def test_clip_score_prefers_matching_captions(tiny_clip):
    from stepdistill.eval.clip_score import CLIPScorer

    name, ckpt, images, captions = tiny_clip
    scorer = CLIPScorer(name, pretrained=ckpt, batch_size=3)
    matched = scorer.score(images, captions)
    shuffled = scorer.score(images, captions[1:] + captions[:1])
    assert set(matched) == {"clip_cosine", "clip_score_100", "per_sample", "num_samples"}
    assert matched["num_samples"] == 8 and len(matched["per_sample"]) == 8
    assert matched["clip_cosine"] == pytest.approx(np.mean(matched["per_sample"]))
    assert matched["clip_score_100"] == pytest.approx(max(100 * matched["clip_cosine"], 0))
    assert matched["clip_cosine"] > shuffled["clip_cosine"] + 0.2
    assert all(m > s for m, s in zip(matched["per_sample"], shuffled["per_sample"]))
    # every image retrieves its own caption among the 8
    sims = scorer.image_embeddings(images) @ scorer.text_embeddings(captions).T
    assert torch.equal(sims.argmax(1), torch.arange(8))
    # [-1, 1] floats and the uint8 images they round to are scored identically
    u8 = ((images + 1) * 127.5).round().to(torch.uint8)
    torch.testing.assert_close(scorer.cosines(u8, captions), scorer.cosines(images, captions))


def test_clip_missing_checkpoint(tiny_clip, tmp_path):
    from stepdistill.eval.clip_score import CLIPScorer

    with pytest.raises(FileNotFoundError, match="no_such_clip.bin"):
        CLIPScorer(tiny_clip[0], pretrained=tmp_path / "no_such_clip.bin")


# ----------------------------------------------------------------------------------------------------------
# run_eval
# ----------------------------------------------------------------------------------------------------------


def test_run_eval_on_image_folders(tmp_path, conv, tiny_clip):
    name, ckpt, images, captions = tiny_clip
    ref = write_pngs(tmp_path / "ref", noise_images(40, seed=0, size=32))
    gen = write_pngs(tmp_path / "gen", noise_images(24, shift=30, seed=5, size=32))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(captions) + "\n")
    common = dict(feature_extractor=conv, cache_dir=str(tmp_path / "cache"), kid_subsets=10)
    out = run_eval(
        str(gen),
        str(ref),
        str(tmp_path / "out"),
        num_samples=20,
        batch_size=8,
        prompts=str(prompts),
        metrics=("fid", "kid", "pr", "clip"),
        clip_model=name,
        clip_pretrained=ckpt,
        **common,
    )
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved == out
    assert out["pipeline_kind"] == "folder" and out["num_samples"] == 20 and out["reference_num_samples"] == 40
    assert out["kid"]["subset_size"] == 20 and out["fid"] > 0.01
    assert {"precision", "recall", "clip_cosine", "clip_score_100"} <= set(out)
    per_sample = json.loads((tmp_path / "out" / "clip_per_sample.json").read_text())
    assert len(per_sample) == 20 and np.mean(per_sample) == pytest.approx(out["clip_cosine"])
    assert (tmp_path / "out" / "samples.png").stat().st_size > 0
    # the same (first 20, sorted) generated images, scored directly
    f_gen = extract_features(noise_images(24, shift=30, seed=5, size=32)[:20], conv)
    f_ref = extract_features(noise_images(40, seed=0, size=32), conv)
    assert out["fid"] == pytest.approx(frechet_distance(f_ref, f_gen), rel=1e-6)

    # the cached .npz as reference gives the same numbers; a folder scored against itself gives FID ~ 0
    again = run_eval(
        str(gen),
        out["reference_stats"],
        str(tmp_path / "out2"),
        num_samples=20,
        batch_size=8,
        metrics=("fid", "kid", "pr"),
        **common,
    )
    assert again["reference_kind"] == "npz" and again["reference_source_verified"]
    assert again["fid"] == pytest.approx(out["fid"], rel=1e-9) and again["kid"] == out["kid"]
    # a foreign .npz (mu and sigma only, as pytorch-fid / clean-fid / EDM write them) works for FID, with a warning
    ref_stats = ReferenceStats.load(out["reference_stats"])
    np.savez(tmp_path / "foreign.npz", mu=ref_stats.mu, sigma=ref_stats.sigma)
    with pytest.warns(UserWarning, match="no protocol metadata"):
        foreign = run_eval(
            str(gen), str(tmp_path / "foreign.npz"), str(tmp_path / "out4"), num_samples=20, metrics=("fid",), **common
        )
    assert foreign["fid"] == pytest.approx(out["fid"], rel=1e-9) and foreign["reference_num_samples"] is None
    self_eval = run_eval(str(ref), str(ref), str(tmp_path / "out3"), num_samples=40, metrics=("fid", "pr"), **common)
    assert abs(self_eval["fid"]) < 1e-8 and self_eval["precision"] == self_eval["recall"] == 1.0

    # too few samples for the KID subset / for FID; a stale .npz
    with pytest.raises(ValueError, match=r"subset_size=30 .* generated samples \(20\)"):
        run_eval(
            str(gen), str(ref), str(tmp_path / "o"), num_samples=20, metrics=("kid",), kid_subset_size=30, **common
        )
    with pytest.raises(ValueError, match="at least 9 generated samples, got 5"):
        run_eval(str(gen), str(ref), str(tmp_path / "o"), num_samples=5, metrics=("fid",), **common)
    with pytest.raises(ValueError, match="fewer than num_samples=30"):
        run_eval(str(gen), str(ref), str(tmp_path / "o"), num_samples=30, metrics=("fid",), **common)
    write_pngs(ref, noise_images(1, seed=7, size=32))
    with pytest.raises(StaleCacheError, match="changed"):
        run_eval(str(gen), out["reference_stats"], str(tmp_path / "o"), num_samples=20, metrics=("fid",), **common)


def test_run_eval_empty_prompt_file(tmp_path, conv):
    gen = write_pngs(tmp_path / "gen", noise_images(3))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty prompt file"):
        run_eval(
            str(gen),
            None,
            str(tmp_path / "out"),
            num_samples=3,
            prompts=str(empty),
            metrics=("clip",),
            clip_model=TINY_CLIP,
        )
    with pytest.raises(ValueError, match="needs a prompt file"):
        run_eval(str(gen), None, str(tmp_path / "out"), num_samples=3, metrics=("clip",), clip_model=TINY_CLIP)
    with pytest.raises(ValueError, match="unknown metrics"):
        run_eval(str(gen), "digits", str(tmp_path / "out"), metrics=("fidd",))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from stepdistill.demo import run_demo

    root = tmp_path_factory.mktemp("demo")
    return root, run_demo(str(root), max_steps=3, num_samples=100)


@pytest.mark.slow
def test_eval_reproduces_the_demo_fd_digits(demo, tmp_path):
    from accelerate import Accelerator

    root, demo_metrics = demo
    out = run_eval(str(root / "pipeline"), "digits", str(tmp_path / "eval"), num_samples=100, accelerator=Accelerator())
    assert out["pipeline_kind"] == "class" and out["metrics"] == ["fd_digits"]
    assert out["fd_digits"] == pytest.approx(demo_metrics["fd_digits"]["student@1"], abs=1e-6)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["fd_digits"] == out["fd_digits"]
    assert (tmp_path / "eval" / "samples.png").stat().st_size > 0
    with pytest.raises(ValueError, match="at least 65 generated images"):
        run_eval(str(root / "pipeline"), "digits", str(tmp_path / "eval2"), num_samples=50)


@pytest.mark.slow
def test_sharded_sampling_matches_one_process(demo):
    """A process whose shard starts later replays the noise stream (here with a 2-step LCM schedule, so the
    scheduler's own noise draws between steps count too) and produces the same samples as one process."""
    from stepdistill.eval.run import _PipelineSource

    root, _ = demo
    source = _PipelineSource(root / "pipeline", "cpu", seed=3, batch_size=7)
    source.pipe.register_to_config(trained_timesteps=[999, 499])
    chunks = [(c, s, min(s + 7, 25)) for c, s in enumerate(range(0, 25, 7))]
    source.start(chunks)
    full = [source.images(c, s, e, None) for c, s, e in chunks]
    source.start(chunks[2:])  # the second of two processes
    tail = [source.images(c, s, e, None) for c, s, e in chunks[2:]]
    for a, b in zip(full[2:], tail):
        assert torch.equal(a, b)
    assert not torch.equal(full[0][:4], full[1][:4])


def test_run_eval_text_pipeline(tmp_path, conv, tiny_clip):
    from tiny_models import save_tiny_pipeline, tiny_sd_components

    from stepdistill.pipelines import StepDistillSDPipeline

    pipe_dir = save_tiny_pipeline(tiny_sd_components(tmp_path), StepDistillSDPipeline, tmp_path / "pipe")
    ref = write_pngs(tmp_path / "ref", noise_images(12, size=32))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": c}) + "\n" for c in tiny_clip[3][:3]))
    kwargs = dict(
        num_samples=10,
        batch_size=4,
        prompts=str(prompts),
        metrics=("fid", "clip"),
        clip_model=tiny_clip[0],
        clip_pretrained=tiny_clip[1],
        feature_extractor=conv,
        cache_dir=str(tmp_path / "cache"),
    )
    out = run_eval(pipe_dir, str(ref), str(tmp_path / "out"), **kwargs)
    assert out["pipeline_kind"] == "text" and out["num_samples"] == 10
    per_sample = json.loads((tmp_path / "out" / "clip_per_sample.json").read_text())
    assert len(per_sample) == 10 and np.isfinite(out["fid"])
    again = run_eval(pipe_dir, str(ref), str(tmp_path / "out2"), **kwargs)  # same seed, same samples
    assert again["fid"] == out["fid"] and again["clip_cosine"] == out["clip_cosine"]
    with pytest.raises(ValueError, match="text-to-image pipeline: pass a prompt file"):
        run_eval(pipe_dir, str(ref), str(tmp_path / "out3"), **{**kwargs, "prompts": None, "metrics": ("fid",)})
