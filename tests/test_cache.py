"""--cache: decoded int16 shards, their index, invalidation, checksums, atomic builds, and cached training."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sslaudio import cache as cache_mod
from sslaudio.audio import load
from sslaudio.cache import open_cache
from sslaudio.config import DataConfig
from sslaudio.data import CropDataset, loader, scan, validate
from sslaudio.synth import clip
from tests.conftest import write_wav
from tests.test_cli import SMALL as CLI_SMALL
from tests.test_cli import invoke
from tests.test_train import small

SR = 16000


@pytest.fixture
def src(tmp_path):
    """Three short files at other rates than 16 kHz: a 22.05 kHz wav, a 44.1 kHz stereo flac, a 16 kHz wav."""
    root = tmp_path / "src"
    write_wav(root / "a.wav", clip("saw", 1, seconds=0.7)[:15435] * 0.9, sr=22050)
    st = np.stack([clip("bell", 2, seconds=0.5), clip("chirp", 3, seconds=0.5)], 1)
    write_wav(root / "b.flac", np.concatenate([st, st[:6050]]), sr=44100)
    write_wav(root / "c.wav", clip("pluck", 4, seconds=0.4))
    return root


def infos_of(folder):
    return validate(scan([str(folder)]), 0.1)[0]


def shards(d):
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".i16") or p.name.endswith(".tmp"))


def test_cached_audio_is_the_resampled_audio_and_crops_come_from_it(src, tmp_path):
    infos, warnings = infos_of(src), []
    c = open_cache(tmp_path / "c", infos, SR, workers=2, warn=warnings.append, progress=None)
    assert c.stats == {"decoded": 3, "failed": 0, "reused": 0, "clipped_files": 0} and not warnings
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert index["sample_rate"] == SR and len(index["files"]) == 3 and len(index["shards"]) == 1
    assert set(index["files"][0]) >= {"path", "size", "mtime_ns", "shard", "offset", "frames"}
    for info in infos:
        ref = load(info.path, SR).numpy()
        got = c.samples(c.locate(info.path)).astype(np.float32) / 32768
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 0.5 / 32768 + 1e-7  # int16 rounding
    ds = CropDataset(infos, SR, 0.3, 2, seed=5, cache=c)
    a = ds[(1, 7, 0)]["audio"]
    assert a.shape == (2, 4800) and a.dtype == torch.float32 and torch.equal(a, ds[(1, 7, 0)]["audio"])
    assert not torch.equal(a, ds[(1, 8, 0)]["audio"])
    full = torch.from_numpy(c.samples(c.locate(infos[1].path)).astype(np.float32) / 32768)
    windows = full.unfold(0, 4800, 1)  # each segment is a window of the cached file
    assert all(bool((windows == row).all(1).any()) for row in a)
    small_ds = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker gets: no arrays
    assert len(pickle.dumps(ds)) < 10_000 and torch.equal(small_ds[(1, 7, 0)]["audio"], a)


def test_workers_read_the_memory_maps(src, tmp_path):
    infos = infos_of(src)
    ds = CropDataset.open(infos, DataConfig(clip_seconds=0.2, num_workers=2), 0, tmp_path / "c")
    plain = [b["audio"] for b in loader(ds, 2, 0, 0, 4, num_workers=0)]
    forked = [b["audio"] for b in loader(ds, 2, 0, 0, 4, num_workers=2)]
    assert len(plain) == 4 and all(torch.equal(x, y) for x, y in zip(plain, forked))


def test_changed_added_and_removed_files_are_decoded_again(src, tmp_path):
    d, infos = tmp_path / "c", infos_of(src)
    open_cache(d, infos, SR, progress=None)
    old_shards = shards(d)
    write_wav(src / "a.wav", clip("square", 9, seconds=0.9), sr=22050)  # new content, new size and mtime
    write_wav(src / "d.wav", clip("noise_band", 5, seconds=0.3))
    (src / "c.wav").unlink()
    infos = infos_of(src)
    c = open_cache(d, infos, SR, progress=None)
    assert c.stats["decoded"] == 2 and c.stats["reused"] == 1  # a.wav and d.wav; b.flac stays
    assert len(shards(d)) == 2 and old_shards[0] in shards(d)  # appended: the old shard is not rewritten
    new_a = c.samples(c.locate(str(src / "a.wav"))).astype(np.float32) / 32768
    assert np.abs(new_a - load(src / "a.wav", SR).numpy()).max() <= 0.5 / 32768 + 1e-7
    assert c.locate(str(src / "c.wav")) is None
    warnings = []
    c = open_cache(d, infos, 8000, warn=warnings.append, progress=None)  # another rate: everything again
    assert c.stats["decoded"] == 3 and len(warnings) == 1 and "8000 Hz" in warnings[0] and len(shards(d)) == 1


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_shard_is_detected_and_decoded_again(src, tmp_path, damage):
    d, infos = tmp_path / "c", infos_of(src)
    open_cache(d, infos, SR, progress=None)
    shard = d / shards(d)[0]
    st = os.stat(shard)
    with open(shard, "r+b") as f:
        if damage == "flip":  # a bit flip in place, the size and mtime kept: only the sha256 sees it
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 0x40]))
        else:
            f.truncate(st.st_size - 100)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    warnings = []
    c = open_cache(d, infos, SR, warn=warnings.append, progress=None)
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert ("sha256 mismatch" if damage == "flip" else "truncated") in warnings[0]
    assert c.stats["decoded"] == 3 and not shard.exists()
    for info in infos:
        got = c.samples(c.locate(info.path)).astype(np.float32) / 32768
        assert np.abs(got - load(info.path, SR).numpy()).max() <= 0.5 / 32768 + 1e-7


def test_an_interrupted_build_leaves_nothing_that_reads_as_valid(src, tmp_path, monkeypatch):
    d, infos = tmp_path / "c", infos_of(src)
    real, calls = cache_mod._decode, []

    def decode(info, sr):
        calls.append(info.path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(info, sr)

    monkeypatch.setattr(cache_mod, "SHARD_BYTES", 1000)  # a shard per file: some are renamed before the stop
    monkeypatch.setattr(cache_mod, "_decode", decode)
    with pytest.raises(KeyboardInterrupt):
        open_cache(d, infos, SR, progress=None)
    assert not (d / "index.json").exists() and shards(d) == []
    monkeypatch.setattr(cache_mod, "_decode", real)
    c = open_cache(d, infos, SR, progress=None)
    assert c.stats["decoded"] == 3 and len(shards(d)) == 3
    index_before = (d / "index.json").read_text()
    write_wav(src / "d.wav", clip("noise_band", 5, seconds=0.3))
    calls.clear()
    monkeypatch.setattr(cache_mod, "_decode", decode)
    calls += ["x", "y"]  # the next decode raises
    with pytest.raises(KeyboardInterrupt):
        open_cache(d, infos_of(src), SR, progress=None)
    assert (d / "index.json").read_text() == index_before and len(shards(d)) == 3  # the old cache, intact


def test_cache_folder_problems_are_one_line_errors(src, tmp_path, monkeypatch):
    infos = infos_of(src)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="needs a folder"):
        open_cache(tmp_path / "file", infos, SR, progress=None)
    with pytest.raises(OSError, match="cannot use it as the cache folder"):
        open_cache(tmp_path / "file" / "sub", infos, SR, progress=None)

    def full(self, samples):
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(cache_mod._ShardWriter, "add", full)
    with pytest.raises(OSError, match="No space left on device") as e:
        open_cache(tmp_path / "c", infos, SR, progress=None)
    assert e.value.filename == str(tmp_path / "c") and shards(tmp_path / "c") == []


def test_cached_training_is_deterministic_and_resumes(audio_dir, tmp_path):
    cache = tmp_path / "cache"
    fit_args = {"cache": cache, "device": "cpu"}
    from sslaudio.train import fit

    fit(small(), [str(audio_dir)], tmp_path / "a", **fit_args)
    fit(small(), [str(audio_dir)], tmp_path / "b", **fit_args)
    state = json.loads((tmp_path / "a" / "ckpt" / "step-000000004" / "state.json").read_text())
    assert state["cache"] is True
    shutil.rmtree(tmp_path / "b" / "ckpt" / "step-000000004")
    warnings = []
    fit(small(), [str(audio_dir)], tmp_path / "b", warn=warnings.append, **fit_args)
    wa = load_file(str(tmp_path / "a" / "ckpt" / "step-000000004" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "ckpt" / "step-000000004" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and not warnings
    shutil.rmtree(tmp_path / "b" / "ckpt" / "step-000000004")
    fit(small(), [str(audio_dir)], tmp_path / "b", warn=warnings.append, device="cpu")  # resumed without it
    assert len(warnings) == 1 and "with --cache" in warnings[0]


def test_cli_pretrain_with_cache(audio_dir, tmp_path):
    r = invoke("pretrain", audio_dir, "--preset", "tiny/byol-a", "--out", tmp_path / "run", "--steps", 2,
               "--batch-size", 4, "--quiet", "--cache", tmp_path / "cache", *CLI_SMALL)
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "cache" / "index.json").read_text())["files"]) == 8
    (tmp_path / "f").write_text("x")
    r = invoke("pretrain", audio_dir, "--preset", "tiny/byol-a", "--out", tmp_path / "run2", "--steps", 2,
               "--batch-size", 4, "--quiet", "--cache", tmp_path / "f", *CLI_SMALL)
    assert r.exit_code == 2 and r.output.strip() == f"error: --cache {tmp_path / 'f'}: is a file; give a folder"
    assert not (tmp_path / "run2").exists()


def test_a_large_cache_hashes_a_subset_of_its_shards_per_open(src, tmp_path, monkeypatch):
    d, infos = tmp_path / "c", infos_of(src)
    monkeypatch.setattr(cache_mod, "SHARD_BYTES", 1000)  # three shards
    open_cache(d, infos, SR, progress=None)
    hashed = []
    real = cache_mod._sha256
    monkeypatch.setattr(cache_mod, "_sha256", lambda p: hashed.append(p) or real(p))
    open_cache(d, infos, SR, progress=None)
    assert len(hashed) == 3  # small: every shard, every open
    hashed.clear()
    monkeypatch.setattr(cache_mod, "VERIFY_BYTES", 1)
    c = open_cache(d, infos, SR, progress=None)
    assert len(hashed) == 1 and c.stats["reused"] == 3  # the others: size and mtime only


def test_validate_takes_unchanged_files_from_the_index(src, tmp_path, monkeypatch):
    import sslaudio.data as data_mod

    d, infos = tmp_path / "c", infos_of(src)
    open_cache(d, infos, SR, progress=None)
    probed = []
    real = data_mod.probe
    monkeypatch.setattr(data_mod, "probe", lambda p, **kw: probed.append(p) or real(p, **kw))
    paths = scan([str(src)])
    assert validate(paths, 0.1, cache=d)[0] == infos and probed == []
    write_wav(src / "c.wav", clip("pluck", 8, seconds=0.5))  # changed: probed again
    ok, _ = validate(paths, 0.1, cache=d)
    assert probed == [str(src / "c.wav")] and ok[2].frames == 8000
    probed.clear()
    warnings = []
    ok, skipped = validate(paths, 0.45, warnings.append, cache=d)  # min_seconds from the index, in probe's words
    assert skipped == validate(paths, 0.45)[1] and [p for p, _ in skipped] == [str(src / "b.flac")]
    assert probed[0] == str(src / "c.wav") and "too short" in warnings[0] and len(ok) == 2


@pytest.mark.parametrize("text", ["{not json", ('{"format": "sslaudio-audio-cache", "version": 1, "sample_rate": 16000, '
                                                '"shards": [{"name": "../x"}], "files": [3]}')])
def test_an_unreadable_index_rebuilds_the_cache(src, tmp_path, text):
    d, infos = tmp_path / "c", infos_of(src)
    open_cache(d, infos, SR, progress=None)
    (d / "index.json").write_text(text)
    warnings = []
    c = open_cache(d, infos, SR, warn=warnings.append, progress=None)
    assert c.stats["decoded"] == 3 and len(warnings) == 1 and "index.json is unreadable" in warnings[0]
    assert len(shards(d)) == 1  # the old shard, which no index names any more, is gone
