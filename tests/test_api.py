"""sslaudio.load: waveforms in memory at any rate and channel count -> clip, frames, timestamps, layers."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import sslaudio
from sslaudio.api import Embedder, InputError, load
from sslaudio.audio import resample
from sslaudio.build import build_method, load_preset
from sslaudio.checkpoint import CheckpointError, export_encoder
from sslaudio.config import ConfigError
from sslaudio.features import embed_files
from sslaudio.synth import clip

SMALL = ["encoder.d=64", "encoder.base_d=8", "method.proj_hidden=32", "method.proj_dim=16"]
SR = 16000


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A small BYOL-A encoder exported as an encoder file (a real CKPT, loaded and hash-checked)."""
    preset = load_preset("tiny/byol-a", SMALL)
    torch.manual_seed(0)
    method = build_method(preset)
    method.frontend.estimate_stats(torch.from_numpy(np.stack([clip("saw", i, seconds=1.0) for i in range(4)])))
    path = tmp_path_factory.mktemp("api") / "encoder.safetensors"
    export_encoder(path, method, preset)
    return str(path)


@pytest.fixture(scope="module")
def model(ckpt) -> Embedder:
    return load(ckpt, device="cpu")


def wave(seconds: float, sr: int = SR, seed: int = 0, channels: int | None = None) -> np.ndarray:
    g = np.random.default_rng(seed)
    shape = (int(seconds * sr),) if channels is None else (channels, int(seconds * sr))
    return (0.1 * g.standard_normal(shape)).astype(np.float32)


def test_embed_is_the_bundle_output_with_timestamps(model):
    x = wave(1.3)
    e = model.embed(x, SR)
    with torch.no_grad():
        clip_, frames, lengths = model.bundle.embed(torch.from_numpy(x)[None])
    T = int(lengths[0])
    assert e.clip.shape == (model.dim,) and e.frames.shape == (T, model.frame_dim) and e.timestamps.shape == (T,)
    assert e.clip.dtype == torch.float32 and e.frames.device.type == "cpu"
    assert torch.allclose(e.clip, clip_[0], atol=1e-6) and torch.allclose(e.frames, frames[0, :T], atol=1e-6)
    assert torch.equal(e.timestamps, model.bundle.encoder.frame_times(T))  # receptive-field centres, seconds
    assert e.seconds == pytest.approx(1.3)
    # numpy and torch inputs give the same numbers, and so does a second call
    assert torch.equal(model.embed(torch.from_numpy(x), SR).clip, e.clip)
    assert torch.equal(model.embed(x, SR).frames, e.frames)


def test_any_rate_channels_and_pcm_ints_are_downmixed_and_resampled(model):
    stereo = wave(1.0, 44100, seed=1, channels=2)
    e = model.embed(stereo, 44100)
    mono16k = resample(torch.from_numpy(stereo).mean(0), 44100, SR)  # what extraction does to a file
    assert torch.allclose(e.clip, model.embed(mono16k, SR).clip, atol=1e-6)
    pcm = (stereo * 32768).round().clip(-32768, 32767).astype(np.int16)
    assert torch.allclose(model.embed(pcm, 44100).clip, e.clip, atol=1e-3)  # int16 scaled as soundfile reads it
    with pytest.raises(InputError, match=r"looks like \(samples, channels\).*\.T"):
        model.embed(stereo.T, 44100)  # (S, C), as soundfile.read returns it


def test_a_batch_gives_each_clip_its_own_numbers(model):
    batch = np.stack([wave(1.0, 22050, seed=s, channels=2) for s in range(3)])  # (B, C, S)
    out = model.embed(batch, 22050)
    assert isinstance(out, list) and len(out) == 3
    for b, e in zip(batch, out):
        alone = model.embed(b, 22050)
        assert torch.allclose(e.clip, alone.clip, atol=1e-5) and torch.allclose(e.frames, alone.frames, atol=1e-5)
    mixed = model.embed([wave(0.5, seed=5), wave(1.2, seed=6, channels=1), torch.from_numpy(wave(0.5, seed=7))], SR)
    assert [e.frames.shape[0] for e in mixed] == [model.embed(w, SR).frames.shape[0]
                                                  for w in (wave(0.5), wave(1.2, channels=1), wave(0.5))]
    assert torch.allclose(mixed[2].clip, model.embed(wave(0.5, seed=7), SR).clip, atol=1e-5)


