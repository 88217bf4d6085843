"""`extract` options: --layer all (every block, as --layer i gives it, also in long files chunk by
chunk), --pool, --batch-seconds, and paths on stdin (`-`) piped through to JSON lines on stdout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from typer.testing import CliRunner

from sslaudio.cli import app
from sslaudio.encoders.base import POOLS
from sslaudio.features import embed_files
from sslaudio.inference import load_encoder
from sslaudio.synth import CLASSES, clip
from tests.conftest import write_wav

CPU = torch.device("cpu")
runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[tuple[str, str]]:
    """Four clips: two lengths, so two equal-length batches."""
    root = tmp_path_factory.mktemp("clips")
    items = []
    for i in range(4):
        p = write_wav(root / f"{i}.wav", clip(CLASSES[i], 10 + i, seconds=(0.5, 0.7)[i % 2]))
        items.append((str(p), p.name))
    return items


def embed(bundle, items, **kw) -> dict:
    return {e.rel: e for e in embed_files(bundle, items, CPU, True, **kw)}


@pytest.mark.parametrize("preset,embedded", [("tiny/m2d", 5), ("tiny/hubert-wave", 1)])
def test_layer_all_equals_each_layer(clips, preset, embedded):
    """embedded: the hidden states the preset's own embedding puts side by side (eval_blocks)."""
    torch.manual_seed(0)
    bundle = load_encoder(f"random:{preset}")
    plain = embed(bundle, clips)
    every = embed(bundle, clips, all_layers=True)
    n_layers = next(iter(every.values())).layer_clips.shape[0]
    assert n_layers >= 2
    for rel, e in every.items():
        assert e.layers.shape == (n_layers, e.frames.shape[0], e.frames.shape[1] // embedded)
        assert e.layer_clips.shape == (n_layers, e.clip.shape[0] // embedded)
        assert e.frames.shape[1] % embedded == 0
        # the final output (clip, frames) is the one a plain extraction writes
        assert np.allclose(e.clip, plain[rel].clip, atol=1e-5) and np.allclose(e.frames, plain[rel].frames, atol=1e-5)
        assert plain[rel].layers is None and plain[rel].layer_clips is None
    for i in range(n_layers):
        one = embed(bundle.set_layer(i), clips)
        for rel, e in every.items():
            assert np.allclose(e.layer_clips[i], one[rel].clip, atol=1e-5)
            assert np.allclose(e.layers[i], one[rel].frames, atol=1e-5)
    bundle.set_layer(None)


@pytest.mark.parametrize("preset", ["tiny/m2d", "tiny/hubert", "tiny/apc", "tiny/cpc"])
def test_bundle_layer_all_is_every_block_side_by_side(clips, preset):
    """set_layer('all') (probe --layer all): each frame and the clip embedding are the blocks'
    (as set_layer(i) gives them) concatenated, first block first."""
    torch.manual_seed(0)
    bundle = load_encoder(f"random:{preset}")
    every = embed(bundle, clips, all_layers=True)
    side = embed(bundle.set_layer("all"), clips)
    for rel, e in every.items():
        assert np.allclose(side[rel].frames, np.concatenate(list(e.layers), -1), atol=1e-5)
        assert np.allclose(side[rel].clip, e.layer_clips.reshape(-1), atol=1e-5)
        assert side[rel].clip.shape[0] == e.layer_clips.size > e.layer_clips.shape[1]  # wider than one layer
    bundle.set_layer(None)
    assert all(np.allclose(e.clip, every[rel].clip, atol=1e-5) for rel, e in embed(bundle, clips).items())


def test_pool_variants_against_the_frames(clips):
    bundle = load_encoder("random:tiny/byol-a")  # clip_pool: mean + max (summed)
    direct = {"mean": lambda f: f.mean(0), "max": lambda f: f.max(0), "mean+max": lambda f: f.mean(0) + f.max(0)}
    default = embed(bundle, clips)
    for e in default.values():  # the encoder's own statistics without --pool
        assert np.allclose(e.clip, direct["mean+max"](e.frames), atol=1e-5)
    for name in POOLS:
        got = embed(bundle.set_pool(name), clips, all_layers=True)
        for rel, e in got.items():
            assert np.allclose(e.frames, default[rel].frames, atol=1e-6)
            assert np.allclose(e.clip, direct[name](e.frames), atol=1e-5)
            for lc, lf in zip(e.layer_clips, e.layers):
                assert np.allclose(lc, direct[name](lf), atol=1e-5)


def test_long_file_all_layers_chunked_like_unchunked(tmp_path):
    bundle = load_encoder("random:tiny/byol-a")
    x = np.concatenate([clip("saw", 1, 2.0), clip("bell", 2, 2.0), clip("chirp", 3, 1.5)])
    item = [(str(write_wav(tmp_path / "long.wav", x)), "long.wav")]
    for pool in (None, "mean"):
        bundle.set_pool(pool)
        whole = next(embed_files(bundle, item, CPU, True, chunk_seconds=60, all_layers=True))
        chunked = next(embed_files(bundle, item, CPU, True, chunk_seconds=1.0, all_layers=True))
        assert chunked.layers.shape[0] == whole.layers.shape[0] == whole.layer_clips.shape[0]
        assert chunked.layers.shape[1:] == chunked.frames.shape
        assert abs(chunked.layers.shape[1] - whole.layers.shape[1]) <= 6
        for lc_c, lc_w in zip(chunked.layer_clips, whole.layer_clips):
            assert np.corrcoef(lc_c, lc_w)[0, 1] > 0.9  # only frames next to chunk borders differ
        stats = POOLS[pool] if pool else bundle.encoder.clip_pool
        for lc, lf in zip(chunked.layer_clips, chunked.layers):  # each layer pooled over all its chunks
            want = sum(lf.mean(0) if s == "mean" else lf.max(0) for s in stats)
            assert np.allclose(lc, want, atol=1e-4)
    # clips only (no --frames): the same per-layer clips, without the frames
    bundle.set_pool(None)
    clip_only = next(embed_files(bundle, item, CPU, False, chunk_seconds=1.0, all_layers=True))
    assert clip_only.layers is None and clip_only.frames is None
    chunked = next(embed_files(bundle, item, CPU, True, chunk_seconds=1.0, all_layers=True))
    assert np.allclose(clip_only.layer_clips, chunked.layer_clips, atol=1e-6)


def test_batch_seconds_bounds_the_batches(clips, monkeypatch):
    from sslaudio import features

    bundle = load_encoder("random:tiny/byol-a")
    plain = embed(bundle, clips)
    sizes = []
    real = features.encode

    def spy(b, audio, *a, **kw):
        sizes.append(tuple(audio.shape))
        return real(b, audio, *a, **kw)

    monkeypatch.setattr(features, "encode", spy)
    got = embed(bundle, clips, batch_seconds=0.6)  # one 0.5 s clip per batch, and a 0.7 s clip alone
    assert [s[0] for s in sizes] == [1, 1, 1, 1]
    sizes.clear()
    embed(bundle, clips, batch_seconds=10)
    assert [s[0] for s in sizes] == [2, 2]
    for rel, e in got.items():
        assert np.allclose(e.clip, plain[rel].clip, atol=1e-5)


def test_cli_stdin_paths_to_stdout(clips, tmp_path):
    missing = tmp_path / "gone.wav"
    lines = f"{clips[0][0]}\n\n   \n{missing}\n{clips[1][0]}\n"
    r = invoke("extract", "random:tiny/m2d", "-", "--out", "-", "--layer", "all", "--pool", "max", input=lines)
    assert r.exit_code == 0, r.output
    rows = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert [row["path"] for row in rows] == [clips[0][0], clips[1][0]]
    for row in rows:
        # tiny/m2d embeds its 5 hidden states side by side (eval_blocks): one layer is a fifth as wide
        assert len(row["layer_clips"]) == 5 and 5 * len(row["layer_clips"][0]) == len(row["clip"])
    assert "gone.wav" in r.stderr and "1 skipped" in r.stderr


def test_cli_layer_all_files_and_resume(clips, tmp_path):
    src = Path(clips[0][0]).parent
    out = tmp_path / "f"
    args = ("extract", "random:tiny/m2d", src, "--out", out, "--layer", "all", "--frames")
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    t = load_file(str(out / "0.wav.safetensors"))
    assert t["layers"].shape[0] == t["layer_clips"].shape[0] >= 2
    n, length, width = t["layers"].shape  # tiny/m2d embeds every hidden state (eval_blocks 5)
    assert t["frames"].shape == (length, n * width) and t["layer_clips"].shape[1:] == (t["clip"].shape[0] // n,)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layer"] == "all" and summary["written"] == 4
    r = invoke(*args)  # same options: everything reused
    assert r.exit_code == 0 and json.loads((out / "summary.json").read_text())["reused"] == 4
    r = invoke(*args, "--pool", "mean")  # another pooling changes the identity: replaced
    assert r.exit_code == 0 and json.loads((out / "summary.json").read_text())["replaced"] == 4
    r = invoke("extract", "random:tiny/m2d", src, "--out", tmp_path / "n", "--layer", "all", "--format", "npy")
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "n" / "0.wav.layer_clips.npy").ndim == 2
    assert not (tmp_path / "n" / "0.wav.layers.npy").exists()  # frames only with --frames


@pytest.mark.parametrize("extra, message", [
    (["--layer", "top"], "--layer must be"),
    (["--layer", "99"], "--layer 99"),
    (["--pool", "median"], "--pool must be one of"),
    (["--batch-seconds", "0"], "--batch-seconds must be"),
])
def test_bad_values_are_one_line_errors(clips, tmp_path, extra, message):
    r = invoke("extract", "random:tiny/byol-a", clips[0][0], "--out", tmp_path / "f", *extra)
    assert r.exit_code == 2 and message in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1


def test_stdin_must_be_the_only_input(clips, tmp_path):
    r = invoke("extract", "random:tiny/byol-a", "-", clips[0][0], "--out", tmp_path / "f", input="")
    assert r.exit_code == 2 and "only input" in r.stderr


def test_format_with_stdout_is_an_error(clips):
    # JSON lines on stdout have no file format: an explicit --format would be silently ignored
    r = invoke("extract", "random:tiny/byol-a", clips[0][0], "--out", "-", "--format", "npy")
    assert r.exit_code == 2 and "--out - writes JSON lines" in r.stderr, r.output
    assert r.stdout == ""
