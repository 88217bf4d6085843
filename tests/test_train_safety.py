"""Crash safety of `fit` and `pretrain`, in process: signals at chosen points of a step, the run
lock, --no-resume, leftovers of a killed commit, config / data mismatches on resume, and a model
state that diverges while the loss stays finite. (tests/test_kill_resume.py does the same through
real processes.)"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sslaudio import checkpoint, interrupts, train
from sslaudio.build import load_preset
from sslaudio.cli import app
from sslaudio.data import DataError
from sslaudio.runfolder import RunMismatch
from sslaudio.runlock import RunLock, RunLocked, close_inherited
from sslaudio.train import Interrupted, TrainingDiverged, fit

SMALL = ["encoder.d=64", "encoder.base_d=8", "method.proj_hidden=32", "method.proj_dim=16",
         "views[0].memory=8", "train.batch_size=4", "train.steps=4", "train.ckpt_every=2",
         "train.log_every=1", "data.num_workers=0", "data.norm_samples=8", "train.keep_last=5"]
CLI_SMALL = sum((["--set", s] for s in SMALL), [])


def small(*extra):
    return load_preset("tiny/byol-a", SMALL + list(extra))


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def snapshot(run):
    """Every file under run (but the lock), with its bytes."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def steps_of(run):
    return [s for s, _ in checkpoint.step_dirs(run)]


