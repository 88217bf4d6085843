"""Audio decoding (soundfile), downmix, resampling (torchaudio) and validation.

Every decode problem becomes an `AudioError` with a short reason, so callers can skip the file
with one warning line and count it, instead of a traceback. Path problems (missing, dangling or
looping symlinks, permission denied, folders, pipes) are named before libsndfile is asked, whose
own message for all of them is "System error."; what the mp3 decoder prints on stderr is captured
and becomes part of the reason instead of leaking to the terminal.
"""

from __future__ import annotations

import errno
import functools
import math
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
import torchaudio.functional.functional as _taf

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif", ".au"}
_FLOAT_SUBTYPES = {"FLOAT", "DOUBLE"}
# uncompressed containers: libsndfile counts the frames a cut file really holds (its data chunk
# clamped to the file's size), so every counted sample decodes and the end check is not needed
_PCM_CONTAINERS = {"WAV", "WAVEX", "AIFF", "W64", "RF64"}


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


# Filesystem access, as functions so that tests running as root (where chmod 000 denies nothing)
# can simulate permission errors.
def list_dir(path: str | Path) -> list[os.DirEntry]:
    """The entries of a folder (OSError when it cannot be listed)."""
    with os.scandir(path) as it:
        return list(it)


def open_for_reading(path: str | Path) -> None:
    """Raise the OSError that reading `path` would raise, if any."""
    os.close(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)))


def path_problem(path: str | Path) -> str | None:
    """Why `path` cannot be read as a file (a short reason), or None when it can be opened."""
    if "\x00" in os.fsdecode(path):  # os.stat raises ValueError on it: no file can have such a name
        return "not a valid path (it holds a NUL byte)"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return f"dangling symlink (its target {target} does not exist)"
        return "missing (no such file)"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop"
        if e.errno in (errno.EACCES, errno.EPERM):
            return "permission denied (a folder on its path)"
        return f"unreadable ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        try:
            list_dir(path)
        except OSError as e:
            return f"unreadable folder ({(e.strerror or str(e)).lower()})"
        return "a folder, not an audio file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a pipe, socket or device)"
    try:
        open_for_reading(path)
    except FileNotFoundError:
        return "missing (deleted since it was found)"
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            return "permission denied"
        return f"unreadable ({e.strerror or e})"
    return None


def _sf_path(path: str | Path) -> bytes:
    """soundfile encodes str names strictly; bytes keep non-UTF-8 file names working."""
    return os.fsencode(path)


def _may_use_mpeg_decoder(path: str | Path) -> bool:
    if str(path).lower().endswith(".mp3"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)


@contextmanager
def _captured_stderr(path: str | Path):
    """Capture what C code (libmpg123) writes to file descriptor 2 while decoding `path`.

    Yields a list that holds the captured text (str) afterwards. Only files that may reach the
    mpeg decoder are captured; anything else runs untouched."""
    out: list[str] = []
    if not _may_use_mpeg_decoder(path):
        yield out
        return
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no stderr (closed): nothing can leak
        yield out
        return
    try:
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield out
            finally:
                os.dup2(saved, 2)
                tmp.seek(0)
                out.append(tmp.read(4096).decode("utf-8", "replace"))
    finally:
        os.close(saved)


def _decoder_line(captured: list[str]) -> str:
    lines = [ln.strip() for text in captured for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or "illegal" in ln.lower()]
    line = (errors or lines or [""])[0]
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)  # [src/libmpg123/...:123]
    return line[:120]


def _reason(path: str | Path, e: Exception, captured: list[str]) -> str:
    """One short reason for a soundfile failure on `path`."""
    problem = path_problem(path)
    if problem:
        return problem
    msg = re.sub(r"^Error opening .*?: ", "", _short(e)).strip()
    msg = re.sub(r"^Error : ", "", msg)
    if not msg or msg.startswith("File does not exist or is not a regular file") or msg == "System error.":
        msg = "corrupt, or not an audio format libsndfile knows"  # what libsndfile says for bad mp3 data
    decoder = _decoder_line(captured)
    return f"unreadable ({msg}" + (f"; decoder: {decoder})" if decoder else ")")


