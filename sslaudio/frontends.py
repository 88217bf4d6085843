"""Frontends: waveform (B, S) -> encoder input, computed batched on the training device.

`forward(audio (B, S), lengths (B,)) -> (x, frame_lengths)`. The normalisation statistics are
buffers, estimated once from a sample of the training data (`estimate_stats`) and then saved with
the weights, so extraction and export apply them without being told.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torchaudio
from torch import Tensor, nn

from sslaudio.config import ConfigError, build_component, check_range
from sslaudio.registry import FRONTENDS


class Frontend(nn.Module):
    out_channels: int  # feature rows of the output (n_mels; 1 for waveform)
    hop: int  # waveform samples per output frame
    sample_rate: int

    def estimate_stats(self, audio: Tensor) -> None:
        """Set normalisation buffers from (N, S) training crops."""


@dataclass
class MelConfig:
    """The filterbank settings LogMel and MelDB share."""
    n_mels: int = 64
    n_fft: int = 1024
    win_length: int = 0  # 0: n_fft
    hop: int = 160
    f_min: float = 60.0
    f_max: float = 7800.0
    mel_scale: Literal["htk", "slaney"] = "htk"
    mel_norm: Literal["none", "slaney"] = "none"

    def __post_init__(self):
        if self.n_mels < 1 or self.hop < 1 or self.n_fft < 2:
            raise ConfigError("frontend: n_mels, hop and n_fft must be positive")
        if self.win_length > self.n_fft:
            raise ConfigError("frontend.win_length must be <= n_fft")
        # torch / torchaudio refused these only with a traceback when the frontend was built
        check_range("frontend.win_length", self.win_length, low=0)  # 0: n_fft
        check_range("frontend.f_min", self.f_min, low=0)
        check_range("frontend.f_max", self.f_max, low=self.f_min, low_open=True)


CMVN_STD_FLOOR = 1e-3


def stft_frames(samples, hop: int):
    """Frames of a centred STFT (frame i centred on sample i * hop) over `samples` samples: an int or
    a tensor of lengths. The one place this count is written (frontends, crop checks, spec shapes)."""
    return samples // hop + 1


def valid_moments(x: Tensor, lengths: Tensor, ddof: int) -> tuple[Tensor, Tensor, Tensor]:
    """Statistics over the last axis of x (B, ..., T), each item's first lengths[b] entries only:
    the valid mask (B, 1, ..., T) in x's dtype, and the mean and variance (divisor n - ddof, at
    least 1) with the axis kept."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    valid = torch.arange(x.shape[-1], device=x.device)[None] < lengths.to(x.device)[:, None]
    valid = valid.to(x.dtype).view(shape)
    n = valid.sum(-1, keepdim=True).clamp_min(1)
    mean = (x * valid).sum(-1, keepdim=True) / n
    var = (((x - mean) * valid) ** 2).sum(-1, keepdim=True) / (n - ddof).clamp_min(1)
    return valid, mean, var


def utterance_cmvn(x: Tensor, frame_lengths: Tensor) -> Tensor:
    """(B, F, T) -> each item's bins shifted and scaled to mean 0 and unbiased std 1 over its first
    frame_lengths[b] frames (padded frames get the same shift and scale); std floored at
    CMVN_STD_FLOOR (see LogMel)."""
    _, mean, var = valid_moments(x, frame_lengths, ddof=1)
    return (x - mean) / var.sqrt().clamp_min(CMVN_STD_FLOOR)