def rows(run):
    return [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def hooks(monkeypatch):
    """hooks[i] = f: f(method) runs inside after_step of step index i (after the optimizer step)
    of the method that fit builds; hooks["prepare"] runs in method.prepare (before any step)."""
    calls = {}
    build = train.build_method

    def build_hooked(preset):
        m = build(preset)
        after, prepare = m.after_step, m.prepare

        def after_step(step, max_steps):
            after(step, max_steps)
            if step in calls:
                calls[step](m)

        def prepare_hooked(audio, sample=None):
            prepare(audio, sample)
            if "prepare" in calls:
                calls["prepare"](m)

        m.after_step, m.prepare = after_step, prepare_hooked
        return m

    monkeypatch.setattr(train, "build_method", build_hooked)
    return calls


def send(sig=signal.SIGINT, times=1):
    def f(_method):
        for _ in range(times):
            os.kill(os.getpid(), sig)
    return f


def same_tensors(a, b):
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# -- signals ----------------------------------------------------------------------------------------

def test_sigint_between_log_rows_commits_that_step_and_the_resumed_log_matches(audio_dir, tmp_path, hooks):
    """The step that was running finishes and is committed as itself (BatchNorm statistics and the
    optimizer state of a whole step, under its own number); the half-summed log row goes into the
    checkpoint, so the resumed log is the uninterrupted one."""
    cfg = ["train.steps=8", "train.log_every=3", "train.ckpt_every=1000"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    fit(small(*cfg), [str(audio_dir)], ref)
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    hooks[3] = send(signal.SIGINT)  # inside step 4 (index 3), between the rows of steps 3 and 6
    with pytest.raises(Interrupted) as e:
        fit(small(*cfg), [str(audio_dir)], run)
    assert e.value.step == 4 and e.value.signum == signal.SIGINT
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
    assert steps_of(run) == [4] and [r["step"] for r in rows(run)] == [3]
    state = json.loads((checkpoint.latest(run) / "state.json").read_text())
    assert state["log_steps"] == 1 and state["nonfinite"] == 0
    model = load_file(str(checkpoint.latest(run) / "model.safetensors"))
    # four whole steps, not five (BYOL-A encodes its two views in two passes: two BN batches a step)
    assert int(model["encoder.features.1.num_batches_tracked"]) == 8
    hooks.clear()
    fit(small(*cfg), [str(audio_dir)], run)
    assert [(r["step"], r["loss"]) for r in rows(run)] == [(r["step"], r["loss"]) for r in rows(ref)]
    assert same_tensors(run / "ckpt" / "step-000000008" / "model.safetensors",
                        ref / "ckpt" / "step-000000008" / "model.safetensors")
    assert same_tensors(run / "ckpt" / "step-000000008" / "optim.safetensors",
                        ref / "ckpt" / "step-000000008" / "optim.safetensors")


def test_sigterm_commits_too_and_the_cli_exits_130(audio_dir, tmp_path, hooks):
    hooks[1] = send(signal.SIGTERM)
    r = invoke("pretrain", audio_dir, "--preset", "tiny/byol-a", "--out", tmp_path / "r", "--quiet",
               *CLI_SMALL, "--set", "train.ckpt_every=1000")
    assert r.exit_code == 130, r.output
    assert "SIGTERM: stopped after step 2, which is saved" in r.output and "error: interrupted" in r.output
    assert steps_of(tmp_path / "r") == [2] and (tmp_path / "r" / "export" / "encoder.safetensors").is_file()


def test_signals_during_a_commit_wait_for_it(audio_dir, tmp_path, monkeypatch):
    """Ctrl-C (twice) while step 2 is being written: the step folder is completed, then the run stops."""
    monkeypatch.setattr(interrupts.StopSignals, "GRACE_S", 0.0)  # the second signal counts as a second request
    save = checkpoint.save

    def save_interrupted(run, step, *a, **k):
        send(signal.SIGINT, times=2)(None)
        return save(run, step, *a, **k)

    monkeypatch.setattr(checkpoint, "save", save_interrupted)
    run = tmp_path / "r"
    with pytest.raises(Interrupted) as e:
        fit(small("train.steps=6"), [str(audio_dir)], run)
    assert e.value.step == 2 and steps_of(run) == [2]
    checkpoint.load_step(run / "ckpt" / "step-000000002")  # complete and readable
    assert not list((run / "ckpt").glob(".tmp*")) and (run / "export" / "encoder.safetensors").is_file()


def test_a_second_signal_stops_at_once_without_the_unfinished_step(audio_dir, tmp_path, hooks, monkeypatch):
    monkeypatch.setattr(interrupts.StopSignals, "GRACE_S", 0.0)
    hooks[2] = send(signal.SIGINT, times=2)  # the second one lands inside step 3
    with pytest.raises(Interrupted) as e:
        fit(small("train.ckpt_every=1000"), [str(audio_dir)], tmp_path / "r")
    assert e.value.step is None and steps_of(tmp_path / "r") == []


def test_one_ctrl_c_delivered_twice_is_one_request(audio_dir, tmp_path, hooks):
    """A terminal and torchrun (or a wrapper) both pass Ctrl-C on: within GRACE_S it is one signal."""
    hooks[2] = send(signal.SIGINT, times=2)
    with pytest.raises(Interrupted) as e:
        fit(small("train.ckpt_every=1000"), [str(audio_dir)], tmp_path / "r")
    assert e.value.step == 3 and steps_of(tmp_path / "r") == [3]


def test_a_signal_before_the_first_step_saves_nothing(audio_dir, tmp_path, hooks):
    for sig in (signal.SIGINT, signal.SIGTERM):
        hooks["prepare"] = send(sig)
        with pytest.raises(Interrupted) as e:
            fit(small(), [str(audio_dir)], tmp_path / "r")
        assert e.value.step is None and e.value.signum == sig
        assert steps_of(tmp_path / "r") == [] and not (tmp_path / "r" / "log.jsonl").exists()
        assert not (tmp_path / "r" / ".lock").exists()


# -- the run lock -----------------------------------------------------------------------------------

def test_run_lock(tmp_path):
    run = tmp_path / "a" / "run"
    with RunLock(run) as lock:
        assert (run / ".lock").read_text().split("\n")[0] == str(os.getpid())
        with pytest.raises(RunLocked, match=rf"run is in use by another sslaudio process \(pid {os.getpid()}\)"):
            RunLock(run).acquire()  # another open file description: refused, even in this process
        fd, dev, ino = lock.handle()
        close_inherited(fd + 1000, dev, ino)  # not that file: left alone
        os.fstat(fd)
    assert not (run / ".lock").exists()
    with RunLock(run):  # free again
        pass


def test_a_locked_run_is_refused_before_anything_changes(audio_dir, tmp_path):
    run = tmp_path / "r"
    fit(small(), [str(audio_dir)], run)
    files = snapshot(run)
    with RunLock(run):
        with pytest.raises(RunLocked):
            fit(small(), [str(audio_dir)], run, resume=False)
        r = invoke("pretrain", audio_dir, "--preset", "tiny/byol-a", "--out", run, "--no-resume", *CLI_SMALL)
    assert r.exit_code == 2 and r.output.strip() == f"error: {run} is in use by another sslaudio process (pid {os.getpid()})"
    assert snapshot(run) == files


# -- --no-resume and leftovers ----------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["missing", "unusable"])
def test_no_resume_with_bad_data_keeps_the_old_run(bad, audio_dir, bad_dir, tmp_path):
    run = tmp_path / "r"
    fit(small(), [str(audio_dir)], run)
    files = snapshot(run)
    if bad == "unusable":
        for f in bad_dir.glob("good*"):
            f.unlink()
    data = tmp_path / "no-such-folder" if bad == "missing" else bad_dir
    r = invoke("pretrain", data, "--preset", "tiny/byol-a", "--out", run, "--no-resume", "--quiet", *CLI_SMALL,
               "--set", "optim.lr=0.5")
    assert r.exit_code == 4, r.output
    assert snapshot(run) == files and not list(run.glob(".replaced-*"))


def test_bad_data_leaves_no_new_run_folder(tmp_path):
    with pytest.raises(DataError):
        fit(small(), [str(tmp_path / "nothing")], tmp_path / "new" / "run")
    assert not (tmp_path / "new" / "run").exists()


def test_no_resume_deletes_the_old_run_only_after_the_first_commit(audio_dir, tmp_path):
    run = tmp_path / "r"
    fit(small(), [str(audio_dir)], run)
    old = snapshot(run)

    def crash(done, total, row):
        if done == 1 and row is not None:
            raise KeyboardInterrupt  # as if killed before the new run's first checkpoint

    new = small("train.steps=3", "train.ckpt_every=3")
    with pytest.raises(KeyboardInterrupt):
        fit(new, [str(audio_dir)], run, resume=False, on_log=crash)
    (aside,) = run.glob(".replaced-*")
    assert steps_of(run) == [] and not (run / "export").exists()
    assert snapshot(aside) == old  # ckpt/, log.jsonl, config.yaml and export/, as they were
    warnings = []
    fit(new, [str(audio_dir)], run, warn=warnings.append)  # a plain resume keeps it, and says so
    assert aside.is_dir() and any(str(aside) in w and "--no-resume" in w for w in warnings)
    fit(new, [str(audio_dir)], run, resume=False)  # a --no-resume that commits removes it
    assert not list(run.glob(".replaced-*")) and steps_of(run) == [3]


def test_leftovers_of_a_killed_commit_are_removed(audio_dir, tmp_path):
    run = tmp_path / "r"
    fit(small(), [str(audio_dir)], run)
    junk = [run / "ckpt" / ".tmp-step-000000006-x1y2" / "model.safetensors", run / ".config.yaml.abc123.tmp",
            run / ".log.jsonl.def456.tmp", run / "export" / ".encoder.safetensors.ghi789.tmp"]
    for f in junk:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"half")
    committed = snapshot(run / "ckpt")
    committed = {k: v for k, v in committed.items() if not k.startswith(".tmp")}
    fit(small(), [str(audio_dir)], run)  # a finished run: nothing to train, but it cleans up
    assert not any(f.exists() for f in junk) and not (run / "ckpt" / ".tmp-step-000000006-x1y2").exists()
    assert snapshot(run / "ckpt") == committed


# -- resume checks ----------------------------------------------------------------------------------

def test_a_config_mismatch_names_the_keys(audio_dir, tmp_path):
    run = tmp_path / "r"
    fit(small(), [str(audio_dir)], run)
    with pytest.raises(RunMismatch) as e:  # log_every does not change the weights: not named
        fit(small("optim.lr=0.5", "method.proj_dim=8", "train.log_every=2", "views[1].time_scale=[0.5,1.5]"),
            [str(audio_dir)], run)
    msg = str(e.value)
    lr = small().optim.lr  # the preset's own value, whatever it is
    assert "another configuration" in msg and f"optim.lr: {lr} -> 0.5" in msg and "method.proj_dim: 16 -> 8" in msg
    assert "views[1].time_scale[0]: 0.6 -> 0.5" in msg and "log_every" not in msg
    with pytest.raises(RunMismatch, match=r"and 2 more"):
        fit(small(*[f"optim.{k}" for k in ("lr=0.5", "eps=1e-6", "warmup_steps=3", "min_lr_ratio=0.2",
                                            "weight_decay=0.1", "grad_clip=1.0", "schedule=constant")]),
            [str(audio_dir)], run)


def test_resuming_on_other_data_warns_once(audio_dir, tmp_path):
    run, subset = tmp_path / "r", tmp_path / "subset"
    fit(small(), [str(audio_dir)], run)
    shutil.rmtree(run / "ckpt" / "step-000000004")
    files = sorted(audio_dir.rglob("*.wav"))
    subset.mkdir()
    for f in files[:5]:
        shutil.copy(f, subset / f.name)
    warnings = []
    fit(small(), [str(subset)], run, warn=warnings.append)  # resumes from step 2, trained on all 8
    data_warnings = [w for w in warnings if "DATA" in w]
    assert len(data_warnings) == 1 and "8 files then, 5 now" in data_warnings[0]
    warnings.clear()
    fit(small(), [str(subset)], run, warn=warnings.append)  # step 4 was trained on the subset
    assert warnings == []
    fit(small(), [str(audio_dir)], run, warn=warnings.append)
    assert len(warnings) == 1 and "5 files then, 8 now" in warnings[0]


# -- a diverging model state ------------------------------------------------------------------------

def finite_and_bounded(path):
    return all(bool(torch.isfinite(t).all()) and float(t.abs().max()) <= 1e12 for t in load_file(str(path)).values()
               if t.is_floating_point() and t.numel())


def test_exploding_weights_stop_before_a_commit(audio_dir, tmp_path):
    """optim.lr=1e5: the loss stays finite, BatchNorm's running variance overflows (1e36, then inf)."""
    run = tmp_path / "r"
    r = invoke("pretrain", audio_dir, "--preset", "tiny/byol-a", "--out", run, "--quiet", *CLI_SMALL,
               "--set", "optim.lr=1e5", "--set", "train.ckpt_every=1", "--set", "train.steps=10")
    assert r.exit_code == 3, r.output
    assert "weights became non-finite (or exceeded 1e12) at step 2" in r.output and "lower optim.lr" in r.output
    assert all(math.isfinite(row["loss"]) for row in rows(run))  # what the old loop saw
    assert steps_of(run) == [1]
    assert finite_and_bounded(checkpoint.latest(run) / "model.safetensors")
    assert finite_and_bounded(run / "export" / "encoder.safetensors")


@pytest.mark.parametrize("value,at,steps", [(float("nan"), 2, 8), (1e13, 2, 8), (float("inf"), 2, 3)])
def test_a_non_finite_state_is_caught_at_the_next_sync_or_commit(value, at, steps, audio_dir, tmp_path, hooks):
    def poison(method):
        with torch.no_grad():
            next(method.encoder.parameters()).view(-1)[0] = value

    hooks[at] = poison
    with pytest.raises(TrainingDiverged, match=rf"non-finite \(or exceeded 1e12\) at step {at + 1} \(encoder\."):
        fit(small(f"train.steps={steps}", "train.ckpt_every=1000"), [str(audio_dir)], tmp_path / "r")
    assert steps_of(tmp_path / "r") == [] and not (tmp_path / "r" / "export").exists()
