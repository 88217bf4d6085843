"""`--pool` beyond extract: the probe (single task, suite, fine-tuning) and `sslaudio.load` pool the
clip embedding with the statistics asked for, the feature cache keeps pools apart, and bad uses are
one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import sslaudio
import sslaudio.evaluation as ev
from sslaudio.cli import app
from sslaudio.config import ConfigError
from sslaudio.encoders.base import POOLS
from sslaudio.evaluation import FeatureCache, probe_checkpoint
from sslaudio.inference import load_encoder
from sslaudio.synth import clip

DIRECT = {"mean": lambda f: f.mean(0), "max": lambda f: f.max(0), "mean+max": lambda f: f.mean(0) + f.max(0)}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_bundle_pool_replaces_the_encoders_statistics():
    bundle = load_encoder("random:tiny/m2d")  # clip_pool: mean
    audio = torch.from_numpy(np.stack([clip("saw", 1, 1.3), clip("bell", 2, 1.3)])).float()
    assert bundle.clip_stats == ("mean",)
    for name in POOLS:
        with torch.no_grad():
            c, frames, _ = bundle.set_pool(name).embed(audio)  # what fine-tuning trains on, too
        assert bundle.clip_stats == POOLS[name]
        for i in range(2):
            assert np.allclose(c[i].numpy(), DIRECT[name](frames[i].numpy()), atol=1e-5)
    assert bundle.set_pool(None).clip_stats == ("mean",)
    with pytest.raises(ConfigError, match="--pool must be one of mean, max, mean\\+max"):
        bundle.set_pool("median")


def test_probe_fits_on_the_chosen_pool(labeled_dir, monkeypatch):
    seen = []
    real = ev.embed_files

    def recording(bundle, *a, **k):
        for e in real(bundle, *a, **k):
            seen.append((bundle, bundle.clip_stats, e))
            yield e

    monkeypatch.setattr(ev, "embed_files", recording)
    res = probe_checkpoint("random:tiny/byol-a", labeled_dir / "labels.csv", pool="max")
    assert res["pool"] == "max" and len(seen) == res["n_files"] == 44
    bundle = seen[0][0]  # the probe's encoder, its input statistics fitted: what was the probe given?
    full = {e.path: e for e in real(bundle, [(e.path, e.rel) for _, _, e in seen[:4]], torch.device("cpu"), True)}
    for _, stats, e in seen[:4]:
        assert stats == ("max",)
        assert np.allclose(e.clip, DIRECT["max"](full[e.path].frames), atol=1e-5)
    default = probe_checkpoint("random:tiny/byol-a", labeled_dir / "labels.csv")
    assert default["pool"] == "mean+max" and seen[-1][1] == ("mean", "max")


def test_feature_cache_keeps_pools_apart(labeled_dir, tmp_path):
    fc = FeatureCache(tmp_path, torch.device("cpu"))
    items = [(str(labeled_dir / "a/000.wav"), "a/000.wav")]
    bundle = load_encoder("random:tiny/byol-a")
    plain = fc.key(bundle, items, False)
    assert fc.key(load_encoder("random:tiny/byol-a"), items, False) == plain
    assert fc.key(bundle.set_pool("max"), items, False) != plain
    assert fc.key(bundle.set_pool("mean"), items, False) not in (plain, fc.key(bundle.set_pool("max"), items, False))


def test_cli_probe_pool_and_its_errors(labeled_dir, tmp_path):
    r = invoke("probe", "random:tiny/byol-a", labeled_dir / "labels.csv", "--pool", "mean", "--json", "-")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["pool"] == "mean"
    r = invoke("probe", "random:tiny/byol-a", labeled_dir / "labels.csv", "--pool", "median")
    assert r.exit_code == 2 and "--pool must be one of mean, max, mean+max" in r.output, r.output
    assert "Traceback" not in r.output
    events = tmp_path / "events.csv"
    events.write_text(f"path,onset,offset,label\n{labeled_dir / 'a/000.wav'},0.1,0.3,x\n")
    r = invoke("probe", "random:tiny/byol-a", events, "--pool", "max")
    assert r.exit_code == 2 and "--pool is for clip tasks" in r.output, r.output


def test_suite_pools_its_clip_tasks(labeled_dir, tmp_path):
    y = tmp_path / "suite.yaml"
    y.write_text(f"tasks:\n  - name: toy\n    labels: {labeled_dir / 'labels.csv'}\n")
    out, cache = tmp_path / "r.json", tmp_path / "cache"
    for pool, files in (("max", 1), (None, 2)):  # the default pool is not served from the max pool's cache
        extra = ["--pool", pool] if pool else []
        r = invoke("probe", "random:tiny/byol-a", "--suite", y, "--cache", cache, "--json", out, *extra)
        assert r.exit_code == 0, r.output
        res = json.loads(out.read_text())
        assert res["results"]["toy"]["random:tiny/byol-a"]["pool"] == (pool or "mean+max")
        assert res["extracted"] == 1 and len(list(cache.glob("*.safetensors"))) == files


def test_python_api_pool_short_and_chunked():
    m = sslaudio.load("random:tiny/byol-a", device="cpu", chunk_seconds=1.0, pool="max")
    for seconds in (0.8, 2.5):  # one batch, and chunk by chunk
        e = m.embed(clip("saw", 3, seconds), 16000)
        assert torch.allclose(e.clip, e.frames.max(0).values, atol=1e-5)
    with pytest.raises(ConfigError, match="--pool"):
        sslaudio.load("random:tiny/byol-a", device="cpu", pool="sum")
