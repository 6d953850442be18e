"""Data at scale: webdataset tar shards and saved Hugging Face datasets streamed to the trainers, split over
processes and dataloader workers exactly once per epoch, with the reading position in the checkpoint; bad data
skipped and counted; the latent / text-embedding cache; host memory that does not grow with the dataset."""

from __future__ import annotations

import collections
import io
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from tiny_models import save_tiny_pipeline, tiny_sd_components

from stepdistill.config import ConfigError, build_config
from stepdistill.data.shards import (
    BadDataWarning,
    HFShards,
    ImageDecoder,
    ShardStream,
    TarShards,
    expand_shards,
    open_stream,
)
from stepdistill.trainers.consistency import ConsistencyConfig, ConsistencyTrainer
from stepdistill.trainers.dmd2 import DMD2Config, DMD2Trainer

HERE = os.path.dirname(os.path.abspath(__file__))
SIDE = 8  # latent side of the tiny UNet; its VAE has 2 blocks: 16 px images


def _png(value: int, size=(20, 24)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((*size, 3), value % 251, dtype=np.uint8)).save(buf, format="png")
    return buf.getvalue()


def write_shards(root, n_shards: int, per_shard: int, size=(20, 24)) -> str:
    """``n_shards`` webdataset tars of ``per_shard`` PNG + caption samples (keys 000000, 000001, ...)."""
    import webdataset as wds

    os.makedirs(root, exist_ok=True)
    k = 0
    for s in range(n_shards):
        with wds.TarWriter(os.path.join(root, f"{s:05d}.tar")) as w:
            for _ in range(per_shard):
                w.write({"__key__": f"{k:06d}", "png": _png(k, size), "txt": f"a cat number {k}".encode()})
                k += 1
    return f"shards:{root}/{{00000..{n_shards - 1:05d}}}.tar"


