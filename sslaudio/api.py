"""`sslaudio.load(CKPT)`: embed waveforms held in memory, at any sample rate and channel count.

    model = sslaudio.load("runs/byola")                  # any CKPT the CLI takes, random:PRESET too
    e = model.embed(waveform, 44100)                     # e.clip (D,), e.frames (T, D), e.timestamps (T,) s
    out = model.layers(waveform, 44100)                  # out.layers: every layer's (T, D_l), out.frame_rate

A waveform is a numpy array or a torch tensor: (S,) mono, (C, S) channels (averaged to mono, as
extraction downmixes files), or (B, C, S) a batch; a list of (S,) / (C, S) waveforms of any
lengths is a batch too (a (B, S) batch of mono clips is `list(x)` or `x[:, None]`: a 2-D input is
always one clip's channels). One waveform gives one result, a batch a list. Float samples are
taken as they are; int16 / int32 / int8 / uint8 samples are scaled to [-1, 1) as soundfile
reads them. Everything is resampled (torchaudio's sinc) to the encoder's rate. Results are float32
CPU tensors; timestamps are float64 seconds, the centre of each frame's receptive field
(`Encoder.frame_times`), as extraction writes them.

Memory stays bounded as in extraction: equal-length waveforms are embedded `batch_size` at a time,
never padded (so a batch gives each clip the numbers it gets alone), and a waveform longer than
`chunk_seconds` is encoded chunk by chunk, its clip embedding pooled over every chunk's frames
(`encoders.base.ClipPool`). Chunks start on the frame grid and reach `need - downsample` samples
past their end when a frame's receptive field is wider than the frame hop (the wav2vec 2.0 conv
stack: 400 samples per 320), so no frame is lost at a chunk boundary and the timestamps stay one
hop apart over the whole input (the HEAR API checks that); frames are kept where their centre
lies in their own chunk. For encoders whose receptive field fits in one hop (the CNNs, the
spectrogram ViTs) this is exactly the chunking of `sslaudio extract`.

Bad input is an `InputError` (a ValueError) with one line naming the waveform and what is wrong:
not an array, an empty one, NaN / Inf samples, a shape that is neither (S,), (C, S) nor
(B, C, S), a (S, C) array as soundfile returns it, or one shorter than the encoder's smallest
input. A checkpoint that cannot be loaded is a `CheckpointError`, an unknown preset a ConfigError.

`random:PRESET` has no training statistics: its frontend normalisation is estimated from the first
waveforms it embeds (up to 64 of them, cropped to a common length), then kept, as extraction
estimates it from its inputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from sslaudio.audio import resample
from sslaudio.checkpoint import CheckpointError
from sslaudio.encoders.base import ClipPool, lengths_to_padding, pool_frames
from sslaudio.features import min_samples
from sslaudio.inference import EncoderBundle, load_encoder
from sslaudio.train import resolve_device

__all__ = ["CheckpointError", "Embedder", "Embeddings", "InputError", "Layers", "load"]

_INT_SCALE = {np.dtype("int16"): 2.0 ** 15, np.dtype("int32"): 2.0 ** 31, np.dtype("int8"): 2.0 ** 7}


class InputError(ValueError):
    """A waveform that cannot be embedded: one line saying which and why."""


@dataclass
class Embeddings:
    clip: Tensor  # (D,) the encoder's clip embedding (its pooling of the frames)
    frames: Tensor  # (T, D_f) frame embeddings
    timestamps: Tensor  # (T,) float64 seconds: the centre of each frame's receptive field
    seconds: float  # the waveform's duration


@dataclass
class Layers:
    layers: list[Tensor]  # every layer's output (T, D_l), as `--layer N` gives it (a transformer: its blocks' input first)
    timestamps: Tensor  # (T,) float64 seconds, shared by every layer
    frame_rate: float  # frames per second (sample_rate / downsample)
    downsample: int  # waveform samples (at the encoder's rate) per frame: s3prl's downsample rate


@dataclass
class _Out:
    clip: Tensor | None
    frames: Tensor | None
    times: np.ndarray
    layers: list[Tensor] | None
    seconds: float


class Embedder(nn.Module):
    """An EncoderBundle with waveform handling around it: see the module docstring. An nn.Module,
    so `.to(device)` moves it (inputs follow it; results come back on the CPU)."""

    def __init__(self, bundle: EncoderBundle, chunk_seconds: float = 30.0, batch_size: int = 16):
        super().__init__()
        if not chunk_seconds > 0:
            raise ValueError(f"chunk_seconds must be > 0, found {chunk_seconds}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, found {batch_size}")
        self.bundle = bundle.eval()
        self.chunk_seconds = float(chunk_seconds)
        self.batch_size = int(batch_size)
        self._dims: tuple[int, int, int] | None = None

    # ---- what the encoder is ----

    @property
    def sample_rate(self) -> int:
        return int(self.bundle.sample_rate)

    @property
    def downsample(self) -> int:
        return int(self.bundle.encoder.downsample)

    @property
    def frame_rate(self) -> float:
        return float(self.bundle.encoder.frame_rate)

    @property
    def device(self) -> torch.device:
        return next(self.bundle.parameters()).device

    @property
    def need(self) -> int:
        """The shortest waveform (samples at sample_rate) that gives one frame."""
        return min_samples(self.bundle, self.device)

    @property
    def dim(self) -> int:
        """Width of the clip embedding."""
        return self._shapes()[0]

    @property
    def frame_dim(self) -> int:
        """Width of a frame embedding."""
        return self._shapes()[1]

    @property
    def num_layers(self) -> int:
        """How many outputs `layers` returns."""
        return self._shapes()[2]

    def _shapes(self) -> tuple[int, int, int]:
        if self._dims is None:
            out = self._encode(torch.zeros(1, self.need, device=self.device), with_layers=True)
            self._dims = (int(out[0].shape[-1]), int(out[1].shape[-1]), len(out[3]))
        return self._dims

    # ---- public calls ----

    def embed(self, waveform, sample_rate: int) -> Embeddings | list[Embeddings]:
        """Clip embedding, frame embeddings and their timestamps (seconds) of one waveform, or a
        list of them for a batch."""
        items, single = self._inputs(waveform, sample_rate)
        res = [Embeddings(o.clip, o.frames, torch.from_numpy(o.times), o.seconds) for o in self._run(items, False)]
        return res[0] if single else res

    def layers(self, waveform, sample_rate: int) -> Layers | list[Layers]:
        """Every block's frame-level output (T, D_l) and the frame rate: what s3prl-style toolkits
        wrap (a weighted sum of layers, or one layer). One waveform gives one Layers, a batch a list."""
        items, single = self._inputs(waveform, sample_rate)
        res = [Layers(o.layers, torch.from_numpy(o.times), self.frame_rate, self.downsample)
               for o in self._run(items, True)]
        return res[0] if single else res

    # ---- input checks ----

    def _inputs(self, waveform, sample_rate) -> tuple[list[Tensor], bool]:
        """-> mono (S,) float32 tensors on self.device at self.sample_rate, and whether the input
        was one waveform."""
        sr = _sample_rate(sample_rate)
        if isinstance(waveform, (list, tuple)):
            if not waveform:
                raise InputError("waveform: an empty list (a batch needs at least one waveform)")
            raw, single = list(waveform), False
            for i, w in enumerate(raw):
                if not isinstance(w, (np.ndarray, Tensor)):
                    raise InputError(f"waveform[{i}]: a list is a batch of arrays or tensors, found "
                                     f"{type(w).__name__}; pass one waveform as an array")
                if w.ndim not in (1, 2):
                    raise InputError(f"waveform[{i}]: expected (samples,) or (channels, samples), found "
                                     f"shape {tuple(w.shape)}")
        elif isinstance(waveform, (np.ndarray, Tensor)):
            if waveform.ndim in (1, 2):
                raw, single = [waveform], True
            elif waveform.ndim == 3:
                if waveform.shape[0] == 0:
                    raise InputError(f"waveform: an empty batch, shape {tuple(waveform.shape)}")
                raw, single = list(waveform), False
            else:
                raise InputError(f"waveform: expected (samples,), (channels, samples) or (batch, channels, "
                                 f"samples), found shape {tuple(waveform.shape)}")
        else:
            raise InputError(f"waveform must be a numpy array or a torch tensor (or a list of them), found "
                             f"{type(waveform).__name__}")
        items = []
        for i, w in enumerate(raw):
            items.append(self._mono(w, sr, "waveform" if single else f"waveform[{i}]"))
        self._fit_stats(items)
        return items, single

    def _mono(self, w, sr: int, name: str) -> Tensor:
        x = _float_tensor(w, name)
        if x.numel() == 0:
            raise InputError(f"{name}: empty (shape {tuple(x.shape)})")
        if x.ndim == 2 and x.shape[0] > x.shape[1]:
            raise InputError(f"{name}: shape {tuple(x.shape)} looks like (samples, channels), as soundfile returns "
                             f"it; pass it transposed (.T): a 2-D waveform is (channels, samples)")
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise InputError(f"{name}: {bad} non-finite sample(s) (NaN or Inf)")
        x = x.to(self.device)
        if x.ndim == 2:
            x = x.mean(0)  # downmix, as audio.load does
        x = resample(x, sr, self.sample_rate)
        if x.shape[0] < self.need:
            raise InputError(f"{name}: too short: {_ms(x.shape[0] / self.sample_rate)} ms < "
                             f"{_ms(self.need / self.sample_rate)} ms the encoder needs")
        return x

    @torch.no_grad()
    def _fit_stats(self, items: list[Tensor]) -> None:
        """random:PRESET: estimate the frontend normalisation from the first waveforms embedded."""
        if not self.bundle.needs_stats:
            return
        p = self.bundle.preset
        sample = items[:64]
        n = min(min(x.shape[0] for x in sample), max(1, int(p.data.clip_seconds * self.sample_rate)))
        self.bundle.frontend.estimate_stats(torch.stack([x[:n] for x in sample]))
        self.bundle.needs_stats = False

    # ---- encoding ----

    @torch.no_grad()
    def _encode(self, audio: Tensor, with_layers: bool) -> tuple[Tensor | None, Tensor, Tensor, list[Tensor] | None]:
        """(B, S) -> clip (B, D) (None with layers), frames (B, T, D_f), frame lengths (B,), and with
        `with_layers` every layer's frames (B, T, D_l)."""
        b = self.bundle
        if not with_layers:
            clip, frames, lengths = b.embed(audio)
            return clip, frames, lengths, None
        x, fl = b.frontend(audio)
        out = b.encoder(x, fl, return_layers=True)
        chosen = out if b.layer is None else dataclasses.replace(out, tokens=out.layers[b.layer])
        frames, lengths = b.encoder.to_frames(chosen)
        # each block's frames as `--layer N` gives them (EncoderBundle.forward swaps the tokens too)
        layers = [b.encoder.to_frames(dataclasses.replace(out, tokens=h))[0] for h in (out.layers or [out.tokens])]
        return pool_frames(frames, lengths_to_padding(lengths, frames.shape[1]), b.clip_stats), frames, lengths, layers

    def _run(self, items: list[Tensor], with_layers: bool) -> list[_Out]:
        """Embed mono waveforms at the encoder's rate: equal lengths batched, long ones chunked."""
        enc = self.bundle.encoder
        chunk = max(1, int(self.chunk_seconds * self.sample_rate / enc.downsample)) * int(enc.downsample)
        results: list[_Out | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, x in enumerate(items):
            if x.shape[0] > chunk:
                results[i] = self._run_long(x, chunk, with_layers)
            else:
                groups.setdefault(x.shape[0], []).append(i)
        for n, idx in groups.items():
            for start in range(0, len(idx), self.batch_size):
                part = idx[start:start + self.batch_size]
                clip, frames, lengths, layers = self._encode(torch.stack([items[i] for i in part]), with_layers)
                for j, i in enumerate(part):
                    t = int(lengths[j])
                    results[i] = _Out(_cpu(clip[j]), _cpu(frames[j, :t]), enc.frame_times(t).numpy(),
                                      [_cpu(h[j, :t]) for h in layers] if layers is not None else None,
                                      n / self.sample_rate)
        return results

    def _run_long(self, x: Tensor, chunk: int, with_layers: bool) -> _Out:
        """One waveform longer than a chunk, chunk by chunk (see the module docstring)."""
        enc, sr, need = self.bundle.encoder, self.sample_rate, self.need
        reach = max(0, need - int(enc.downsample))  # past the chunk, so its last frame is whole
        pool, frames, times, layers = ClipPool(self.bundle.clip_stats), [], [], []
        total = x.shape[0]
        for start in range(0, total, chunk):
            end = min(start + chunk, total)
            piece = x[start:min(end + reach, total)]
            if piece.shape[0] < need:  # a short tail: pad it, keep only the frames centred in the input
                piece = nn.functional.pad(piece, (0, need - piece.shape[0]))
            _, fr, fl, hs = self._encode(piece[None], with_layers)
            t = int(fl[0])
            ts = enc.frame_times(t).numpy() + start / sr
            keep = torch.from_numpy(ts < end / sr)
            f = fr[0, :t][keep.to(fr.device)]
            if f.shape[0] == 0:
                continue
            pool.add(f)
            frames.append(_cpu(f))
            times.append(ts[keep.numpy()])
            if hs is not None:
                layers.append([_cpu(h[0, :t][keep.to(h.device)]) for h in hs])
        cat_layers = [torch.cat(per) for per in zip(*layers)] if with_layers else None
        return _Out(_cpu(pool.value()), torch.cat(frames), np.concatenate(times), cat_layers, total / sr)


def load(ckpt: str | Path, device: str = "auto", layer: int | None = None, chunk_seconds: float = 30.0,
         batch_size: int = 16, pool: str | None = None) -> Embedder:
    """The encoder of `ckpt` (a run folder, step folder, exported encoder file or random:PRESET),
    ready to embed waveforms: see the module docstring. `layer` embeds layer `layer` (as `--layer`,
    negative from the end) instead of the encoder's output, as `extract --layer` does; `pool`
    ('mean', 'max' or 'mean+max') pools the clip embedding that way instead of the encoder's own, as
    `extract --pool` does."""
    bundle = load_encoder(str(ckpt)).set_layer(layer).set_pool(pool)
    return Embedder(bundle, chunk_seconds, batch_size).to(resolve_device(device))


def _sample_rate(sr) -> int:
    ok = isinstance(sr, (int, np.integer, float, np.floating)) and not isinstance(sr, bool)
    if not ok or not np.isfinite(sr) or sr <= 0 or float(sr) != int(sr):
        raise InputError(f"sample_rate must be a positive whole number of Hz, found {sr!r}")
    return int(sr)


def _float_tensor(w, name: str) -> Tensor:
    """float32 tensor of an array or tensor of float or PCM integer samples."""
    if isinstance(w, Tensor):
        if w.is_complex() or w.dtype == torch.bool:
            raise InputError(f"{name}: {w.dtype} samples; expected float (or int16 / int32 PCM)")
        if w.is_floating_point():
            return w.detach().float()
        w = w.detach().cpu().numpy()
    a = np.asarray(w)
    if a.dtype.kind == "f":
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    if a.dtype in _INT_SCALE:
        return torch.from_numpy(a.astype(np.float32) / _INT_SCALE[a.dtype])
    if a.dtype == np.uint8:
        return torch.from_numpy((a.astype(np.float32) - 128.0) / 128.0)
    raise InputError(f"{name}: {a.dtype} samples; expected float (or int16 / int32 / int8 / uint8 PCM)")


def _cpu(x: Tensor) -> Tensor:
    return x.detach().float().cpu()


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}".rstrip("0").rstrip(".")
