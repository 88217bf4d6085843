"""Several processes (torchrun): sharding, gradient averaging, the differentiable gather, and a real
2-process CPU run (gloo) through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.multiprocessing as mp

from sslaudio import distributed
from sslaudio.data import StepSampler
from tests.conftest import free_port, gloo_worker


def test_shards_of_every_process_make_the_single_process_batch():
    single = list(StepSampler(10, 6, seed=3, start_step=0, steps=5))
    worlds = [distributed.World(rank=r, size=3) for r in range(3)]
    shards = [list(StepSampler(10, 6, 3, 0, 5, w.shard(6))) for w in worlds]
    for step, keys in enumerate(single):
        assert [k for s in shards for k in s[step]] == keys  # contiguous rows, in order
        assert all(len(s[step]) == 2 for s in shards)


class _Toy(torch.nn.Module):
    """A method whose step leaves a parameter unused (as keep-mode mask tokens do)."""

    def __init__(self):
        super().__init__()
        self.lin, self.unused = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)

    def forward(self, batch: dict, step: int, generator, max_steps: int) -> dict:
        return {"loss": self.lin(batch["x"]).sum()}


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    world = distributed.World(rank, world_size)
    with gloo_worker(rank, world_size, port):
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
        mean, asked = distributed.mean_scalar_and_count(torch.tensor(float(rank)), rank == 1, world)
        # DDP: rank 0's weights at the start, a step skipped without backward (a non-finite loss),
        # then two micro-batches, the first without the all-reduce
        torch.manual_seed(rank)
        toy = _Toy()
        ddp = distributed.wrap_ddp(toy, torch.device("cpu"))
        ddp({"x": torch.ones(1, 2)}, 0, None, 1)
        rows = torch.tensor([[1.0, 2.0], [3.0, 4.0]]) * (rank + 1)
        with ddp.no_sync():
            (ddp({"x": rows[:1]}, 1, None, 1)["loss"] / 2).backward()
        (ddp({"x": rows[1:]}, 1, None, 1)["loss"] / 2).backward()
        result = {"toy": toy.lin.weight.tolist(), "toy_grad": toy.lin.weight.grad.tolist(),
                  "toy_bias_grad": toy.lin.bias.grad.tolist(), "toy_unused": toy.unused.weight.grad is None,
                  "toy_keys": sorted(toy.state_dict()), "a": a.grad.tolist(), "b": b.grad.tolist(),
                  "c": c.grad is None, "g": g.tolist(),
                  "offset": offset, "xgrad": x.grad.tolist(), "mean": float(mean), "asked": float(asked)}
        Path(out, f"{rank}.json").write_text(json.dumps(result))


def test_average_gradients_gather_mean_and_ddp_across_two_processes(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [json.loads((tmp_path / f"{k}.json").read_text()) for k in range(2)]
    for k in range(2):
        assert r[k]["a"] == [1.5] * 3  # (1 + 2) / 2
        assert r[k]["b"] == [1.0, 2.0, 3.0]  # (0 + [2, 4, 6]) / 2
        assert r[k]["c"] is True  # no process had one: stays None (AdamW skips it, as one process)
        assert r[k]["g"] == [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        assert r[k]["offset"] == 2 * k
        assert r[k]["mean"] == 0.5 and r[k]["asked"] == 1.0  # rank 1's stop request reaches both
        # d(sum_r loss_r)/d(rows of k) = (1 + 2) * row index of those rows in the gathered batch
        assert r[k]["xgrad"] == [[3.0 * (2 * k + i)] * 2 for i in range(2)]
        assert r[k]["toy"] == r[0]["toy"]  # DDP starts from rank 0's weights
        # the mean over processes of (row 0 + row 1) / 2: ((1 + 2) * [4, 6] / 2) / 2
        assert r[k]["toy_grad"] == [[1.5 * 2.0, 1.5 * 3.0]] and r[k]["toy_bias_grad"] == [1.0]
        assert r[k]["toy_unused"] is True  # unused on every process: no gradient, as in one process
        assert r[k]["toy_keys"] == ["lin.bias", "lin.weight", "unused.bias", "unused.weight"]


@pytest.fixture(scope="module")
def wav_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wavs")
    rng = np.random.default_rng(0)
    t = np.arange(24000) / 16000
    for i in range(6):
        x = 0.05 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t)
        sf.write(str(folder / f"{i}.wav"), x.astype(np.float32), 16000)
    return folder


@pytest.fixture(scope="module")
def uninterrupted(wav_folder, tmp_path_factory):
    """get(preset, sets): the uninterrupted 2-process run of those settings, made once per module
    (a torchrun costs seconds of process start-up; the tests only read it)."""
    runs: dict[tuple, Path] = {}

    def get(preset: str, sets: list[str]) -> Path:
        key = (preset, *sets)
        if key not in runs:
            runs[key] = tmp_path_factory.mktemp("full") / "run"
            torchrun(wav_folder, runs[key], preset, *sets)
        return runs[key]

    return get


def torchrun(wav_folder, run, preset: str, *sets: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m sslaudio pretrain` on the CPU: 4 steps of a global batch of 8."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "sslaudio", "pretrain", str(wav_folder), "--preset", preset, "--out", str(run),
           "--device", "cpu", "--quiet", "--set", "train.steps=4", "--set", "train.batch_size=8",
           "--set", "train.log_every=2", "--set", "train.ckpt_every=2", "--set", "data.num_workers=0"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    # the workers leave by os._exit (cli._leave_after_distributed_run): rank 0's table still arrives
    assert p.stdout.count("last loss") == 1, p.stdout[-3000:]
    return p


def losses(run) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "log.jsonl").read_text().splitlines()]


def weights(run, step: int = 4) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "ckpt" / f"step-{step:09d}" / "model.safetensors"))


def one_process(preset: str, wav_folder, run, *sets: str) -> None:
    from sslaudio.build import load_preset
    from sslaudio.train import fit

    fit(load_preset(preset, ["train.steps=4", "train.batch_size=8", "train.log_every=2", "train.ckpt_every=2",
                             "data.num_workers=0", *sets]), [str(wav_folder)], run, device="cpu")


# gathered negatives; EMA + keep masks (a mask token unused in the step), with DDP and FSDP2
# (m2d under FSDP2 is `slow`: test_two_processes_match_one_with_the_same_global_batch[fsdp] keeps FSDP2 in the
# quick suite)
# (simclr is `slow` too: the launch, the one writer and the summary are the m2d case's; the gathered
# negatives' gradients are test_average_gradients_gather_mean_and_ddp_across_two_processes's)
@pytest.mark.parametrize(("preset", "parallel"), [pytest.param("tiny/simclr", "ddp", marks=pytest.mark.slow),
                                                  ("tiny/m2d", "ddp"),
                                                  pytest.param("tiny/m2d", "fsdp", marks=pytest.mark.slow)])
def test_torchrun_two_processes_on_cpu(preset, parallel, wav_folder, tmp_path):
    run = tmp_path / "run"
    p = torchrun(wav_folder, run, preset, f"train.parallel={parallel}")
    rows = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]  # one writer: rank 0
    assert all(np.isfinite(r["loss"]) for r in rows)
    state = json.loads((run / "ckpt" / "step-000000004" / "state.json").read_text())
    assert state["world_size"] == 2  # and check_in_sync passed at steps 2 and 4
    assert (run / "export" / "encoder.safetensors").is_file()
    assert p.stdout.count("pretrain") == 1  # one summary table
    if preset == "tiny/m2d":
        # one process with two micro-batches draws the same masks for the same rows and sums the
        # same gradients. DDP (with its unused-parameter search): the same weights, bit for bit
        # (measured); FSDP2 (every ViT block a unit, the EMA teacher's too, updated on its shards)
        # sums in another order: measured 1e-5 at most after Adam (a few near-zero gradient
        # elements), 6e-8 relative on the loss. Checkpoint keys as one process's either way.
        one_process(preset, wav_folder, tmp_path / "one", "train.grad_accum=2")
        w2, w1 = weights(run), weights(tmp_path / "one")
        assert w2.keys() == w1.keys()
        if parallel == "ddp":
            assert all(torch.equal(w2[k], w1[k]) for k in w1) and losses(run) == losses(tmp_path / "one")
        else:
            assert all(torch.allclose(w2[k], w1[k], rtol=0, atol=3e-4) for k in w1)
            assert losses(run) == pytest.approx(losses(tmp_path / "one"), rel=1e-5, abs=0)


# APC: no BatchNorm, dropout, masks or gathered rows, so processes and micro-batches change only
# the order of the sums
APC = ["data.clip_seconds=0.5", "data.norm_samples=8", "optim.warmup_steps=1", "train.log_every=1"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp", pytest.param("allreduce", marks=pytest.mark.slow)])
def test_two_processes_match_one_with_the_same_global_batch(parallel, wav_folder, tmp_path):
    """2 processes x 2 micro-batches (the first without the gradient sync) against one process
    with the whole global batch; then the 2-process checkpoint of step 2 resumed in one process
    (FSDP: gathered whole, as one process writes it)."""
    two = tmp_path / "two"
    torchrun(wav_folder, two, "tiny/apc", *APC, "train.grad_accum=2", f"train.parallel={parallel}")
    one_process("tiny/apc", wav_folder, tmp_path / "one", *APC)
    # measured: 2e-7 relative (the loss), 8e-7 (the weights, where Adam turns rounding in a near-zero
    # gradient element into a step of up to lr = 3e-3 for a few of the 3e5 weights)
    assert losses(two) == pytest.approx(losses(tmp_path / "one"), rel=1e-5, abs=0)
    w2, w1 = weights(two), weights(tmp_path / "one")
    assert w2.keys() == w1.keys() and all(torch.allclose(w2[k], w1[k], rtol=0, atol=3e-4) for k in w1)
    if parallel != "allreduce":  # N processes -> M: a 2-process checkpoint resumes in one process
        resumed = tmp_path / "resumed"
        shutil.copytree(two / "ckpt" / "step-000000002", resumed / "ckpt" / "step-000000002")
        one_process("tiny/apc", wav_folder, resumed, *APC, "train.grad_accum=2")
        assert losses(resumed) == pytest.approx(losses(two)[2:], rel=1e-5, abs=0)
        wr = weights(resumed)
        assert wr.keys() == w2.keys() and all(torch.allclose(wr[k], w2[k], rtol=0, atol=3e-4) for k in w2)


def test_global_batch_must_split_evenly(wav_folder, tmp_path, monkeypatch):
    from sslaudio.build import load_preset
    from sslaudio.config import ConfigError
    from sslaudio.train import fit

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="divisible by the 3 processes"):
        fit(load_preset("tiny/byol-a", ["train.batch_size=8"]), [str(wav_folder)], tmp_path / "r", device="cpu")


# small versions of two presets with a per-process mixup memory, logging every step
SMALL = {p: [*sets, "views[0].memory=8", "data.norm_samples=8", "train.log_every=1"] for p, sets in {
    "tiny/byol-a": ["encoder.d=64", "encoder.base_d=8", "method.proj_hidden=32", "method.proj_dim=16"],
    "tiny/atst-clip": ["encoder.dim=32", "encoder.depth=2", "encoder.heads=2", "encoder.eval_blocks=2", "method.proj_hidden=32",
                       "method.proj_dim=16"]}.items()}


def step_with_rank_buffers(full: Path) -> Path:
    """Step 2 of a 2-process run holds rank 1's own mixup memory (ranks.safetensors, hashed in
    state.json). Returns the step-2 folder."""
    step2 = full / "ckpt" / "step-000000002"
    state = json.loads((step2 / "state.json").read_text())
    assert "ranks.safetensors" in state["sha256"]  # rank 1's mixup memory differs from rank 0's
    from safetensors.torch import load_file

    assert any(k.startswith("1/") and "bank" in k for k in load_file(str(step2 / "ranks.safetensors")))
    return step2


def resumes_each_process_exactly(wav_folder, uninterrupted, tmp_path, preset: str, small: list[str]) -> Path:
    """A 2-process run's step 2 (with rank buffers) resumed with 2 processes: the uninterrupted
    run's losses and weights, bit for bit. Returns the step-2 folder."""
    full = uninterrupted(preset, small)
    step2 = step_with_rank_buffers(full)
    resumed = tmp_path / "resumed"
    shutil.copytree(step2, resumed / "ckpt" / step2.name)
    torchrun(wav_folder, resumed, preset, *small)
    assert losses(resumed) == losses(full)[2:]
    w_full, w_res = weights(full), weights(resumed)
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    return step2