def write_hf(root, n: int) -> str:
    import datasets

    images = [Image.fromarray(np.full((20, 24, 3), k % 251, dtype=np.uint8)) for k in range(n)]
    ds = datasets.Dataset.from_dict({"image": images, "text": [f"a dog number {k}" for k in range(n)]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(root))
    return f"hf:{root}"


def write_image_folder(root, n: int) -> str:
    """An image folder with metadata.jsonl, read by datasets.load_dataset(streaming=True) (not a saved dataset)."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
        for k in range(n):
            with open(os.path.join(root, f"{k:04d}.png"), "wb") as img:
                img.write(_png(k))
            f.write(json.dumps({"file_name": f"{k:04d}.png", "text": f"a bird number {k}"}) + "\n")
    return f"hf:{root}"


@pytest.fixture(scope="module")
def sd_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_teacher")
    return save_tiny_pipeline(tiny_sd_components(root / "src"), StableDiffusionPipeline, root / "sd")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "shards": write_shards(root / "shards", 8, 6),
        "hf": write_hf(root / "hf", 48),
        "hf_folder": write_image_folder(root / "hf_folder", 12),
    }


def _keys_of_epoch(ds, slots):
    seen = collections.Counter()
    for slot in range(slots):
        for pos, item in ds.samples(slot, slots):
            if pos[0] > 0:
                break
            if item is not None:  # None: a bad sample or shard, skipped
                seen[item["_key"]] += 1
    return seen


@pytest.mark.parametrize("n_shards", [8, 3])
def test_every_slot_reads_its_part_and_the_parts_cover_an_epoch_once(tmp_path, n_shards):
    """4 slots (2 processes x 2 workers) over 8 shards (a shard each) or 3 (fewer shards than slots: split by
    sample): every key once in epoch 0; epoch 1 reads them in another order."""
    spec = write_shards(tmp_path, n_shards, 6)
    ds = ShardStream(TarShards(expand_shards(spec[7:])), ImageDecoder(16), spec=spec, shuffle_window=4)
    seen = _keys_of_epoch(ds, 4)
    assert sorted(seen) == [f"{k:06d}" for k in range(n_shards * 6)] and set(seen.values()) == {1}
    stream = list(itertools.islice(ds.samples(0, 4), n_shards * 6 // 2))  # two epochs of slot 0
    first = [item["_key"] for pos, item in stream if pos[0] == 0]
    later = [item["_key"] for pos, item in stream if pos[0] == 1]
    assert later and later != first  # another shard order (and window order) each epoch


def test_a_datasets_folder_splits_like_shards(sources):
    ds = ShardStream(HFShards(sources["hf"][3:]), ImageDecoder(16), spec=sources["hf"])
    seen = _keys_of_epoch(ds, 4)
    assert sorted(seen, key=int) == [str(k) for k in range(48)] and set(seen.values()) == {1}
    item = next(ds.samples(0, 1))[1]
    assert item["image"].shape == (3, 16, 16) and item["caption"].startswith("a dog number")
    # a folder datasets.load_dataset streams (an image folder with metadata.jsonl: one part, split by sample)
    ds = ShardStream(open_stream(sources["hf_folder"]), ImageDecoder(16), spec=sources["hf_folder"])
    seen = _keys_of_epoch(ds, 4)
    assert sorted(seen) == [f"{k:04d}.png" for k in range(12)] and set(seen.values()) == {1}


def _dmd2(teacher, dataset, out, **kw):
    base = dict(
        output_dir=str(out), teacher=teacher, dataset=dataset, resolution=SIDE, max_steps=2, global_batch=3,
        dfake_gen_update_ratio=1, denoising_timesteps=[999, 499], backward_simulation=False,
        gan_generator_weight=5e-3, gan_discriminator_weight=1e-2, lora_rank=4, lora_alpha=8.0, learning_rate=1e-3,
        checkpoint_every=0, progress=False, data_workers=2, shuffle_window=4,
    )  # fmt: skip
    base.update(kw)
    return DMD2Trainer(build_config(DMD2Config, base))


def _lcm(teacher, dataset, out, **kw):
    base = dict(
        output_dir=str(out), teacher=teacher, dataset=dataset, resolution=SIDE, mode="lcm", num_ddim_timesteps=10,
        inference_steps=1, max_steps=2, global_batch=3, lora_rank=4, lora_alpha=8.0, generator_mode="lora",
        checkpoint_every=0, progress=False, data_workers=2, shuffle_window=4,
    )  # fmt: skip
    base.update(kw)
    return ConsistencyTrainer(build_config(ConsistencyConfig, base))


def _record_keys(trainer) -> list:
    """Set the trainer up and record the sample keys of every batch it trains on."""
    trainer.setup()
    keys, encode = [], trainer.dataset.on_batch

    def record(batch):
        keys.append(list(batch["_n"]))
        return encode(batch) if encode is not None else batch

    trainer.dataset.on_batch = record
    return keys


@pytest.mark.parametrize("source", ["shards", "hf", "hf_folder"])
@pytest.mark.parametrize("make", [_dmd2, _lcm], ids=["dmd2", "lcm"])
def test_dmd2_and_lcm_train_two_iterations_from_a_stream(sd_teacher, sources, tmp_path, source, make):
    trainer = make(sd_teacher, sources[source], tmp_path)
    keys = _record_keys(trainer)
    before = {n: p.detach().clone() for n, p in trainer.generator.net.named_parameters() if p.requires_grad}
    trainer.train()
    losses = [h.get("loss", h.get("loss/generator")) for h in trainer.history]
    assert len(losses) == 2 and all(np.isfinite(v) for v in losses)
    assert len(keys) == 2 and all(len(k) == 3 for k in keys) and len({*keys[0], *keys[1]}) == 6
    after = dict(trainer.generator.net.named_parameters())
    assert any(not torch.equal(v, after[n]) for n, v in before.items()), "the generator did not train"
    batch = trainer.dataset.example(2)  # the sample-grid batch: real latents of the generator's shape
    assert tuple(batch["image"].shape[1:]) == trainer.sample_shape


def test_resume_reads_on_where_the_checkpoint_stopped(sd_teacher, sources, tmp_path):
    """2 workers: a run stopped at step 2 and resumed to step 5 trains on the same batches, in the same order,
    as an uninterrupted 5-step run, and reaches the same loss curve."""
    full = _dmd2(sd_teacher, sources["shards"], tmp_path / "full", max_steps=5)
    full_keys = _record_keys(full)
    full.train()
    part = _dmd2(sd_teacher, sources["shards"], tmp_path / "part", max_steps=2, checkpoint_every=2)
    part_keys = _record_keys(part)
    part.train()
    state = torch.load(tmp_path / "part" / "checkpoints" / "step_0000002" / "rng_0.pt", weights_only=True)
    assert state["sampler_consumed"]["batches"] == 2 and len(state["sampler_consumed"]["pos"]) == 2
    rest = _dmd2(sd_teacher, sources["shards"], tmp_path / "part", max_steps=5, resume="latest")
    rest_keys = _record_keys(rest)
    rest.train()
    assert part_keys + rest_keys == full_keys
    a = [h["loss/generator"] for h in full.history]
    b = [h["loss/generator"] for h in part.history + rest.history]
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-6, rtol=0)


def test_a_changed_worker_count_is_refused_at_resume(sd_teacher, sources, tmp_path):
    _dmd2(sd_teacher, sources["shards"], tmp_path, max_steps=1, checkpoint_every=1).train()
    with pytest.raises(ConfigError, match="data_workers"):
        _dmd2(sd_teacher, sources["shards"], tmp_path, max_steps=2, resume="latest", data_workers=1).setup()


DDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {here!r})
from test_data_scale import _dmd2, _record_keys
trainer = _dmd2({teacher!r}, {dataset!r}, {out!r}, max_steps=2, global_batch=6)
keys = _record_keys(trainer)
trainer.train()
more = iter(trainer.loader)  # a new iterator goes on from the recorded positions, as a resume does
for _ in range(6):  # recorded by _record_keys
    next(more)
rank = trainer.accelerator.process_index
with open(os.path.join({out!r}, f"keys{{rank}}.json"), "w") as f:
    json.dump({{"world": trainer.accelerator.num_processes, "keys": keys}}, f)
"""


def test_two_processes_with_two_workers_each_read_every_sample_once(sd_teacher, sources, tmp_path):
    """accelerate launch, 2 CPU processes x 2 workers, 8 shards of 6: 2 training steps of DMD2 then 6 more batches
    per process (3 samples each) are exactly one epoch: every key once over both processes."""
    out = str(tmp_path)
    script = tmp_path / "ddp_keys.py"
    script.write_text(DDP_SCRIPT.format(here=HERE, teacher=sd_teacher, dataset=sources["shards"], out=out))
    path = os.pathsep.join([HERE, os.path.dirname(HERE)])
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(29600 + os.getpid() % 1000), str(script),
    ]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    per_rank = [json.load(open(tmp_path / f"keys{rank}.json")) for rank in (0, 1)]
    assert all(p["world"] == 2 for p in per_rank)
    seen = collections.Counter(k for p in per_rank for batch in p["keys"] for k in batch)
    assert sorted(seen) == [f"{k:06d}" for k in range(48)] and set(seen.values()) == {1}


