"""Checkpoint integrity and crash safety: hashes, non-finite weights, verification and fallback,
pruning, fault injection at every point of a save, and I/O errors (a full disk, a folder where a
file should be) turned into one error line with no temp file left behind."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from sslaudio import checkpoint
from sslaudio.build import build_method, load_preset
from sslaudio.checkpoint import (CheckpointError, CheckpointWarning, NonFiniteWeights, latest, step_dirs,
                                 tensors_sha256, verify_step)
from sslaudio.cli import app
from sslaudio.inference import load_encoder
from sslaudio.train import fit

SMALL = ["encoder.d=64", "encoder.base_d=8", "method.proj_hidden=32", "method.proj_dim=16",
         "views[0].memory=8", "train.batch_size=4", "train.steps=4", "train.ckpt_every=2",
         "train.log_every=1", "data.num_workers=0", "data.norm_samples=8", "train.keep_last=5"]
AUDIO = torch.randn(2, 16000, generator=torch.Generator().manual_seed(0)) * 0.1
runner = CliRunner()


def small(*extra):
    return load_preset("tiny/byol-a", SMALL + list(extra))


def step(run: Path, n: int) -> Path:
    return run / "ckpt" / f"step-{n:09d}"


def embed(spec, **kw) -> torch.Tensor:
    with torch.no_grad():
        return load_encoder(str(spec), **kw).embed(AUDIO)[0]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(r, code: int = 2) -> str:
    assert r.exit_code == code, r.output
    lines = r.output.strip().splitlines()
    assert "Traceback" not in r.output and len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


def temp_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, audio_dir) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 (never modified: tests copy it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    fit(small(), [str(audio_dir)], run)
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


def flip_tensor_bytes(path: Path, prefix: str = "encoder.") -> str:
    """Flip the top exponent bit of a few float32 values of the first F32 tensor named `prefix`*:
    finite but huge values (the 1e24-features case). -> the tensor's name."""
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name = next(k for k, v in sorted(header.items()) if k.startswith(prefix) and v.get("dtype") == "F32"
                and v["data_offsets"][1] - v["data_offsets"][0] >= 64)
    start = 8 + n + header[name]["data_offsets"][0]
    for i in range(4):
        raw[start + 4 * i + 3] ^= 0x40
    path.write_bytes(bytes(raw))
    return name


