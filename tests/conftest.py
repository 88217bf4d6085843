"""Shared fixtures (small synthetic audio folders written with soundfile, no downloads) and the
helpers the test files share: generators, tiny methods, synthetic batches, fixed views, short runs."""

from __future__ import annotations

import os
import socket
import traceback
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import soundfile as sf
import torch

torch.set_num_threads(1)

from sslaudio.build import build_method, load_preset  # noqa: E402
from sslaudio.methods.base import ViewMethod  # noqa: E402
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


def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with `seed`: what the tests hand to methods, maskers and augmentations."""
    return torch.Generator().manual_seed(seed)


def run_steps(method, audio: torch.Tensor, steps: int, lr: float = 3e-3, weight_decay: float = 0.0) -> list[dict]:
    """Train `method` for `steps` AdamW steps on one fixed batch; the logged scalars per step.
    Seeds follow the trainer's convention (global RNG and the method's generator per step)."""
    opt = torch.optim.AdamW(method.param_groups(weight_decay), lr=lr)
    hist = []
    for step in range(steps):
        torch.manual_seed(step)
        out = method({"audio": audio}, step, gen(step), steps)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        method.after_step(step, steps)
        hist.append({k: float(v.detach()) for k, v in out.items()})
    return hist


def build_tiny(name: str, *overrides: str, seed: int = 0):
    """The method of preset `tiny/NAME` (NAME may carry the `tiny/` already) with `--set` overrides,
    its weights drawn right after torch.manual_seed(seed)."""
    preset = load_preset(name if name.startswith("tiny/") else f"tiny/{name}", list(overrides))
    torch.manual_seed(seed)
    return build_method(preset)


def synth_clips(n: int, seconds: float, seed: int = 0) -> torch.Tensor:
    """(n, S) float32 clips of sslaudio.synth, cycling through the classes; clip i from seed + i."""
    return torch.stack([torch.from_numpy(clip(CLASSES[i % len(CLASSES)], seed + i, seconds=seconds))
                        for i in range(n)]).float()


def synth_batch(n_per_class: int, seconds: float, seed: int = 0) -> torch.Tensor:
    """(n_per_class * classes, 1, S): n_per_class rounds of one clip per class; the k-th clip of
    class i from seed + 100 i + k."""
    clips = [clip(c, seed + 100 * i + k, seconds=seconds) for k in range(n_per_class) for i, c in enumerate(CLASSES)]
    return torch.from_numpy(np.stack(clips)).float().unsqueeze(1)


def random_views(method, B: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Random log-mel views of the shapes the method's view sampler makes: its global crops (two
    for a two-view method), then its local crops, all drawn from one generator in that order."""
    F_, T = method.spec_shape()
    crops, g = getattr(method.cfg, "crops", None), gen(seed)
    n_global, n_local = (crops.global_crops, crops.local_crops) if crops is not None else (2, 0)
    return ([torch.randn(B, F_, T, generator=g) for _ in range(n_global)]
            + [torch.randn(B, F_, crops.local_frames, generator=g) for _ in range(n_local)])


def use_views(monkeypatch, views: list[torch.Tensor]) -> None:
    """Make every view method's forward use copies of these views instead of drawing its own."""
    monkeypatch.setattr(ViewMethod, "make_views", lambda method, audio, g: [v.clone() for v in views])


def replay_views(method, audio: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views a one-segment, one-chain method draws from gen(seed): its augmentation chain
    applied twice to the features of the one crop."""
    g, chain = gen(seed), method.views.global_chains[0]
    x = method.features(audio[:, 0])
    return chain(x, g), chain(x, g)


def first_last(hist: list[dict], n: int = 5, key: str = "loss", start: int = 0) -> tuple[float, float]:
    """Mean of `key` over the n logged steps from `start`, and over the last n steps."""
    return (float(np.mean([h[key] for h in hist[start:start + n]])),
            float(np.mean([h[key] for h in hist[-n:]])))


def true_runs(row) -> list[tuple[int, int]]:
    """Maximal runs of True in a 1-D bool tensor or list, as (start, length)."""
    out, start = [], None
    for i, v in enumerate(list(row.tolist() if isinstance(row, torch.Tensor) else row) + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i - start))
            start = None
    return out


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a test's process group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def gloo_worker(rank: int, world_size: int, port: int):
    """The process group of an mp.spawn test worker around its work. If the work raises, the group
    is destroyed and the error propagates (mp.spawn reports it); if it succeeds, a barrier (no rank
    tears the group down while another still uses it), the group destroyed, and the process leaves
    as the CLI's torchrun workers do (cli._leave_after_distributed_run: flush, os._exit(0)), because
    torch's gloo backend can abort in its C++ destructors at interpreter exit ('terminate called
    without an active exception', SIGABRT; seen in a .ci/run beside two training jobs), which
    mp.spawn would report as a failed worker after the results were written."""
    import torch.distributed as dist

    from sslaudio.cli import _leave_after_distributed_run

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        yield
    except BaseException:
        # the other ranks' barrier then fails too, and mp.spawn may report theirs: print this one
        traceback.print_exc()
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()
    _leave_after_distributed_run()
