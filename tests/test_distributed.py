"""Several processes (torchrun): sharding, gradient averaging, the differentiable gather, and a real
2-process CPU run (gloo) through the CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sslaudio import distributed
from sslaudio.data import StepSampler


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shards_of_every_process_make_the_single_process_batch():
    single = list(StepSampler(10, 6, seed=3, start_step=0, steps=5))
    worlds = [distributed.World(rank=r, size=3) for r in range(3)]
    shards = [list(StepSampler(10, 6, 3, 0, 5, w.shard(6))) for w in worlds]
    for step, keys in enumerate(single):
        assert sum((s[step] for s in shards), []) == keys  # contiguous rows, in order
        assert all(len(s[step]) == 2 for s in shards)


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    world = distributed.World(rank, world_size)
    try:
        # gradients: a on both (different values), b on rank 1 only, c on none
        a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
        a.grad = torch.full((3,), float(rank + 1))
        if rank == 1:
            b.grad = torch.tensor([2.0, 4.0, 6.0])
        distributed.average_gradients([a, b, c], world)
        # gather: the loss of process r is sum(gathered * (r + 1) * row index); each process's rows
        # must receive the gradient of the sum of every process's loss
        x = torch.full((2, 2), float(rank), requires_grad=True)
        g, offset = distributed.gather_rows(x)
        weight = (rank + 1) * torch.arange(4.0)[:, None].expand(4, 2)
        (g * weight).sum().backward()
        mean = distributed.mean_scalar(torch.tensor(float(rank)), world)
        result = {"a": a.grad.tolist(), "b": b.grad.tolist(), "c": c.grad is None, "g": g.tolist(),
                  "offset": offset, "xgrad": x.grad.tolist(), "mean": float(mean)}
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_average_gradients_gather_and_mean_across_two_processes(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [json.loads((tmp_path / f"{k}.json").read_text()) for k in range(2)]
    for k in range(2):
        assert r[k]["a"] == [1.5] * 3  # (1 + 2) / 2
        assert r[k]["b"] == [1.0, 2.0, 3.0]  # (0 + [2, 4, 6]) / 2
        assert r[k]["c"] is True  # no process had one: stays None (AdamW skips it, as one process)
        assert r[k]["g"] == [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        assert r[k]["offset"] == 2 * k
        assert r[k]["mean"] == 0.5
        # d(sum_r loss_r)/d(rows of k) = (1 + 2) * row index of those rows in the gathered batch
        assert r[k]["xgrad"] == [[3.0 * (2 * k + i)] * 2 for i in range(2)]


@pytest.fixture
def wav_folder(tmp_path):
    rng = np.random.default_rng(0)
    t = np.arange(24000) / 16000
    for i in range(6):
        x = 0.05 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t)
        sf.write(str(tmp_path / f"{i}.wav"), x.astype(np.float32), 16000)
    return tmp_path


@pytest.mark.parametrize("preset", ["tiny/simclr", "tiny/m2d"])  # gathered negatives; EMA + keep masks
def test_torchrun_two_processes_on_cpu(preset, wav_folder, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "sslaudio", "pretrain", str(wav_folder), "--preset", preset, "--out", str(run),
           "--device", "cpu", "--quiet", "--set", "train.steps=4", "--set", "train.batch_size=8",
           "--set", "train.log_every=2", "--set", "train.ckpt_every=2", "--set", "data.num_workers=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]  # one writer: rank 0
    assert all(np.isfinite(r["loss"]) for r in rows)
    state = json.loads((run / "ckpt" / "step-000000004" / "state.json").read_text())
    assert state["world_size"] == 2  # and check_in_sync passed at steps 2 and 4
    assert (run / "export" / "encoder.safetensors").is_file()
    assert p.stdout.count("pretrain") == 1  # one summary table


def test_global_batch_must_split_evenly(wav_folder, tmp_path, monkeypatch):
    from sslaudio.build import load_preset
    from sslaudio.config import ConfigError
    from sslaudio.train import fit

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="divisible by the 3 processes"):
        fit(load_preset("tiny/byol-a", ["train.batch_size=8"]), [str(wav_folder)], tmp_path / "r", device="cpu")