def rewrite(path: Path, change=None, drop_hash: bool = False) -> None:
    """Write a safetensors file again with safetensors itself: tensors changed by `change`, the
    metadata without its sha256 with `drop_hash` (a file from before the hashes existed)."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    tensors = load_file(str(path))
    if change is not None:
        change(tensors)
    if drop_hash:
        meta.pop("sha256", None)
    save_file(tensors, str(path), metadata=meta)


def drop_state_hashes(step_dir: Path) -> None:
    state = json.loads((step_dir / "state.json").read_text())
    state.pop("sha256", None)
    (step_dir / "state.json").write_text(json.dumps(state))


def make_old_format(step_dir: Path, change=None) -> None:
    """Turn a step folder into what sslaudio wrote before the hashes (optionally changing weights)."""
    rewrite(step_dir / "model.safetensors", change, drop_hash=True)
    rewrite(step_dir / "optim.safetensors", drop_hash=True)
    drop_state_hashes(step_dir)


def poison(tensors: dict) -> None:
    name = next(k for k in sorted(tensors) if k.startswith("encoder.") and tensors[k].is_floating_point())
    tensors[name].view(-1)[3] = float("nan")


# -- 1. integrity of weights ---------------------------------------------------------------------

def test_every_file_carries_a_verifiable_sha256(trained):
    for s in (2, 4):
        state = json.loads((step(trained, s) / "state.json").read_text())
        for name in ("model.safetensors", "optim.safetensors"):
            path = step(trained, s) / name
            with safe_open(str(path), framework="pt") as f:
                stored = f.metadata()["sha256"]
            assert stored == state["sha256"][name] == tensors_sha256(load_file(str(path)))
        assert verify_step(step(trained, s)) is None
    export = trained / "export" / "encoder.safetensors"
    with safe_open(str(export), framework="pt") as f:
        assert f.metadata()["sha256"] == tensors_sha256(load_file(str(export)))


def test_flipped_bytes_are_refused_and_the_run_falls_back(run, tmp_path):
    good2, good4 = embed(step(run, 2)), embed(step(run, 4))
    tensor = flip_tensor_bytes(step(run, 4) / "model.safetensors")
    assert torch.isfinite(load_file(str(step(run, 4) / "model.safetensors"))[tensor]).all()  # finite, only wrong
    assert "sha256" in verify_step(step(run, 4))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor data does not match its sha256"):
        load_encoder(str(step(run, 4)))
    warned = []
    assert latest(run, warned.append) == step(run, 2)
    assert len(warned) == 1 and "step-000000004" in warned[0] and "sha256" in warned[0]
    assert torch.equal(embed(run, warn=warned.append), good2) and not torch.equal(good2, good4)
    with pytest.warns(CheckpointWarning, match="step-000000004"):  # the one-argument form warns too
        assert latest(run) == step(run, 2)
    flip_tensor_bytes(run / "export" / "encoder.safetensors")
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        load_encoder(str(run / "export" / "encoder.safetensors"))
    # the CLI: one line, exit 2, for the bad step; a warning and the older step for the run
    clip = tmp_path / "a.wav"
    import soundfile as sf
    sf.write(str(clip), AUDIO[0].numpy(), 16000)
    line = one_error_line(invoke("extract", step(run, 4), clip, "--out", tmp_path / "f1"))
    assert "model.safetensors: tensor data does not match its sha256" in line
    r = invoke("extract", run, clip, "--out", tmp_path / "f2")
    assert r.exit_code == 0, r.output
    assert "warning: skipping checkpoint step-000000004" in r.output.replace("\n", " ")


def test_a_model_file_swapped_from_another_step_is_refused(run):
    shutil.copy(step(run, 2) / "model.safetensors", step(run, 4) / "model.safetensors")
    assert "not the file its state.json was saved with" in verify_step(step(run, 4))
    with pytest.raises(CheckpointError, match="not the file its state.json was saved with"):
        load_encoder(str(step(run, 4)))
    with pytest.raises(CheckpointError, match="not the file its state.json"):
        checkpoint.load_step(step(run, 4))


def test_checkpoints_without_hashes_still_load(run):
    want = embed(step(run, 4))
    make_old_format(step(run, 2))
    make_old_format(step(run, 4))
    rewrite(run / "export" / "encoder.safetensors", drop_hash=True)
    with safe_open(str(step(run, 4) / "model.safetensors"), framework="pt") as f:
        assert "sha256" not in f.metadata()
    assert verify_step(step(run, 4)) is None and latest(run) == step(run, 4)
    assert torch.equal(embed(run), want) and torch.equal(embed(step(run, 4)), want)
    assert torch.equal(embed(run / "export" / "encoder.safetensors"), want)
    model, optim, meta, state = checkpoint.load_step(step(run, 4))
    assert state["step"] == 4 and "param_groups" in meta


def test_nonfinite_weights_of_an_old_checkpoint_are_refused_and_skipped(run, tmp_path):
    make_old_format(step(run, 4), poison)  # NaN weights from before the hashes: only finiteness can tell
    reason = verify_step(step(run, 4))
    assert "not finite" in reason and "'encoder." in reason and "1 NaN" in reason
    with pytest.raises(CheckpointError, match=r"step-000000004/model\.safetensors: tensor 'encoder\..*not finite"):
        load_encoder(str(step(run, 4)))
    warned = []
    assert latest(run, warned.append) == step(run, 2) and len(warned) == 1
    clip = tmp_path / "a.wav"
    import soundfile as sf
    sf.write(str(clip), AUDIO[0].numpy(), 16000)
    line = one_error_line(invoke("extract", step(run, 4), clip, "--out", tmp_path / "f"))
    assert "model.safetensors: tensor 'encoder." in line and "not finite" in line
    rewrite(run / "export" / "encoder.safetensors", poison, drop_hash=True)
    shutil.rmtree(run / "ckpt")
    with pytest.raises(CheckpointError, match=r"encoder\.safetensors: tensor 'encoder\..*not finite"):
        load_encoder(str(run))


def test_resume_skips_nonfinite_checkpoint_and_matches_uninterrupted(run, audio_dir):
    want = load_file(str(step(run, 4) / "model.safetensors"))
    make_old_format(step(run, 4), poison)
    with pytest.warns(CheckpointWarning, match="step-000000004"):
        summary = fit(small(), [str(audio_dir)], run)
    assert summary["start_step"] == 2  # not 4: the NaN step is skipped, and replaced
    got = load_file(str(step(run, 4) / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert verify_step(step(run, 4)) is None and step(run, 2).is_dir()


def _loaded(run: Path, at: int):
    preset = small()
    method = build_method(preset)
    model_t, optim_t, optim_meta, _ = checkpoint.load_step(step(run, at))
    method.load_state_dict(model_t)
    opt = torch.optim.AdamW(method.param_groups(0.0), lr=1e-3)
    checkpoint.load_optimizer(opt, optim_t, optim_meta)
    return preset, method, opt


def test_save_refuses_nonfinite_model_or_optimizer_before_writing(run):
    preset, method, opt = _loaded(run, 4)
    before = sorted(p.name for p in (run / "ckpt").iterdir())
    name, param = next((n, p) for n, p in method.named_parameters() if n.startswith("encoder."))
    with torch.no_grad():
        param.view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteWeights, match=rf"step 6: model: tensor '{name}' \(0 NaN, 1 inf"):
        checkpoint.save(run, 6, method, opt, preset, {}, keep_last=1)
    with pytest.raises(NonFiniteWeights, match=r"encoder\.safetensors: encoder: tensor 'encoder\."):
        checkpoint.export_encoder(run / "export" / "encoder.safetensors", method, preset)
    preset, method, opt = _loaded(run, 4)
    next(iter(opt.state.values()))["exp_avg"].view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteWeights, match=r"step 6: optimizer state: tensor 'state\.0\.exp_avg' \(1 NaN"):
        checkpoint.save(run, 6, method, opt, preset, {}, keep_last=1)
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == before  # nothing written, nothing pruned
    assert verify_step(step(run, 2)) is None and not temp_files(run)
    assert torch.equal(embed(run / "export" / "encoder.safetensors"), embed(step(run, 4)))


def test_pruning_keeps_the_newest_good_step_not_a_bad_newer_one(run, monkeypatch):
    preset, method, opt = _loaded(run, 4)
    real = checkpoint.save_file

    def corrupting(tensors, path, metadata=None):  # the disk returns other bytes than were written
        real(tensors, path, metadata=metadata)
        if "optim" not in metadata:
            flip_tensor_bytes(Path(path))

    monkeypatch.setattr(checkpoint, "save_file", corrupting)
    checkpoint.save(run, 6, method, opt, preset, {}, keep_last=1)
    assert [s for s, _ in step_dirs(run)] == [4, 6]  # 4 kept (the newest that verifies); 6 kept to inspect
    warned = []
    assert latest(run, warned.append) == step(run, 4) and "step-000000006" in warned[0]
    monkeypatch.setattr(checkpoint, "save_file", real)
    checkpoint.save(run, 8, method, opt, preset, {}, keep_last=1)
    assert [s for s, _ in step_dirs(run)] == [8]  # older than the newest good step: pruned, bad or not


def test_unknown_fault_point_is_refused(run, monkeypatch):
    preset, method, opt = _loaded(run, 4)
    monkeypatch.setenv("SSLAUDIO_FAULT", "after-lunch")
    with pytest.raises(CheckpointError, match="SSLAUDIO_FAULT=after-lunch: expected one of after-model"):
        checkpoint.save(run, 6, method, opt, preset, {}, keep_last=1)
    assert not step(run, 6).exists() and not temp_files(run)


# -- 2. fault injection: a process killed at every point of a save ------------------------------

FAULTS = ["after-model", "after-optim", "after-state", "before-rename", "before-prune", "before-export-rename"]
FAST_FAULTS = {"after-optim", "before-prune"}  # the others: -m slow (about 6 s each)


@pytest.fixture(scope="module")
def uninterrupted(trained) -> dict:
    return load_file(str(step(trained, 4) / "model.safetensors"))


@pytest.mark.parametrize("point", [p if p in FAST_FAULTS else pytest.param(p, marks=pytest.mark.slow)
                                   for p in FAULTS])
def test_killed_during_a_save_resumes_to_the_same_weights(point, audio_dir, tmp_path, uninterrupted):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "sslaudio", "pretrain", str(audio_dir), "--preset", "tiny/byol-a",
            "--out", str(run), "--quiet"] + [a for s in SMALL for a in ("--set", s)]
    # killed while saving step 4 (step 2 committed); the export at its first write (step 2's, right
    # after that step is committed: export_encoder is not told the step)
    fault = point if point == "before-export-rename" else f"{point}@4"
    env = {**os.environ, "SSLAUDIO_FAULT": fault, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 99, r.stderr[-2000:]
    committed = 4 if point == "before-prune" else 2
    assert latest(run) == step(run, committed) and verify_step(step(run, committed)) is None
    assert [s for s, _ in step_dirs(run)] == sorted({2, committed})  # no half-written step folder is visible
    load_encoder(str(run))  # the last committed checkpoint loads
    export = run / "export" / "encoder.safetensors"
    assert export.is_file() == (point != "before-export-rename")  # complete or absent, never partial
    if export.is_file():
        load_encoder(str(export))
    summary = fit(small(), [str(audio_dir)], run)  # the resumed run finishes
    assert summary["start_step"] == committed
    got = load_file(str(step(run, 4) / "model.safetensors"))
    assert got.keys() == uninterrupted.keys() and all(torch.equal(got[k], uninterrupted[k]) for k in got)
    assert verify_step(step(run, 4)) is None and not temp_files(run / "ckpt")


# -- 3. a full disk, a folder where a file should be ---------------------------------------------

ENOSPC_SAFETENSORS = "Error while serializing: I/O error: No space left on device (os error 28)"


def _full_disk_after_writing(real):
    def save(tensors, path, metadata=None):  # half a file, then the disk is full
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise SafetensorError(ENOSPC_SAFETENSORS)

    return save


def test_pretrain_on_a_full_disk_is_one_line_and_leaves_no_temp_files(audio_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "save_file", _full_disk_after_writing(checkpoint.save_file))
    run = tmp_path / "run"
    r = invoke("pretrain", audio_dir, "--preset", "tiny/byol-a", "--out", run, "--quiet",
               *[a for s in SMALL for a in ("--set", s)])
    line = one_error_line(r)
    assert line == f"error: {step(run, 2)}/model.safetensors: No space left on device"
    assert not temp_files(tmp_path) and step_dirs(run) == []


@pytest.mark.slow
def test_pretrain_into_a_real_file_size_limit(audio_dir, tmp_path):
    """safetensors' own I/O error (EFBIG under RLIMIT_FSIZE, as ENOSPC would be) end to end."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "sslaudio", "pretrain", str(audio_dir), "--preset", "tiny/byol-a",
            "--out", str(run), "--quiet"] + [a for s in SMALL for a in ("--set", s)]

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    r = subprocess.run(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300, preexec_fn=limit)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip() == f"error: {step(run, 2)}/model.safetensors: File too large"
    assert not temp_files(tmp_path) and step_dirs(run) == []


