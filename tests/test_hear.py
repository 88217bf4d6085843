"""sslaudio.hear against the HEAR 2021 common API: the official validator (when installed) and the
same checks written out (hearvalidator 2021.0.2 and the later timestamp-range checks)."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sslaudio import hear
from sslaudio.api import InputError, load
from sslaudio.build import build_method, load_preset
from sslaudio.checkpoint import CheckpointError, export_encoder

SMALL = ["encoder.d=64", "encoder.base_d=8", "method.proj_hidden=32", "method.proj_dim=16"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """A small BYOL-A encoder file: what `pretrain` exports, at random init."""
    preset = load_preset("tiny/byol-a", SMALL)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hear") / "encoder.safetensors"
    export_encoder(path, build_method(preset), preset)
    return str(path)


@pytest.fixture(scope="module")
def model(ckpt) -> hear.HearModel:
    return hear.load_model(ckpt)


def noise(n: int, seconds: float, sr: int, seed: int = 0) -> torch.Tensor:
    """White noise in [-1, 1], as the validator makes it."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, int(seconds * sr)), generator=g) * 2 - 1


@pytest.mark.skipif(importlib.util.find_spec("hearvalidator") is None,
                    reason="hearvalidator is not installed (pip install --no-deps 'hearvalidator==2021.0.2')")
def test_the_official_hear_validator_passes(ckpt, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if importlib.util.find_spec("tensorflow") is None:
        # hearvalidator imports tensorflow at the top but only needs it for TF models: a stand-in
        # whose Module no torch model is an instance of sends it down its torch path unchanged
        (tmp_path / "tensorflow").mkdir()
        (tmp_path / "tensorflow" / "__init__.py").write_text("class Module:\n    pass\n")
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path)] + sys.path)
    r = subprocess.run([sys.executable, "-m", "hearvalidator.validate", "sslaudio.hear", "-m", ckpt, "-d", "cpu"],
                       check=False, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "Looks good!" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_model_attributes(model):
    assert isinstance(model, torch.nn.Module)
    for name in ("sample_rate", "scene_embedding_size", "timestamp_embedding_size"):
        assert isinstance(getattr(model, name), int)
    assert model.sample_rate in (16000, 22050, 44100, 48000)
    assert model.scene_embedding_size == model.timestamp_embedding_size == 64
    with pytest.raises(CheckpointError, match="needs a checkpoint"):
        hear.load_model()
    assert hear.load_model("random:tiny/m2d", layer=1).timestamp_embedding_size == 640  # the kit's model options


@pytest.mark.parametrize("seconds", [1.07, 1.98, 4.0])
def test_timestamp_embeddings(model, seconds):
    audio = noise(2, seconds, model.sample_rate)
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    assert emb.dtype == torch.float32 and ts.dtype == torch.float32
    assert emb.ndim == 3 and ts.ndim == 2 and emb.shape[:2] == ts.shape and emb.shape[0] == 2
    assert emb.shape[2] == model.timestamp_embedding_size and torch.isfinite(emb).all()
    # milliseconds, one hop apart, the centres of the frames' receptive fields, inside the audio
    hop = 1000 * model.embedder.downsample / model.sample_rate
    diff = torch.diff(ts)
    assert torch.all((diff - hop).abs() < 1e-3)
    expected = 1000 * model.embedder.bundle.encoder.frame_times(ts.shape[1]).float()
    assert torch.allclose(ts, expected.expand_as(ts))
    assert 0 <= ts.min() <= hop and ts.max() <= 1000 * seconds
    assert ts.max() >= 1000 * seconds - 2 * hop  # the later validator: embeddings reach the end of the audio


def test_scene_embeddings(model):
    audio = noise(4, 2.74, model.sample_rate)
    emb = hear.get_scene_embeddings(audio, model)
    assert emb.dtype == torch.float32 and emb.shape == (4, model.scene_embedding_size)
    assert emb.device == audio.device and torch.isfinite(emb).all()


def test_deterministic_and_batch_independent(model):
    audio = noise(3, 1.5, model.sample_rate, seed=1)
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    again, _ = hear.get_timestamp_embeddings(audio, model)
    assert torch.equal(emb, again)
    alone, ts1 = hear.get_timestamp_embeddings(audio[1:2], model)
    assert torch.allclose(alone[0], emb[1], atol=1e-5) and torch.equal(ts1[0], ts[1])
    flipped = hear.get_scene_embeddings(audio.flip(0), model)
    assert torch.allclose(flipped, hear.get_scene_embeddings(audio, model).flip(0), atol=1e-5)


def test_long_audio_keeps_regular_timestamps():
    # chunked in bounded memory; the wav2vec 2.0 style conv stack needs more than a hop per frame
    m = hear.HearModel(load("random:tiny/hubert-wave", device="cpu", chunk_seconds=0.5))
    audio = noise(2, 2.2, m.sample_rate, seed=2)
    emb, ts = hear.get_timestamp_embeddings(audio, m)
    assert emb.shape == (2, (audio.shape[1] - 400) // 320 + 1, m.timestamp_embedding_size)
    assert torch.all((torch.diff(ts) - 20.0).abs() < 1e-3) and ts.max() <= 2200


@pytest.mark.parametrize("audio, match", [
    (torch.zeros(16000), r"\(n_sounds, n_samples\)"),
    (torch.zeros(0, 16000), "no sounds"),
    (np.zeros((1, 16000), np.float32), "torch tensor"),
    (torch.full((1, 16000), float("nan")), "non-finite"),
    (torch.zeros(2, 100), "too short"),
])
def test_bad_audio_is_one_line(model, audio, match):
    for call in (hear.get_scene_embeddings, hear.get_timestamp_embeddings):
        with pytest.raises(InputError, match=match) as info:
            call(audio, model)
        assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