@FRONTENDS.register("logmel")
class LogMel(Frontend):
    """Log-mel filterbank (torchaudio), then (x - mean) / std with dataset-wide scalar statistics.

    BYOL-A (Niizumi et al. 2021) and M2D compute log(mel + eps) and normalise by the dataset mean
    and std ("pre-normalisation"); we estimate both once before training and keep them as buffers.

    Filterbank: `mel_scale` htk (torchaudio's default, 2595 log10(1 + f / 700)) or slaney (linear
    below 1 kHz, log above: librosa's and nnAudio's default), `mel_norm` none (peak 1) or slaney
    (each triangle scaled by 2 / bandwidth: librosa / nnAudio `norm=1`). The official BYOL-A v2
    (v2/train_v2.py) and M2D (m2d/runtime_audio.py) front ends are nnAudio.features.MelSpectrogram
    with its defaults htk=False, norm=1, i.e. slaney / slaney; BYOL-A v1's train.py uses torchaudio's
    MelSpectrogram with its defaults (htk, no norm), today's default here. A filter with no FFT bin
    under it (too many bands for the FFT resolution at low frequencies) is a config error.

    `cmvn: true` normalises every item instead, per mel bin over its own valid frames (mean 0,
    unbiased std 1): the utterance-wise CMVN of s3prl's APC / NPC / Mockingjay / TERA feature
    extraction (upstream/*/audio.py `CMVN`: (x - mean) / (1e-10 + std) over time). It replaces the
    dataset statistics, which it would cancel anyway. One deviation: the std is floored at 1e-3, so
    a bin that is constant over the item (digital silence, audio band-limited below f_max) comes out
    as zeros instead of float rounding blown up by 1e10; log-mel bins of real audio vary by ~1.
    Long files embedded in chunks are normalised per chunk.
    """

    @dataclass
    class Config(MelConfig):
        eps: float = 1.1920929e-07  # torch.finfo(float32).eps, as the BYOL-A code adds before log
        normalize: bool = True  # dataset-wide mean / std (estimate_stats)
        cmvn: bool = False  # per item and mel bin over its valid frames, instead of the dataset statistics

        def __post_init__(self):
            super().__post_init__()
            # log(power + eps): eps <= 0 gave -inf on digital silence, NaN (and a crash) below 0
            check_range("frontend.eps", self.eps, low=0, low_open=True)

    def __init__(self, cfg: Config, sample_rate: int):
        super().__init__()
        if cfg.f_max > sample_rate / 2:
            raise ConfigError(f"frontend.f_max {cfg.f_max} is above the Nyquist frequency of {sample_rate} Hz")
        self.cfg = cfg
        self.sample_rate = sample_rate
        self.hop = cfg.hop
        self.out_channels = cfg.n_mels
        with warnings.catch_warnings():  # torchaudio warns of empty filters; the check below refuses them
            warnings.filterwarnings("ignore", message="At least one mel filterbank has all zero values")
            self.mel = torchaudio.transforms.MelSpectrogram(
                sample_rate=sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length or cfg.n_fft,
                hop_length=cfg.hop, f_min=cfg.f_min, f_max=cfg.f_max, n_mels=cfg.n_mels, power=2.0,
                norm=None if cfg.mel_norm == "none" else cfg.mel_norm, mel_scale=cfg.mel_scale)
        empty = (self.mel.mel_scale.fb.amax(dim=0) <= 0).nonzero().flatten().tolist()  # fb: (n_freq, n_mels)
        if empty:
            raise ConfigError(f"frontend: mel bin {empty[0]} of {cfg.n_mels} is empty (0-based; empty bins: {empty}) "
                              f"with n_fft {cfg.n_fft}, f_min {cfg.f_min}, mel_scale {cfg.mel_scale}; "
                              "use fewer n_mels or a larger n_fft")
        self.conv_stft = False
        self.register_buffer("norm_mean", torch.zeros(()))
        self.register_buffer("norm_std", torch.ones(()))

    def log_mel(self, audio: Tensor) -> Tensor:
        """(B, S) -> (B, n_mels, T) un-normalised log-mel, computed in float32."""
        min_len = self.cfg.n_fft // 2 + 1  # reflect padding needs more than half a window
        if audio.shape[-1] < min_len:
            audio = nn.functional.pad(audio, (0, min_len - audio.shape[-1]))
        with torch.autocast(audio.device.type, enabled=False):
            if self.conv_stft:
                return (self._mel_conv(audio.float()) + self.cfg.eps).log()
            return (self.mel(audio.float()) + self.cfg.eps).log()

    def use_conv_stft(self) -> None:
        """Compute the STFT as a strided conv1d with a windowed DFT basis: the same numbers
        (to float rounding) through ops every exporter supports (ONNX has no complex STFT)."""
        n_fft = self.cfg.n_fft
        win_len = self.cfg.win_length or n_fft
        window = torch.hann_window(win_len, dtype=torch.float64)
        left = (n_fft - win_len) // 2
        window = nn.functional.pad(window, (left, n_fft - win_len - left))
        k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)[:, None]
        n = torch.arange(n_fft, dtype=torch.float64)[None]
        ang = 2 * torch.pi * k * n / n_fft
        basis = torch.cat([torch.cos(ang), -torch.sin(ang)]) * window  # (2 * n_freq, n_fft)
        self.register_buffer("dft_basis", basis.float().unsqueeze(1).to(self.norm_mean.device), persistent=False)
        self.conv_stft = True

    def _mel_conv(self, audio: Tensor) -> Tensor:
        pad = self.cfg.n_fft // 2
        x = nn.functional.pad(audio.unsqueeze(1), (pad, pad), mode="reflect")  # (B, 1, S + n_fft)
        y = nn.functional.conv1d(x, self.dft_basis, stride=self.hop)  # (B, 2 * n_freq, T)
        re, im = y.chunk(2, dim=1)
        power = re * re + im * im  # (B, n_freq, T)
        return torch.matmul(power.transpose(1, 2), self.mel.mel_scale.fb).transpose(1, 2)  # (B, n_mels, T)

    def forward(self, audio: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = self.log_mel(audio)  # (B, F, T)
        if lengths is None:
            frame_lengths = torch.full((x.shape[0],), x.shape[-1], dtype=torch.long, device=x.device)
        else:
            frame_lengths = torch.clamp(stft_frames(lengths, self.hop), max=x.shape[-1])
        if self.cfg.cmvn:
            x = utterance_cmvn(x, frame_lengths)
        elif self.cfg.normalize:
            x = (x - self.norm_mean) / self.norm_std
        return x, frame_lengths

    @torch.no_grad()
    def estimate_stats(self, audio: Tensor) -> None:
        x = torch.cat([self.log_mel(chunk) for chunk in audio.split(64)])
        self.norm_mean.copy_(x.mean())
        self.norm_std.copy_(x.std().clamp_min(1e-5))


@FRONTENDS.register("mel_db")
class MelDB(LogMel):
    """Mel power in dB, floored `top_db` below each clip's maximum, scaled by fixed dB bounds: the
    ATST front end (Li et al. 2022 / 2024; github.com/Audio-WestlakeU/audiossl,
    methods/atst/transform.py and methods/atstframe/transform.py): torchaudio MelSpectrogram (htk
    scale, no filter norm, power 2, centred STFT), AmplitudeToDB(power, top_db=80), then
    MinMax(min=-79.6482, max=50.6842): x = (dB - min) / (max - min) * 2 - 1.

    AmplitudeToDB on one clip's (1, F, T) spectrogram clamps at 80 dB below that clip's maximum;
    here the maximum is taken per item over its valid frames (torchaudio's batched call would take
    it over the whole batch). The min-max scaling is kept in LogMel's normalisation buffers
    (mean (min + max) / 2, std (max - min) / 2), fixed constants never re-estimated.
    """

    @dataclass
    class Config(MelConfig):
        top_db: float = 80.0  # 0: no floor
        db_min: float = -79.6482  # official MinMax bounds (dB), computed on AudioSet
        db_max: float = 50.6842

        def __post_init__(self):
            super().__post_init__()
            if self.top_db < 0:
                raise ConfigError(f"frontend.top_db must be >= 0 (0: no floor), found {self.top_db}")
            if not self.db_max > self.db_min:
                raise ConfigError(f"frontend.db_max ({self.db_max}) must exceed frontend.db_min ({self.db_min})")

    AMIN = 1e-10  # torchaudio AmplitudeToDB's floor on the power before log10

    def __init__(self, cfg: Config, sample_rate: int):
        super().__init__(cfg, sample_rate)
        self.norm_mean.fill_((cfg.db_min + cfg.db_max) / 2)
        self.norm_std.fill_((cfg.db_max - cfg.db_min) / 2)

    def power_mel(self, audio: Tensor) -> Tensor:
        """(B, S) -> (B, n_mels, T) mel power, computed in float32."""
        min_len = self.cfg.n_fft // 2 + 1  # reflect padding needs more than half a window
        if audio.shape[-1] < min_len:
            audio = nn.functional.pad(audio, (0, min_len - audio.shape[-1]))
        with torch.autocast(audio.device.type, enabled=False):
            return self._mel_conv(audio.float()) if self.conv_stft else self.mel(audio.float())

    def log_mel(self, audio: Tensor, frame_lengths: Tensor | None = None) -> Tensor:
        """(B, S) -> (B, n_mels, T) dB, floored top_db below each item's maximum over its valid
        frames (all frames without frame_lengths), before the min-max scaling."""
        db = 10.0 * torch.log10(self.power_mel(audio).clamp_min(self.AMIN))
        if self.cfg.top_db <= 0:
            return db
        if frame_lengths is None:
            top = db.amax(dim=(1, 2), keepdim=True)
        else:
            pad = torch.arange(db.shape[-1], device=db.device)[None, :] >= frame_lengths.to(db.device)[:, None]
            top = db.masked_fill(pad[:, None, :], float("-inf")).amax(dim=(1, 2), keepdim=True)
        return torch.maximum(db, top - self.cfg.top_db)

    def forward(self, audio: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        frame_lengths = None
        if lengths is not None:
            n_frames = stft_frames(max(audio.shape[-1], self.cfg.n_fft // 2 + 1), self.hop)
            frame_lengths = torch.clamp(stft_frames(lengths, self.hop), max=n_frames)
        db = self.log_mel(audio, frame_lengths)  # (B, F, T)
        if frame_lengths is None:
            frame_lengths = torch.full((db.shape[0],), db.shape[-1], dtype=torch.long, device=db.device)
        return (db - self.norm_mean) / self.norm_std, frame_lengths

    def estimate_stats(self, audio: Tensor) -> None:
        """Nothing to estimate: the scaling is the official fixed dB bounds."""


@FRONTENDS.register("waveform")
class Waveform(Frontend):
    """Raw waveform (B, S); optionally normalised per utterance to zero mean and unit variance
    over its valid samples, as wav2vec 2.0 / data2vec audio (`normalize: true`) do."""

    @dataclass
    class Config:
        normalize: bool = True

    def __init__(self, cfg: Config, sample_rate: int):
        super().__init__()
        self.cfg = cfg
        self.sample_rate = sample_rate
        self.hop = 1
        self.out_channels = 1

    def forward(self, audio: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        audio = audio.float()
        if lengths is None:
            lengths = torch.full((audio.shape[0],), audio.shape[-1], dtype=torch.long, device=audio.device)
        if self.cfg.normalize:
            valid, mean, var = valid_moments(audio, lengths, ddof=0)
            audio = (audio - mean) / torch.sqrt(var + 1e-5) * valid
        return audio, lengths


def build_frontend(section: dict, sample_rate: int) -> Frontend:
    return build_component(FRONTENDS, section, "frontend", sample_rate=sample_rate)


class KaldiMFCC(nn.Module):
    """Kaldi MFCCs with deltas, batched: the labels of HuBERT's first iteration.

    fairseq `examples/hubert/simple_kmeans/dump_mfcc_feature.py` computes, per utterance,
    `torchaudio.compliance.kaldi.mfcc(wav, sample_frequency=sr, use_energy=False)` (25 ms frames
    every 10 ms without padding (snip_edges), DC removal, pre-emphasis 0.97, Povey window, 512-point
    power spectrum, 23 mel bins from 20 Hz to Nyquist, log, orthonormal DCT to 13 coefficients with
    the first scaled to sqrt(1 / 23), cepstral lifter 22, no dither), then appends the deltas and
    delta-deltas (`torchaudio.functional.compute_deltas`, window 5): 39 numbers per frame at 100 Hz.
    This computes the same for a batch (B, S) in one pass (tests compare it with torchaudio's).
    Frame j is centred at sample j * hop + win / 2."""

    def __init__(self, sample_rate: int = 16000, n_ceps: int = 13, n_mels: int = 23, deltas: bool = True):
        super().__init__()
        self.sample_rate = sample_rate
        self.win = int(sample_rate * 0.025)
        self.hop = int(sample_rate * 0.010)
        self.n_fft = 1 << (self.win - 1).bit_length()  # round_to_power_of_two
        self.deltas = deltas
        self.dim = n_ceps * (3 if deltas else 1)
        fb = torchaudio.compliance.kaldi.get_mel_banks(n_mels, self.n_fft, float(sample_rate), 20.0, 0.0,
                                                        100.0, -500.0, 1.0)[0]  # (n_mels, n_fft / 2)
        fb = torch.nn.functional.pad(fb, (0, 1))  # the Nyquist bin gets no weight, as Kaldi
        self.register_buffer("mel", fb.float(), persistent=False)
        dct = torchaudio.functional.create_dct(n_mels, n_mels, "ortho")  # (n_mels, n_mels)
        dct[:, 0] = (1.0 / n_mels) ** 0.5
        self.register_buffer("dct", dct[:, :n_ceps].float(), persistent=False)
        i = torch.arange(n_ceps, dtype=torch.float64)
        self.register_buffer("lifter", (1 + 11.0 * torch.sin(torch.pi * i / 22.0)).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(self.win, periodic=False, dtype=torch.float64)
                             .pow(0.85).float(), persistent=False)

    def frames(self, n_samples: int) -> int:
        return 0 if n_samples < self.win else 1 + (n_samples - self.win) // self.hop

    def frame_times(self, n_frames: int) -> Tensor:
        return (torch.arange(n_frames, dtype=torch.float64) * self.hop + self.win / 2) / self.sample_rate

    @torch.no_grad()
    def forward(self, audio: Tensor) -> Tensor:
        """(B, S) waveform -> (B, T, 13 or 39) float32."""
        x = audio.float().unfold(-1, self.win, self.hop)  # (B, T, win)
        x = x - x.mean(-1, keepdim=True)
        x = x - 0.97 * torch.cat([x[..., :1], x[..., :-1]], dim=-1)
        x = x * self.window
        power = torch.fft.rfft(x, n=self.n_fft).abs().pow(2)  # (B, T, n_fft / 2 + 1)
        logmel = torch.log((power @ self.mel.t()).clamp_min(torch.finfo(torch.float32).eps))
        c = (logmel @ self.dct) * self.lifter  # (B, T, n_ceps)
        if not self.deltas:
            return c
        d = torchaudio.functional.compute_deltas(c.transpose(1, 2))
        dd = torchaudio.functional.compute_deltas(d)
        return torch.cat([c, d.transpose(1, 2), dd.transpose(1, 2)], dim=-1)