def test_extract_on_a_full_disk_is_one_line_and_leaves_no_temp_files(trained, labeled_dir, tmp_path, monkeypatch):
    import safetensors.numpy

    import sslaudio.features

    fake = _full_disk_after_writing(safetensors.numpy.save_file)
    monkeypatch.setattr(safetensors.numpy, "save_file", fake)
    monkeypatch.setattr(sslaudio.features, "save_file", fake, raising=False)
    out = tmp_path / "feats"
    line = one_error_line(invoke("extract", trained, labeled_dir / "a" / "000.wav", "--out", out))
    assert line.startswith(f"error: {out}") and line.endswith(": No space left on device")
    assert not temp_files(tmp_path)


def _probe_args(trained, labeled_dir, json_out):
    return ["probe", step(trained, 4), labeled_dir / "labels.csv", "--json", json_out]


def test_probe_json_on_a_full_disk_or_onto_a_folder(trained, labeled_dir, tmp_path, monkeypatch):
    (tmp_path / "folder").mkdir()
    line = one_error_line(invoke(*_probe_args(trained, labeled_dir, tmp_path / "folder")))
    assert line == f"error: --json {tmp_path / 'folder'}: is a folder; give a file name"
    real = Path.write_text

    def full(self, *a, **k):
        if self.name.startswith(".res.json."):
            real(self, "{\"acc", encoding="utf-8")  # part of it, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    target = tmp_path / "res.json"
    r = invoke(*_probe_args(trained, labeled_dir, target))
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1] == f"error: {target}: No space left on device"  # after the table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]  # no res.json, no .res.json.*.tmp


