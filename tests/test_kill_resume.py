"""Crash safety through a real `python -m sslaudio pretrain` process: Ctrl-C (SIGINT to the whole
process group, as a terminal sends it, DataLoader workers included), SIGTERM and SIGKILL in the
middle of a run, then a resume, must end exactly where an uninterrupted run ends: the same
per-step losses in log.jsonl and bit-identical weights and optimizer state. And two processes
never write one run folder."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sslaudio import checkpoint
from sslaudio.build import load_preset
from sslaudio.cli import app
from sslaudio.train import fit

STEPS = 16  # a signal lands in steps 2-8, the SIGKILL case 4 rows later: room before the end
SMALL = ["encoder.d=64", "encoder.base_d=8", "method.proj_hidden=32", "method.proj_dim=16", "views[0].memory=8",
         "train.log_every=1", "train.ckpt_every=1000", "data.norm_samples=8", "train.batch_size=4",
         f"train.steps={STEPS}"]
# one method per family: an EMA teacher with BatchNorm and a mixup memory, a queue of keys (one that wraps
# every 3 steps), a normalised prototype codebook
EXTRA = {"tiny/byol-a": [], "tiny/moco-v2": ["method.queue_size=12", "encoder.d=160", "encoder.mlp_hidden=32"],
         "tiny/swav": ["method.prototypes=32", "encoder.d=160", "encoder.mlp_hidden=32"]}  # AudioNTT2022


def at_random_step(case: str) -> int:
    """The log row after which a case is interrupted: drawn once per case (seeded by its name)."""
    return random.Random(case).randint(2, STEPS // 2)


def overrides(preset: str, workers: int, *more: str) -> list[str]:
    return SMALL + EXTRA[preset] + [f"data.num_workers={workers}", *more]


def cli_args(audio_dir, preset: str, run: Path, workers: int, *more: str) -> list[str]:
    sets = sum((["--set", s] for s in overrides(preset, workers, *more)), [])
    return ["pretrain", str(audio_dir), "--preset", preset, "--out", str(run), "--quiet", *sets]


def start(audio_dir, preset: str, run: Path, workers: int, *more: str) -> subprocess.Popen:
    """`python -m sslaudio pretrain` in its own process group (so a signal can go to the group)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # stderr to a file, not a pipe: DataLoader workers inherit a pipe and would hold it open
    err = open(run.parent / f"{run.name}.stderr", "w")
    proc = subprocess.Popen([sys.executable, "-m", "sslaudio", *cli_args(audio_dir, preset, run, workers, *more)],
                            env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    err.close()
    return proc


def finish(proc: subprocess.Popen, run: Path) -> str:
    """Wait for the main process (not for workers it may leave behind) and return its stderr."""
    proc.wait(timeout=120)
    return (run.parent / f"{run.name}.stderr").read_text()


def wait_for_rows(proc: subprocess.Popen, run: Path, k: int, timeout: float = 120) -> None:
    log, t0 = run / "log.jsonl", time.time()
    while time.time() - t0 < timeout:
        if log.is_file() and log.read_text().count("\n") >= k:
            return
        if proc.poll() is not None:
            raise AssertionError(f"pretrain exited with {proc.returncode} before {k} log rows:\n{finish(proc, run)}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"no {k} log rows after {timeout} s")


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())]


def assert_same_step(a: Path, b: Path) -> None:
    """Two step folders hold bit-identical model and optimizer tensors (and optimizer metadata)."""
    for name in ("model.safetensors", "optim.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys(), name
        diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not diff, f"{name} differs in {diff[:5]}"
    _, _, meta_a, _ = checkpoint.load_step(a)
    _, _, meta_b, _ = checkpoint.load_step(b)
    assert meta_a == meta_b


def resume(audio_dir, preset: str, run: Path, workers: int) -> None:
    r = CliRunner().invoke(app, cli_args(audio_dir, preset, run, workers))
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="module")
def reference(audio_dir, tmp_path_factory):
    """The uninterrupted run of each preset, with a checkpoint after every step."""
    runs = {}

    def get(preset: str) -> Path:
        if preset not in runs:
            run = tmp_path_factory.mktemp("reference") / preset.replace("/", "-")
            fit(load_preset(preset, overrides(preset, 0, "train.ckpt_every=1", f"train.keep_last={STEPS}")),
                [str(audio_dir)], run)
            runs[preset] = run
        return runs[preset]

    return get


def step_dir(run: Path, step: int) -> Path:
    return run / "ckpt" / f"step-{step:09d}"


