"""The encoder contract, checked for every registered encoder (each built from a tiny preset that
uses it): declared rates and lengths agree with what forward returns, extraction writes the
encoder's own `frame_times`, a click placed at a frame's timestamp shows up in that frame, and
malformed or too short input is one clear line."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from sslaudio.build import load_components, load_preset
from sslaudio.config import list_presets
from sslaudio.features import embed_files
from sslaudio.inference import load_encoder
from sslaudio.registry import ENCODERS
from tests.conftest import gen, write_wav

load_components()


def _preset_for(encoder: str) -> str:
    return next(n for n in list_presets() if n.startswith("tiny/") and load_preset(n).encoder["name"] == encoder)


ENCODER_PRESETS = {name: _preset_for(name) for name in ENCODERS.names()}
ENCODER_PRESETS["vit"] = "tiny/m2d"  # sin-cos positions; learned, cut positions and 64 x 4 patches below
ENCODER_PRESETS["vit/atst"] = "tiny/atst-frame"
# Mockingjay's frame transformer: tiny/hubert's per-frame feature LayerNorm normalises a broadband
# click away in its own frame (the spectrum it adds is flat), so the click test would not see it there
ENCODER_PRESETS["frame_transformer"] = "tiny/mockingjay"
CAUSAL = {"rnn", "cpc"}  # context frames integrate the past: a click changes every later frame
HOLED = {"npc"}  # the output at t never sees the input frames centred on t (NPC's masked convolutions)


def bundle(encoder: str):
    torch.manual_seed(0)
    b = load_encoder(f"random:{ENCODER_PRESETS[encoder]}")
    b.needs_stats = False  # the default statistics: what matters here is timing
    return b


def noise(seconds: float, sr: int) -> torch.Tensor:
    return torch.randn(1, int(seconds * sr), generator=gen(0)) * 0.01


@pytest.mark.parametrize("encoder", sorted(ENCODER_PRESETS))
def test_declared_rates_and_lengths_match_forward(encoder):
    b = bundle(encoder)
    enc, sr = b.encoder, b.sample_rate
    assert enc.frame_rate == pytest.approx(sr / enc.downsample)
    audio = torch.cat([noise(1.3, sr), noise(1.3, sr)])
    lengths = torch.tensor([audio.shape[1], audio.shape[1] * 2 // 3])
    with torch.no_grad():
        x, xl = b.frontend(audio, lengths)
        out = enc(x, xl)
        frames, fl = enc.to_frames(out)
    assert frames.shape[2] == enc.frame_dim
    assert fl.tolist() == enc.output_lengths(xl).tolist()
    assert frames.shape[1] == int(enc.output_lengths(torch.tensor([x.shape[-1]]))[0])
    times = enc.frame_times(frames.shape[1])
    assert times.dtype == torch.float64 and torch.all(times[1:] > times[:-1])
    # consecutive frames are one frame period apart
    assert torch.allclose(times[1:] - times[:-1], torch.full_like(times[1:], 1 / enc.frame_rate))


@pytest.mark.parametrize("encoder", sorted(ENCODER_PRESETS))
def test_extracted_timestamps_are_the_encoders_frame_times(encoder, tmp_path):
    b = bundle(encoder)
    sr = b.sample_rate
    short = write_wav(tmp_path / "short.wav", noise(1.7, sr)[0].numpy(), sr)
    long = write_wav(tmp_path / "long.wav", noise(5.5, sr)[0].numpy(), sr)
    out = {e.rel: e for e in embed_files(b, [(str(short), "short"), (str(long), "long")], torch.device("cpu"),
                                         True, chunk_seconds=2.0)}
    e = out["short"]
    np.testing.assert_allclose(e.times, b.encoder.frame_times(len(e.frames)).numpy(), rtol=0, atol=1e-9)
    assert e.frames.shape == (len(e.times), b.encoder.frame_dim)
    # a long file is encoded in chunks: each chunk's frames keep their own centres, offset by its start
    e = out["long"]
    assert e.frames.shape[0] == len(e.times) and np.all(np.diff(e.times) >= 0)
    assert 0 <= e.times[0] and e.times[-1] <= 5.5
    first = e.times[e.times < 2.0 - 1e-9]
    np.testing.assert_allclose(first, b.encoder.frame_times(len(first)).numpy()[: len(first)], atol=1e-9)


@pytest.mark.parametrize("encoder", sorted(ENCODER_PRESETS))
def test_a_click_shows_up_in_the_frame_at_its_time(encoder):
    b = bundle(encoder)
    if hasattr(b.frontend.cfg, "normalize") and b.frontend.out_channels == 1:
        b.frontend.cfg.normalize = False  # per-utterance waveform norm: a click would shift every frame
    if getattr(b.frontend.cfg, "cmvn", False):
        b.frontend.cfg.cmvn = False  # per-utterance log-mel CMVN: the same
    sr = b.sample_rate
    base = noise(2.0, sr)
    with torch.no_grad():
        _, f0, _ = b.embed(base)
    times = b.encoder.frame_times(f0.shape[1])
    for k in (f0.shape[1] // 4, f0.shape[1] // 2, 3 * f0.shape[1] // 4):
        t0 = float(times[k])  # the click sits at frame k's timestamp
        x = base.clone()
        i = int(round(t0 * sr))
        x[0, i:i + 8] += 0.8
        with torch.no_grad():
            _, f1, _ = b.embed(x)
        change = (f1 - f0)[0].norm(dim=-1)  # (T,)
        if encoder in CAUSAL:
            # nothing before the click's receptive field changes; the frame at the click does
            early = times < t0 - 0.04
            assert float(change[early].max()) == 0.0 and float(change[k]) > 0, encoder
        elif encoder in HOLED:
            # the frame at the click is blind to it, frames around it see it, and nothing outside
            # the receptive field moves (+1: the click reaches the STFT frames k - 1 .. k + 1)
            far = (torch.arange(len(change)) - k).abs() > b.encoder.receptive_field // 2 + 1
            assert float(change[k]) == 0.0 and float(change.max()) > 0 and float(change[far].max()) == 0.0, k
        else:
            assert int(change.argmax()) == k, (encoder, k, change.argmax())


@pytest.mark.parametrize("encoder", sorted(ENCODER_PRESETS))
def test_malformed_or_too_short_input_is_one_clear_line(encoder):
    """Every encoder refuses, in one ValueError naming it, an input of the wrong rank or width,
    lengths of the wrong shape, and an input (or a padded item) shorter than one output frame."""
    b = bundle(encoder)
    enc = b.encoder.eval()
    name = {"vit/atst": "vit"}.get(encoder, encoder)
    with torch.no_grad():
        x, xl = b.frontend(noise(1.0, b.sample_rate))
        enc(x, xl)  # the well-formed input encodes
        form = "a waveform (B, S)" if x.dim() == 2 else f"a spectrogram (B, {x.shape[1]}, T)"
        with pytest.raises(ValueError, match=re.escape(f"{name}: expected {form}, found {tuple(x[0].shape)}")):
            enc(x[0])
        if x.dim() == 3:  # a spectrogram with other bins than the frontend's
            with pytest.raises(ValueError, match=rf"^{name}: expected a spectrogram"):
                enc(x[:, :-1])
        with pytest.raises(ValueError, match=rf"^{name}: lengths must be \(1,\), found \(2,\)$"):
            enc(x, torch.cat([xl, xl]))
        with pytest.raises(ValueError, match=rf"^{name}: every input needs at least [0-9]+ (frames?|samples?) "
                                             r"\(one [^)]+\), found 0 (frames|samples)$"):
            enc(x[..., :0])
        if encoder != "audiontt":  # its output_lengths gives a short padded item one frame
            pair = torch.cat([x, x])
            with pytest.raises(ValueError, match=rf"^{name}: every input needs at least [0-9]+ .*, found lengths "
                                                 rf"\[{x.shape[-1]}, 0\] with {x.shape[-1]} "):
                enc(pair, torch.tensor([x.shape[-1], 0]))