def test_guard_names_the_path_of_every_io_error(tmp_path):
    import typer

    from sslaudio.cli import guard

    cases = [(OSError(errno.EACCES, "Permission denied", "/x/y"), "error: /x/y: Permission denied"),
             (IsADirectoryError(errno.EISDIR, "Is a directory", "out"), "error: out: Is a directory"),
             (SafetensorError(ENOSPC_SAFETENSORS), "error: No space left on device")]
    for exc, want in cases:
        def boom():
            with guard():
                raise exc

        r = runner.invoke(typer.Typer(callback=boom, invoke_without_command=True), [])
        assert r.exit_code == 2 and r.output.strip() == want, r.output


def test_atomic_write_cleans_up_and_names_the_target_on_every_io_error(tmp_path, monkeypatch):
    from sslaudio import atomic
    from sslaudio.atomic import atomic_write

    target = tmp_path / "out.bin"

    def partial_then(exc):
        def write(tmp):
            Path(tmp).write_bytes(b"part")
            raise exc

        return write

    for exc in (OSError(errno.ENOSPC, "No space left on device"), SafetensorError(ENOSPC_SAFETENSORS)):
        with pytest.raises(OSError) as info:
            atomic_write(target, partial_then(exc))
        assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
        assert list(tmp_path.iterdir()) == []
    real_replace = os.replace

    def replace_fails(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace_fails)
    with pytest.raises(PermissionError) as info:
        atomic_write(target, lambda t: Path(t).write_bytes(b"x"))
    assert info.value.filename == str(target) and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(atomic.os, "replace", real_replace)

    def unlink_fails(p):
        raise PermissionError(errno.EACCES, "Permission denied", p)

    monkeypatch.setattr(atomic.os, "unlink", unlink_fails)  # the cleanup fails: the first error still wins
    with pytest.raises(OSError) as info:
        atomic_write(target, partial_then(OSError(errno.ENOSPC, "No space left on device")))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    calls = []
    (tmp_path / "dir").mkdir()
    with pytest.raises(IsADirectoryError):
        atomic_write(tmp_path / "dir", calls.append)
    assert calls == []  # refused before writing anything