# --------------------------------------------------------------------------------------------------------------
# bad data
# --------------------------------------------------------------------------------------------------------------


def write_bad_shards(root) -> str:
    """4 good shards of 6, then: one with a corrupt image and a sample without caption, an empty one, and a file
    that is not a tar at all (shards 00004, 00005, 00006)."""
    import webdataset as wds

    spec = write_shards(root, 4, 6)
    with wds.TarWriter(os.path.join(root, "00004.tar")) as w:
        w.write({"__key__": "corrupt", "png": b"\x89PNG not really", "txt": b"a broken cat"})
        w.write({"__key__": "nocaption", "png": _png(3)})
        w.write({"__key__": "fine", "png": _png(4), "txt": b"a fine cat"})
    with wds.TarWriter(os.path.join(root, "00005.tar")):
        pass
    with open(os.path.join(root, "00006.tar"), "wb") as f:
        f.write(b"this is not a tar archive" * 40)
    return spec.replace("00003}", "00006}")


def test_bad_samples_and_shards_are_skipped_with_a_warning_naming_them(tmp_path):
    spec = write_bad_shards(tmp_path)
    ds = ShardStream(TarShards(expand_shards(spec[7:])), ImageDecoder(16), spec=spec, workers=0, shuffle_window=4)
    with pytest.warns(BadDataWarning) as caught:
        seen = _keys_of_epoch(ds, 1)
    assert sorted(seen) == sorted([f"{k:06d}" for k in range(24)] + ["fine"]) and set(seen.values()) == {1}
    messages = sorted(str(w.message) for w in caught)
    root = str(tmp_path)
    expected = [
        f"shard {root}/00004.tar key 'corrupt': image does not decode",
        f"shard {root}/00004.tar key 'nocaption': no caption",
        f"shard {root}/00005.tar: is empty",
        f"shard {root}/00006.tar: cannot be read (ReadError",
    ]
    assert len(messages) == 4 and all(m.startswith("skipped bad data: " + e) for m, e in zip(messages, expected))
    # a batch stream counts them (once each, every epoch after the first sees them again unreported)
    reader = ds.reader(4, 0, 1, 0)
    with pytest.warns(BadDataWarning):
        batches = [b for _, b in zip(range(20), reader)]
    assert len(batches) == 20 and len(reader.consumed["bad"]["0"]) == 4