@pytest.mark.slow
def test_fsdp_resume_continues_each_process_memory(wav_folder, uninterrupted, tmp_path):
    """FSDP2 keeps buffers whole, so its checkpoints keep every process's mixup memory too: a
    2-process FSDP run of tiny/atst-clip (ViT blocks sharded) resumed from step 2 with 2 processes
    gives the uninterrupted run's losses and weights."""
    resumes_each_process_exactly(wav_folder, uninterrupted, tmp_path, "tiny/atst-clip",
                                 [*SMALL["tiny/atst-clip"], "train.parallel=fsdp"])


def _signalled_worker(rank: int, world_size: int, port: int, wav_folder: str, run: str, preset: str,
                      sets: list[str]) -> None:
    """One process of a 2-process run (as torchrun starts it) in which rank 1 alone gets SIGTERM,
    at the end of step 2 (after that step's loss reduction); writes what fit() raised."""
    import faulthandler
    import signal

    from sslaudio import train

    faulthandler.enable()  # an abort (SIGABRT from C++) prints every thread's Python stack: where it was
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    build = train.build_method

    def build_signalling(p):
        method = build(p)
        after = method.after_step

        def after_step(step, max_steps):
            after(step, max_steps)
            if rank == 1 and step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

        method.after_step = after_step
        return method

    train.build_method = build_signalling
    result = {"raised": None}
    try:
        one_process(preset, wav_folder, run, *sets)  # fit() as torchrun runs it: the same settings
    except train.Interrupted as e:
        result = {"raised": "Interrupted", "signum": e.signum, "step": e.step}
    report = Path(run).parent / f"rank{rank}.json"
    report.with_suffix(".tmp").write_text(json.dumps(result))
    report.with_suffix(".tmp").replace(report)  # whole or absent, whatever stops this process next