def test_export_refuses_a_model_with_nonfinite_output(tmp_path):
    from sslaudio.export import ExportError, export

    bundle = load_encoder("random:tiny/byol-a")
    with torch.no_grad():
        next(bundle.encoder.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ExportError, match="not finite"):
        export(bundle, "torchscript", tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_per_process_buffers_are_verified_with_the_step(tmp_path):
    """ranks.safetensors (several processes' own buffers) is checked like the model and optimizer
    files: a corrupt or missing one makes the step fail verification, even after a cached pass."""
    from sslaudio import optim

    p = load_preset("tiny/apc", ["data.norm_samples=8"])
    m = build_method(p)
    step = checkpoint.save(tmp_path, 2, m, optim.adamw(m.param_groups(0.0), p.optim), p, {"world_size": 2}, 3,
                           {"1/bank": torch.ones(3)})
    state = json.loads((step / "state.json").read_text())
    assert checkpoint.verify_step(step) is None  # and the answer is now cached
    assert torch.equal(checkpoint.load_rank_state(step, state, 1)["bank"], torch.ones(3))
    assert checkpoint.load_rank_state(step, state, 0) == {}
    (step / "ranks.safetensors").write_bytes(b"garbage")
    assert "ranks.safetensors" in checkpoint.verify_step(step)
    (step / "ranks.safetensors").unlink()
    assert "ranks.safetensors" in checkpoint.verify_step(step)


def test_resuming_an_interrupt_step_of_several_processes_warns(run, audio_dir):
    """A step saved on an interrupt under torchrun holds rank 0's buffers only (the other processes
    may be gone, so nothing is gathered): the resume says so instead of continuing silently."""
    shutil.rmtree(step(run, 4))
    state = json.loads((step(run, 2) / "state.json").read_text())
    (step(run, 2) / "state.json").write_text(json.dumps({**state, "world_size": 2, "rank_buffers": "not gathered"}))
    notes = []
    fit(small(), [str(audio_dir)], run, warn=notes.append)
    assert any("saved on an interrupt by 2 processes" in n for n in notes)
    assert "rank_buffers" not in json.loads((step(run, 4) / "state.json").read_text())  # a periodic step