def interrupt_and_resume(reference, audio_dir, tmp_path, preset: str, sig: int, workers: int) -> None:
    ref, run = reference(preset), tmp_path / "run"
    k = at_random_step(f"{preset}-{sig}-{workers}")
    proc = start(audio_dir, preset, run, workers)
    wait_for_rows(proc, run, k)
    os.killpg(proc.pid, sig)  # the whole group: what Ctrl-C in a terminal (or systemd's stop) does
    err = finish(proc, run)
    assert proc.returncode == 130, err
    steps = [s for s, _ in checkpoint.step_dirs(run)]
    assert len(steps) == 1 and k <= steps[0] < STEPS, (steps, err)  # the step it finished, nothing else
    n = steps[0]
    assert f"stopped after step {n}, which is saved" in err and "error: interrupted" in err
    assert [s for s, _ in losses(run)] == list(range(1, n + 1))
    assert not list((run / "ckpt").glob(".tmp*")) and not (run / ".lock").exists()
    assert_same_step(step_dir(run, n), step_dir(ref, n))  # what an uninterrupted run had after step n
    resume(audio_dir, preset, run, workers)
    assert losses(run) == losses(ref)
    assert_same_step(step_dir(run, STEPS), step_dir(ref, STEPS))


# each family once, each signal at least once (SIGTERM with tiny/byol-a: the slow test below, with workers)
@pytest.mark.parametrize("preset,sig", [("tiny/byol-a", signal.SIGINT), ("tiny/moco-v2", signal.SIGINT),
                                        ("tiny/swav", signal.SIGTERM)],
                         ids=["byol-a-int", "moco-int", "swav-term"])
def test_signal_then_resume_is_bit_identical(preset, sig, reference, audio_dir, tmp_path):
    interrupt_and_resume(reference, audio_dir, tmp_path, preset, sig, workers=0)


@pytest.mark.slow
@pytest.mark.parametrize("preset,sig", [("tiny/byol-a", signal.SIGINT), ("tiny/byol-a", signal.SIGTERM),
                                        ("tiny/moco-v2", signal.SIGINT), ("tiny/moco-v2", signal.SIGTERM)],
                         ids=["byol-a-int", "byol-a-term", "moco-int", "moco-term"])
def test_signal_with_dataloader_workers_then_resume_is_bit_identical(preset, sig, reference, audio_dir, tmp_path):
    interrupt_and_resume(reference, audio_dir, tmp_path, preset, sig, workers=2)


def test_sigkill_then_resume_is_bit_identical(reference, audio_dir, tmp_path):
    ref, run = reference("tiny/byol-a"), tmp_path / "run"
    proc = start(audio_dir, "tiny/byol-a", run, 0, "train.ckpt_every=4")
    wait_for_rows(proc, run, at_random_step("sigkill") + 4)
    proc.send_signal(signal.SIGKILL)
    finish(proc, run)
    steps = [s for s, _ in checkpoint.step_dirs(run)]
    assert steps and steps[-1] < STEPS and all(s % 4 == 0 for s in steps)
    assert len(losses(run)) > steps[-1]  # rows past the last checkpoint: the resume drops them
    resume(audio_dir, "tiny/byol-a", run, 0)
    assert losses(run) == losses(ref)
    assert_same_step(step_dir(run, STEPS), step_dir(ref, STEPS))
    assert not list((run / "ckpt").glob(".tmp*"))


def test_one_writer_per_run_folder(audio_dir, tmp_path):
    run = tmp_path / "run"
    first = start(audio_dir, "tiny/byol-a", run, 2, "train.steps=400", "train.ckpt_every=2")
    try:
        wait_for_rows(first, run, 2)
        config, log_rows = (run / "config.yaml").read_text(), len(losses(run))
        t0 = time.time()
        second = CliRunner().invoke(app, cli_args(audio_dir, "tiny/byol-a", run, 0, "train.steps=400"))
        assert second.exit_code == 2, second.output
        assert f"is in use by another sslaudio process (pid {first.pid})" in second.output
        assert len(second.output.strip().splitlines()) == 1 and time.time() - t0 < 10  # at once: no data scan
        assert (run / "config.yaml").read_text() == config and len(losses(run)) >= log_rows
        assert first.poll() is None  # the first one goes on
    finally:
        os.kill(first.pid, signal.SIGKILL)  # the main process only: its DataLoader workers outlive it a while
        finish(first, run)
    # a killed holder leaves no stale lock, even while its orphaned workers still run
    third = CliRunner().invoke(app, cli_args(audio_dir, "tiny/byol-a", run, 0, "train.steps=2") + ["--no-resume"])
    assert third.exit_code == 0, third.output
    assert [s for s, _ in checkpoint.step_dirs(run)] == [2] and not list(run.glob(".replaced-*"))
    assert not (run / ".lock").exists()
