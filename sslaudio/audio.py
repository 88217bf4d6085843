"""Audio decoding (soundfile), downmix, resampling (torchaudio) and validation.

Every decode problem becomes an `AudioError` with a short reason, so callers can skip the file
with one warning line and count it, instead of a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif", ".au"}
_FLOAT_SUBTYPES = {"FLOAT", "DOUBLE"}


class AudioError(Exception):
    """A file that cannot be used, with the reason (e.g. 'empty', 'unreadable: ...')."""


@dataclass(frozen=True)
class AudioInfo:
    path: str
    frames: int  # at the file's own rate
    sample_rate: int
    channels: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def probe(path: str | Path, min_seconds: float = 0.0, check_finite: bool = True) -> AudioInfo:
    """Header check of one file; float files are also scanned for NaN/Inf (ints cannot hold them)."""
    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises several types for corrupt data
        raise AudioError(f"unreadable ({_short(e)})") from None
    frames = int(info.frames)
    if info.samplerate <= 0:
        raise AudioError("invalid sample rate")
    if frames <= 0 or frames > 2**62:  # some decoders report a huge count for unknown lengths
        if frames <= 0:
            raise AudioError("empty (no samples)")
        raise AudioError("unknown length")
    if frames / info.samplerate < min_seconds:
        raise AudioError(f"too short ({frames / info.samplerate:.3f} s < {min_seconds} s)")
    if check_finite and info.subtype in _FLOAT_SUBTYPES:
        for block in sf.blocks(str(path), blocksize=1 << 20, dtype="float32", always_2d=True):
            if not np.isfinite(block).all():
                raise AudioError("non-finite samples (NaN or Inf)")
    return AudioInfo(str(path), frames, int(info.samplerate), int(info.channels))


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:120]


def resample(x: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Band-limited sinc resampling along the last dim (torchaudio)."""
    if orig_sr == new_sr:
        return x
    return AF.resample(x, orig_sr, new_sr)


def load(path: str | Path, sample_rate: int, start: int = 0, frames: int = -1) -> torch.Tensor:
    """Decode [start, start+frames) (in the file's own samples), downmix to mono, resample.

    Returns a float32 (S,) tensor at `sample_rate`. Raises AudioError on any decode problem.
    """
    try:
        data, sr = sf.read(str(path), start=start, frames=frames, dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"unreadable ({_short(e)})") from None
    if data.shape[0] == 0:
        raise AudioError("empty (no samples)")
    mono = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    if not torch.isfinite(mono).all():
        raise AudioError("non-finite samples (NaN or Inf)")
    return resample(mono, sr, sample_rate)


def blocks(path: str | Path, sample_rate: int, block_seconds: float, overlap_seconds: float = 0.0):
    """Yield (start_sample_at_target_rate, mono chunk) covering the whole file in bounded memory."""
    info = probe(path, check_finite=False)
    sr = info.sample_rate
    block = max(1, int(round(block_seconds * sr)))
    hop = max(1, block - int(round(overlap_seconds * sr)))
    start = 0
    while start < info.frames:
        chunk = load(path, sample_rate, start=start, frames=min(block, info.frames - start))
        yield int(round(start * sample_rate / sr)), chunk
        if start + block >= info.frames:
            break
        start += hop