def test_too_much_bad_data_stops_the_run_with_one_line_and_keeps_what_was_trained(sd_teacher, tmp_path, capsys):
    """max_bad_samples=0: the first bad sample stops the run (one error line, exit 2) after the checkpoints of the
    steps before it (seed 5 reads the mixed shard last: 8 steps on the 24 good samples); a resume with a higher
    limit (a safe change) goes on from the latest one."""
    from stepdistill.cli import main

    spec = write_bad_shards(tmp_path / "data").replace("00006}", "00004}")  # 4 good shards and the mixed one
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"method: dmd2\nteacher: {sd_teacher}\ndataset: '{spec}'\nresolution: {SIDE}\nglobal_batch: 3\n"
        f"seed: 5\nmax_steps: 9\ncheckpoint_every: 1\ncheckpoints_total_limit: 100\ndata_workers: 0\n"
        f"output_dir: {tmp_path / 'run'}\nprogress: false\ndenoising_timesteps: [999]\nlora_rank: 4\n"
    )
    with pytest.warns(BadDataWarning, match="00004.tar key '(corrupt|nocaption)'"):
        code = main(["train", "--config", str(recipe), "max_bad_samples=0"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert code == 2 and len(err) == 1, err  # one line, no traceback
    assert err[0].startswith("error: dataset: more than max_bad_samples=0 bad samples or shards in 'shards:"), err
    from stepdistill.trainers.base import checkpoint_problem, list_checkpoints

    kept = list_checkpoints(str(tmp_path / "run"))
    assert len(kept) == 8 and all(checkpoint_problem(p) is None for p in kept)
    with pytest.warns(BadDataWarning):
        assert main(["train", "--config", str(recipe), "max_bad_samples=5", "resume=latest"]) == 0
    assert len(list_checkpoints(str(tmp_path / "run"))) == 9


# --------------------------------------------------------------------------------------------------------------
# the latent and text-embedding cache
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def latent_cache(sd_teacher, sources, tmp_path_factory):
    from stepdistill.cli import main

    out = str(tmp_path_factory.mktemp("cache") / "latents")
    assert (
        main(["cache", "--teacher", sd_teacher, "--dataset", sources["shards"], "--out", out, "--batch-size", "4"]) == 0
    )
    return out


def test_the_cache_holds_the_latents_and_embeddings_the_trainer_would_compute(
    sd_teacher, sources, latent_cache, capsys
):
    from safetensors.torch import load_file

    from stepdistill.data.cache import load_encoders, read_index
    from stepdistill.data.folders import decode_image
    from stepdistill.trainers.student import _encode_images

    index = read_index(latent_cache)
    assert index["samples"] == 48 and len(index["shards"]) == 8 and index["latent_shape"] == [4, SIDE, SIDE]
    vae, cond, pixels = load_encoders(sd_teacher)
    assert pixels == 16
    shard = load_file(os.path.join(latent_cache, "00003.safetensors"))
    assert shard["latents"].shape == (6, 4, SIDE, SIDE) and shard["emb.ehs"].shape[0] == 6
    # sample 000018 is the first of shard 3: its PNG and caption, encoded as the trainers encode them
    expected = _encode_images(vae, decode_image(_png(18), 16)[None])
    torch.testing.assert_close(shard["latents"][:1], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shard["emb.ehs"][:1], cond._encode_rows(["a cat number 18"])["ehs"], atol=1e-6, rtol=0)
    # resumable: a second run keeps every finished shard
    from stepdistill.cli import main

    before = {f: os.path.getmtime(os.path.join(latent_cache, f)) for f in os.listdir(latent_cache)}
    assert main(["cache", "--teacher", sd_teacher, "--dataset", sources["shards"], "--out", latent_cache]) == 0
    assert "process 0 of 1: 0 shard(s) encoded, 8 kept from an earlier run" in capsys.readouterr().out
    assert all(os.path.getmtime(os.path.join(latent_cache, f)) == t for f, t in before.items() if f != "index.json")


@pytest.mark.parametrize("make", [_dmd2, _lcm], ids=["dmd2", "lcm"])
def test_dmd2_and_lcm_train_from_the_cache_without_running_the_encoders(sd_teacher, latent_cache, tmp_path, make):
    trainer = make(sd_teacher, f"latents:{latent_cache}", tmp_path)
    trainer.setup()
    encoded = []
    encode_rows = trainer.conditioner._encode_rows
    trainer.conditioner._encode_rows = lambda prompts: encoded.extend(prompts) or encode_rows(prompts)
    trainer.vae.encode = None  # the VAE encoder is not needed: calling it would fail
    trainer.train()
    assert len(trainer.history) == 2
    assert set(encoded) <= {""}, encoded  # only the null prompt (SD's unconditional branch)


def test_a_stale_cache_is_refused(sd_teacher, latent_cache, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "other_teacher"
    shutil.copytree(sd_teacher, other)
    vae_file = other / "vae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(vae_file)
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01
    save_file(weights, vae_file)
    with pytest.raises(ConfigError, match=r"latent cache .* is stale: .*\(vae weights\)"):
        _dmd2(str(other), f"latents:{latent_cache}", tmp_path / "run").setup()
    with pytest.raises(ConfigError, match=r"is stale: .*pixels 16 -> 32"):
        _dmd2(sd_teacher, f"latents:{latent_cache}", tmp_path / "run2", resolution=16).setup()
    with pytest.raises(ConfigError, match="cache_text_embeddings: true .* the cache already holds the embeddings"):
        _dmd2(sd_teacher, f"latents:{latent_cache}", tmp_path / "run4", cache_text_embeddings=True).setup()
    with pytest.raises(ConfigError, match="not a finished latent cache"):
        _dmd2(sd_teacher, f"latents:{tmp_path}", tmp_path / "run3").setup()


# --------------------------------------------------------------------------------------------------------------
# host memory does not grow with the dataset
# --------------------------------------------------------------------------------------------------------------


def _peak_rss_while_training(trainer) -> int:
    """Peak RSS of this process and its loader workers, sampled every 20 ms from the 5th iteration on."""
    import threading
    import time

    import psutil

    me, samples, done = psutil.Process(), [], threading.Event()

    def rss():
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass  # a worker that just ended
        return total

    def watch():
        while not done.is_set():
            samples.append((trainer.global_step, rss()))
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        trainer.train()
    finally:
        done.set()
        thread.join()
    return max(r for step, r in samples if step >= 5)


RSS_SCRIPT = """
import json, sys
sys.path.insert(0, {here!r})
from test_data_scale import _dmd2, _peak_rss_while_training

trainer = _dmd2({teacher!r}, {dataset!r}, {out!r}, max_steps=50, global_batch=2, gan_generator_weight=0.0,
                gan_discriminator_weight=0.0, denoising_timesteps=[999], progress=False)
peak = _peak_rss_while_training(trainer)
assert trainer.global_step == 50
print(json.dumps({{"peak": peak}}))
"""


def _write_noise_shards(root, n_shards, per_shard):
    import webdataset as wds

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    k = 0
    for s in range(n_shards):
        with wds.TarWriter(os.path.join(root, f"{s:05d}.tar")) as w:
            for _ in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="png")
                w.write({"__key__": f"{k:06d}", "png": buf.getvalue(), "txt": f"noise {k}".encode()})
                k += 1
    return f"shards:{root}/{{00000..{n_shards - 1:05d}}}.tar"


def test_host_memory_while_training_from_shards_does_not_grow_with_the_dataset(sd_teacher, tmp_path):
    """5,000 and 500 noise images (32 px PNG, 3 kB each: 15 MB of encoded images, 20 MB as decoded pixels +
    latents), each in 20 shards: the peak RSS of the process and its 2 loader workers over 50 DMD2 iterations (batch 2,
    no GAN: the data path is what is measured) of the
    large set is within 8 MiB of the small set's (measured: see the printout)."""
    peaks = {}
    for n in (500, 5000):  # each in a fresh process: nothing left over from the other run
        spec = _write_noise_shards(tmp_path / f"d{n}", 20, n // 20)
        script = tmp_path / f"rss{n}.py"
        script.write_text(RSS_SCRIPT.format(here=HERE, teacher=sd_teacher, dataset=spec, out=str(tmp_path / f"r{n}")))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([HERE, os.path.dirname(HERE)])}
        r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
        peaks[n] = json.loads(r.stdout.strip().splitlines()[-1])["peak"]
    mib = {n: round(p / 2**20, 1) for n, p in peaks.items()}
    print(f"peak RSS (process + loader workers) over 50 iterations: 500 images {mib[500]} MiB, 5000 {mib[5000]} MiB")
    assert peaks[5000] <= peaks[500] + 8 * 2**20, mib


def test_the_cache_command_on_two_processes_writes_the_same_cache(sd_teacher, sources, latent_cache, tmp_path):
    """accelerate launch, 2 CPU processes: shard i on process i mod 2; the files equal the 1-process cache's."""
    from safetensors.torch import load_file

    out = str(tmp_path / "latents2")
    path = os.pathsep.join([HERE, os.path.dirname(HERE)])
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(29700 + os.getpid() % 1000), "-m", "stepdistill.cli", "cache",
        "--teacher", sd_teacher, "--dataset", sources["shards"], "--out", out, "--batch-size", "4",
    ]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    for rank in (0, 1):
        assert f"process {rank} of 2: 4 shard(s) encoded, 0 kept" in r.stdout, r.stdout
    one, two = (json.load(open(os.path.join(d, "index.json"))) for d in (latent_cache, out))
    assert two["shards"] == one["shards"] and two["fingerprint"] == one["fingerprint"]
    for s in one["shards"]:
        a, b = load_file(os.path.join(latent_cache, s["file"])), load_file(os.path.join(out, s["file"]))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), s["file"]