def test_long_input_is_chunked_exactly_as_extraction(ckpt, tmp_path):
    x = wave(2.3, seed=3)
    path = tmp_path / "long.wav"
    sf.write(str(path), x, SR, subtype="FLOAT")
    m = load(ckpt, device="cpu", chunk_seconds=0.5)
    e = m.embed(x, SR)
    (f,) = list(embed_files(m.bundle, [(str(path), "long.wav")], torch.device("cpu"), True, chunk_seconds=0.5))
    assert np.allclose(e.clip.numpy(), f.clip, atol=1e-5) and np.allclose(e.frames.numpy(), f.frames, atol=1e-5)
    assert np.allclose(e.timestamps.numpy(), f.times)
    assert np.allclose(np.diff(e.timestamps.numpy()), m.downsample / SR)


def test_chunks_of_a_wave_encoder_lose_no_frame():
    # the conv stack needs 400 samples for a 320-sample hop: chunks reach past their end
    whole = load("random:tiny/hubert-wave", device="cpu")
    chunked = load("random:tiny/hubert-wave", device="cpu", chunk_seconds=0.3)
    x = wave(1.55, seed=4)
    a, b = whole.embed(x, SR), chunked.embed(x, SR)
    assert b.frames.shape == a.frames.shape == ((len(x) - 400) // 320 + 1, whole.frame_dim)
    assert torch.allclose(a.timestamps, b.timestamps) and np.allclose(np.diff(b.timestamps.numpy()), 0.02)
    assert float(b.timestamps[-1]) < len(x) / SR


def test_layers_are_every_block_as_layer_n_gives_it():
    m = load("random:tiny/m2d", device="cpu")  # patch tokens regrouped per time column
    x = wave(1.5, seed=2)
    out = m.layers(x, SR)
    e = m.embed(x, SR)
    assert len(out.layers) == m.num_layers == 5  # the blocks' input (patch embeddings), then 4 blocks
    assert out.frame_rate == SR / out.downsample == m.frame_rate and torch.equal(out.timestamps, e.timestamps)
    # the preset embeds every hidden state (eval_blocks 5), each as wide as one layer
    assert all(h.shape == (e.frames.shape[0], e.frames.shape[1] // 5) for h in out.layers)
    for i in (0, 1, -1):  # each hidden state as `extract --layer N` writes it (the last before the final norm)
        assert torch.allclose(load("random:tiny/m2d", device="cpu", layer=i).embed(x, SR).frames, out.layers[i],
                              atol=1e-5)
    chunked = load("random:tiny/m2d", device="cpu", chunk_seconds=0.4).layers([x, x[:8000]], SR)
    assert [h.shape[0] for h in chunked[0].layers] == [chunked[0].timestamps.shape[0]] * 5


BAD = [
    (np.zeros(0, np.float32), SR, "empty"),
    (np.array([0.1, np.nan] * 4000, np.float32), SR, "4000 non-finite"),
    (np.zeros((1, 1, 2, 4000), np.float32), SR, "expected"),
    ("song.wav", SR, "numpy array or a torch tensor"),
    ([], SR, "empty list"),
    ([np.zeros(8000, np.float32), "x"], SR, r"waveform\[1\]"),
    (np.zeros(10, np.float32), SR, "too short: 0.6 ms"),
    (np.zeros(8000, np.complex64), SR, "complex64"),
    (np.zeros(8000, np.float32), 0, "sample_rate"),
    (np.zeros(8000, np.float32), 44100.5, "sample_rate"),
    (np.zeros(8000, np.float32), "16k", "sample_rate"),
]


@pytest.mark.parametrize("x, sr, match", BAD)
def test_bad_input_is_one_line(model, x, sr, match):
    with pytest.raises(InputError, match=match) as info:
        model.embed(x, sr)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    with pytest.raises(InputError, match=match):
        model.layers(x, sr)


def test_bad_checkpoint_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="not a run folder") as info:
        load(tmp_path / "nothing")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="did you mean 'tiny/m2d'"):
        load("random:tiny/m2x")
    with pytest.raises(CheckpointError, match="--layer 7"):
        load("random:tiny/byol-a", layer=7)


def test_random_init_fixes_its_statistics_on_the_first_input():
    m = load("random:tiny/byol-a", device="cpu")
    x = wave(1.0, seed=8)
    first = m.embed(x, SR)
    m.embed(wave(1.0, seed=9) * 10, SR)
    assert not m.bundle.needs_stats and torch.equal(m.embed(x, SR).clip, first.clip)


def test_package_exposes_load_lazily():
    code = ("import sys, sslaudio; assert 'torch' not in sys.modules and 'sslaudio.api' not in sys.modules; "
            "assert 'load' in dir(sslaudio)")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sslaudio.load is load
