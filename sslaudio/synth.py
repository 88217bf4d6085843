"""A small procedural labeled audio dataset for the demo, tests and examples (no download).

Eight sound classes whose identity lies in their timbre and temporal structure, while pitch,
level, duration, placement and background noise vary at random, so a good representation must be
invariant to those nuisances. Every clip comes from its own seeded generator: the same call always
writes the same bytes.

    OUT/audio/{train,valid,test}/NNNNN.wav   16 kHz mono PCM16, 1 s
    OUT/labels.csv                           path,label,split (paths relative to OUT)
    OUT/unlabeled/NNNNN.wav                  extra unlabeled clips for pretraining
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf

from sslaudio.atomic import atomic_write

CLASSES = ("saw", "square", "bell", "noise_band", "chirp", "pulses", "pluck", "tremolo")
SR = 16000


def _pink(n: int, rng: np.random.Generator) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    spec /= np.sqrt(np.maximum(np.arange(len(spec)), 1))
    x = np.fft.irfft(spec, n)
    return x / (np.abs(x).max() + 1e-9)


def _harmonic(f0: float, t: np.ndarray, harmonics: np.ndarray, amps: np.ndarray) -> np.ndarray:
    ok = harmonics * f0 < SR / 2 - 200
    return (amps[ok, None] * np.sin(2 * np.pi * f0 * harmonics[ok, None] * t[None])).sum(0)


def _event(label: str, n: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / SR
    f0 = float(np.exp(rng.uniform(np.log(110), np.log(880))))
    if label == "saw":
        k = np.arange(1, 30)
        x = _harmonic(f0, t, k, 1.0 / k)
    elif label == "square":
        k = np.arange(1, 30, 2)
        x = _harmonic(f0, t, k, 1.0 / k)
    elif label == "bell":
        ratio, index = rng.uniform(1.3, 3.7), rng.uniform(2, 6)
        x = np.sin(2 * np.pi * f0 * t + index * np.exp(-3 * t) * np.sin(2 * np.pi * f0 * ratio * t)) * np.exp(-4 * t)
    elif label == "noise_band":
        spec = np.fft.rfft(rng.standard_normal(n))
        freqs = np.fft.rfftfreq(n, 1 / SR)
        centre, width = f0 * rng.uniform(1, 4), rng.uniform(0.1, 0.4)
        spec *= np.exp(-0.5 * (np.log(np.maximum(freqs, 1) / centre) / width) ** 2)
        x = np.fft.irfft(spec, n)
    elif label == "chirp":
        f1 = f0 * rng.choice([0.25, 4.0]) * rng.uniform(0.8, 1.2)
        phase = 2 * np.pi * np.cumsum(np.geomspace(f0, f1, n)) / SR
        x = np.sin(phase) + 0.3 * np.sin(2 * phase)
    elif label == "pulses":
        rate = rng.uniform(6, 30)
        env = (np.mod(t * rate, 1.0) < 0.08).astype(float)
        x = env * rng.standard_normal(n) * 0.7 + env * np.sin(2 * np.pi * f0 * 2 * t)
    elif label == "pluck":  # Karplus-Strong
        period = max(2, int(SR / f0))
        buf = rng.uniform(-1, 1, period)
        x = np.empty(n)
        for i in range(n):
            x[i] = buf[i % period]
            buf[i % period] = 0.996 * 0.5 * (buf[i % period] + buf[(i + 1) % period])
    elif label == "tremolo":
        k = np.arange(1, 6)
        x = _harmonic(f0, t, k, 0.6**k) * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(4, 12) * t))
    else:
        raise ValueError(label)
    attack = np.minimum(1.0, t / rng.uniform(0.002, 0.05))
    release = np.minimum(1.0, (t[-1] - t) / 0.02 + 1e-3)
    return x * attack * release / (np.abs(x).max() + 1e-9)


def clip(label: str, seed: int, seconds: float = 1.0) -> np.ndarray:
    """One labelled clip: the event at a random place and level over pink / white noise."""
    rng = np.random.default_rng([seed, 0xC11B])
    n = int(seconds * SR)
    ev_n = int(n * rng.uniform(0.35, 0.95))
    start = int(rng.integers(0, n - ev_n + 1))
    x = np.zeros(n)
    x[start:start + ev_n] = _event(label, ev_n, rng) * 10 ** (rng.uniform(-20, 0) / 20)
    noise = _pink(n, rng) if rng.random() < 0.7 else rng.uniform(-1, 1, n)
    x += noise * 10 ** (rng.uniform(-45, -20) / 20)
    return (0.5 * x / max(1.0, np.abs(x).max() * 2)).astype(np.float32)


def _write(path: Path, x: np.ndarray) -> None:
    atomic_write(path, lambda tmp: sf.write(tmp, x, SR, subtype="PCM_16", format="WAV"), mode=0o666)


def make_dataset(out: str | Path, per_class: tuple[int, int, int] = (40, 10, 20), unlabeled: int = 200,
                 seed: int = 0) -> Path:
    """Write the dataset (idempotent: existing files are kept). Returns OUT/labels.csv."""
    out = Path(out)
    rows, k = [], 0
    for split, count in zip(("train", "valid", "test"), per_class):
        items = [(c, i) for c in CLASSES for i in range(count)]
        order = np.random.default_rng([seed, len(split)]).permutation(len(items))
        for j in order:  # shuffled, so file names say nothing about labels
            label, _ = items[j]
            rel = f"audio/{split}/{k:05d}.wav"
            if not (out / rel).is_file():
                _write(out / rel, clip(label, seed * 1_000_003 + k))
            rows.append((rel, label, split))
            k += 1
    for u in range(unlabeled):
        path = out / "unlabeled" / f"{u:05d}.wav"
        if not path.is_file():
            label = CLASSES[u % len(CLASSES)]
            _write(path, clip(label, seed * 1_000_003 + 500_000 + u, seconds=float(np.random.default_rng(u).uniform(1, 3))))
    labels = out / "labels.csv"

    def write_labels(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "split"])
            w.writerows(rows)

    atomic_write(labels, write_labels, mode=0o666)
    return labels