@pytest.mark.parametrize(("preset", "parallel"), [
    ("tiny/byol-a", "ddp"), pytest.param("tiny/atst-clip", "fsdp", marks=pytest.mark.slow)])
def test_a_signal_to_one_process_stops_all_after_the_same_step_and_resumes_exactly(preset, parallel, wav_folder,
                                                                                    uninterrupted, tmp_path):
    """The processes agree on the step to stop after (the stop requests travel with the step's loss
    reduction), so the interrupt checkpoint is a collective commit like any other: it holds every
    process's own buffers (and, under FSDP, the gathered weights), and resuming it with 2 processes
    gives the uninterrupted run's losses and weights, bit for bit."""
    small = [*SMALL[preset], f"train.parallel={parallel}"]
    full = uninterrupted(preset, small)
    stopped = tmp_path / "stopped" / "run"
    reports = [stopped.parent / f"rank{r}.json" for r in range(2)]
    try:
        mp.spawn(_signalled_worker, args=(2, free_port(), str(wav_folder), str(stopped), preset, small), nprocs=2,
                 join=True)
    except mp.ProcessExitedException as e:
        # CI saw rank 1 abort twice (gloo: 'terminate called without an active exception'; 95686ba,
        # then again on 25b8e24), never reproduced here in 65 runs, loaded or not. If it comes after
        # both processes wrote their report, fit() had returned on both (the group torn down, the
        # commit complete): past what this test checks (the agreed step, the commit, the exact
        # resume). An abort before a report still fails the test; faulthandler says where it was.
        if e.signal_name != "SIGABRT" or not all(r.is_file() for r in reports):
            raise
        warnings.warn(f"{e}, after every process had reported (an abort at exit in torch's teardown)", stacklevel=1)
    raised = [json.loads(r.read_text()) for r in reports]
    # rank 1 was signalled at the end of step 2: the next reduction carries its request to rank 0
    assert [r["raised"] for r in raised] == ["Interrupted"] * 2 and raised[0]["step"] == 3
    step3 = stopped / "ckpt" / "step-000000003"
    state = json.loads((step3 / "state.json").read_text())
    assert "rank_buffers" not in state and "ranks.safetensors" in state["sha256"]
    torchrun(wav_folder, stopped, preset, *small)
    assert losses(stopped) == losses(full)
    w_full, w_res = weights(full), weights(stopped)
    assert w_full.keys() == w_res.keys() and all(torch.equal(w_full[k], w_res[k]) for k in w_full)


def test_two_process_resume_continues_each_process_memory(wav_folder, uninterrupted, tmp_path):
    """BYOL-A's mixup memory holds each process's own clips: a 2-process checkpoint keeps every
    process's copy (ranks.safetensors); with one process a resume warns and continues from rank 0's.
    (Resuming such a checkpoint with 2 processes, bit for bit: the signal test above, whose interrupt
    checkpoint goes through the same collective commit as this periodic one.)"""
    small = [*SMALL["tiny/byol-a"], "train.parallel=ddp"]  # the signal test's run (ddp is the default)
    step2 = step_with_rank_buffers(uninterrupted("tiny/byol-a", small))
    one = tmp_path / "one"
    shutil.copytree(step2, one / "ckpt" / step2.name)
    from sslaudio.build import load_preset
    from sslaudio.train import fit

    warnings = []
    fit(load_preset("tiny/byol-a", ["train.steps=4", "train.batch_size=8", "train.ckpt_every=2",
                                    "data.num_workers=0", *small]),
        [str(wav_folder)], one, device="cpu", warn=warnings.append)
    assert any("per-process buffers of 2 processes" in w for w in warnings)