def probe(path: str | Path, min_seconds: float = 0.0, check_finite: bool = True) -> AudioInfo:
    """Header check of one file; float files are also scanned for NaN/Inf (ints cannot hold them)."""
    problem = path_problem(path)
    if problem:
        raise AudioError(problem)
    with _captured_stderr(path) as captured:
        try:
            info = sf.info(_sf_path(path))
            error = None
        except Exception as e:  # soundfile raises several types for corrupt data
            error = e
    if error is not None:
        raise AudioError(_reason(path, error, captured)) from None
    frames = int(info.frames)
    if info.samplerate <= 0:
        raise AudioError("invalid sample rate")
    if frames <= 0 or frames > 2**62:  # some decoders report a huge count for unknown lengths
        if frames <= 0:
            raise AudioError("empty (no samples)")
        raise AudioError("unknown length")
    check_duration(frames, int(info.samplerate), min_seconds)
    with _captured_stderr(path) as captured:
        try:
            if check_finite and info.subtype in _FLOAT_SUBTYPES:  # decodes the whole file
                for block in sf.blocks(_sf_path(path), blocksize=1 << 20, dtype="float32", always_2d=True):
                    if not np.isfinite(block).all():
                        raise AudioError("non-finite samples (NaN or Inf)")
            elif not (info.format in _PCM_CONTAINERS and info.subtype.startswith("PCM_")):
                # its last samples decode: catches truncated compressed files for the cost of a seek
                sf.read(_sf_path(path), start=max(0, frames - 1024), dtype="float32", always_2d=True)
            error = None
        except AudioError:
            raise
        except Exception as e:
            error = e
    if error is not None:
        reason = _reason(path, error, captured)
        raise AudioError(reason.replace("unreadable (", "truncated or corrupt near its end (", 1)) from None
    return AudioInfo(str(path), frames, int(info.samplerate), int(info.channels))


def check_duration(frames: int, sample_rate: int, min_seconds: float) -> None:
    """AudioError when `frames` at `sample_rate` last less than `min_seconds` (probe, and the
    cache index's stand-in for it)."""
    if frames / sample_rate < min_seconds:
        raise AudioError(f"too short ({frames / sample_rate:.3f} s < {min_seconds} s)")


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:120]


# torchaudio's own kernel builder and applier (private; a torchaudio without them uses AF.resample)
_get_sinc_resample_kernel = getattr(_taf, "_get_sinc_resample_kernel", None)
_apply_sinc_resample_kernel = getattr(_taf, "_apply_sinc_resample_kernel", None)


@functools.lru_cache(maxsize=16)
def _sinc_kernel(orig_sr: int, new_sr: int) -> tuple[torch.Tensor, int]:
    return _get_sinc_resample_kernel(orig_sr, new_sr, math.gcd(orig_sr, new_sr), 6, 0.99, "sinc_interp_hann",
                                     None, torch.device("cpu"), torch.float32)


def resample(x: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Band-limited sinc resampling along the last dim: torchaudio's AF.resample (its defaults),
    bit for bit, with the kernel built once per pair of rates (for 44.1 -> 16 kHz the kernel
    cost ~5x the resampling of a 2 s crop: most of a training loader's per-item time)."""
    if orig_sr == new_sr:
        return x
    if (_get_sinc_resample_kernel is None or _apply_sinc_resample_kernel is None
            or x.dtype != torch.float32 or x.device.type != "cpu"):
        return AF.resample(x, orig_sr, new_sr)
    kernel, width = _sinc_kernel(orig_sr, new_sr)
    return _apply_sinc_resample_kernel(x, orig_sr, new_sr, math.gcd(orig_sr, new_sr), kernel, width)


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch ops with one intra-op thread inside (restored after): a crop's tensors are small, and
    on busy cores the thread pool's hand-offs made a 2 s crop ~10x slower with 2 threads than with
    1 (the start-up's statistics sample on 4,000 files took 20 s instead of 2 s). DataLoader
    workers already run with one thread; this also makes a crop the same bits whatever the
    number of workers."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)  # ~1 us
    try:
        yield
    finally:
        torch.set_num_threads(n)


def resampled_length(frames: int, orig_sr: int, new_sr: int) -> int:
    """The number of samples `resample` makes of `frames` samples."""
    if orig_sr == new_sr:
        return frames
    return -(-frames * new_sr // orig_sr)  # ceil, as torchaudio


def load(path: str | Path, sample_rate: int, start: int = 0, frames: int = -1) -> torch.Tensor:
    """Decode [start, start+frames) (in the file's own samples), downmix to mono, resample.

    Returns a float32 (S,) tensor at `sample_rate`. Raises AudioError on any decode problem.
    """
    with _captured_stderr(path) as captured:
        try:
            data, sr = sf.read(_sf_path(path), start=start, frames=frames, dtype="float32", always_2d=True)
            error = None
        except Exception as e:
            error = e
    if error is not None:
        raise AudioError(_reason(path, error, captured)) from None
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