def test_an_sdxl_cache_holds_both_embeddings_and_trains(sources, tmp_path):
    """SDXL: the cache keeps the hidden states and the pooled embedding (from an hf: image folder); DMD2 trains from
    it without running a text encoder (SDXL's null branch is zeros)."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file
    from tiny_models import tiny_sdxl_components

    from stepdistill.cli import main

    teacher = save_tiny_pipeline(tiny_sdxl_components(tmp_path / "src"), StableDiffusionXLPipeline, tmp_path / "sdxl")
    out = str(tmp_path / "latents")
    assert main(["cache", "--teacher", teacher, "--dataset", sources["hf_folder"], "--out", out]) == 0
    shard = load_file(os.path.join(out, "00000.safetensors"))
    assert {"latents", "emb.ehs", "emb.pooled"} <= set(shard) and shard["emb.pooled"].shape[0] == 12
    trainer = _dmd2(teacher, f"latents:{out}", tmp_path / "run")
    trainer.setup()
    encoded = []
    encode_rows = trainer.conditioner._encode_rows
    trainer.conditioner._encode_rows = lambda prompts: encoded.extend(prompts) or encode_rows(prompts)
    trainer.train()
    assert len(trainer.history) == 2 and encoded == []


def test_teacher_offload_with_shards_encodes_with_the_offloaded_vae(sd_teacher, sources, tmp_path):
    """teacher_offload moves the VAE to the host after build; streamed batches still encode (on an accelerator the
    VAE comes to it for each batch and goes back; on this CPU-only test the device is the host: no move)."""
    trainer = _lcm(sd_teacher, sources["shards"], tmp_path, teacher_offload=True, generator_mode="full")
    trainer.train()
    assert len(trainer.history) == 2 and next(trainer.vae.parameters()).device.type == "cpu"


@pytest.mark.parametrize("source", ["shards", "hf"])
def test_captions_only_for_a_prompt_only_run(sd_teacher, sources, tmp_path, source):
    """image_key: none: a DMD2 run without GAN and with backward simulation reads the caption column alone (no image
    decoded or encoded); a run that needs real images is refused."""
    trainer = _dmd2(
        sd_teacher, sources[source], tmp_path, image_key="none", gan_generator_weight=0.0, backward_simulation=True
    )
    keys = _record_keys(trainer)
    assert not trainer.dataset.has_images
    trainer.vae.encode = None  # never called
    trainer.train()
    assert len(trainer.history) == 2 and len(keys) == 2
    batch = next(iter(trainer.loader))
    assert "image" not in batch and all(c.startswith("a ") for c in batch["caption"])
    with pytest.raises(ConfigError, match="real images"):
        _dmd2(sd_teacher, sources[source], tmp_path / "gan", image_key="none").setup()
