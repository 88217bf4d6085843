"""Shared fixtures: small synthetic audio folders written with soundfile (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import soundfile as sf
import torch

torch.set_num_threads(1)

from sslaudio.synth import CLASSES, SR, clip  # noqa: E402


def write_wav(path: Path, x: np.ndarray, sr: int = SR, subtype: str = "PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x, sr, subtype=subtype)
    return path


@pytest.fixture(scope="session")
def audio_dir(tmp_path_factory) -> Path:
    """8 good clips of 1.2 s in a nested folder, one per class."""
    root = tmp_path_factory.mktemp("audio")
    for i, label in enumerate(CLASSES):
        write_wav(root / ("sub" if i % 2 else "") / f"{label}.wav", clip(label, 100 + i, seconds=1.2))
    return root


@pytest.fixture(scope="session")
def labeled_dir(tmp_path_factory) -> Path:
    """A tiny labelled set: 4 classes x (6 train, 2 valid, 3 test) clips of 0.6 s + labels.csv."""
    root = tmp_path_factory.mktemp("labeled")
    rows = ["path,label,split"]
    k = 0
    for label in CLASSES[:4]:
        for split, n in (("train", 6), ("valid", 2), ("test", 3)):
            for _ in range(n):
                rel = f"a/{k:03d}.wav"
                write_wav(root / rel, clip(label, 1000 + k, seconds=0.6))
                rows.append(f"{rel},{label},{split}")
                k += 1
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def bad_dir(tmp_path) -> Path:
    """Good files plus an empty, a corrupt, a NaN and a too-short one."""
    write_wav(tmp_path / "good1.wav", clip("saw", 1, seconds=1.0))
    write_wav(tmp_path / "good2.flac", clip("bell", 2, seconds=1.0), subtype="PCM_16")
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    x = clip("saw", 3, seconds=1.0)
    x[100] = np.nan
    write_wav(tmp_path / "nan.wav", x, subtype="FLOAT")
    write_wav(tmp_path / "short.wav", np.zeros(100, dtype=np.float32))
    return tmp_path


def run_steps(method, audio: torch.Tensor, steps: int, lr: float = 3e-3) -> list[dict]:
    """Train `method` for `steps` AdamW steps on one fixed batch; the logged scalars per step.
    Seeds follow the trainer's convention (global RNG and the method's generator per step)."""
    opt = torch.optim.AdamW(method.param_groups(0.0), lr=lr)
    hist = []
    for step in range(steps):
        torch.manual_seed(step)
        out = method({"audio": audio}, step, torch.Generator().manual_seed(step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        method.after_step(step, steps)
        hist.append({k: float(v.detach()) for k, v in out.items()})
    return hist
