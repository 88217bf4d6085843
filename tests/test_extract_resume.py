"""`extract` resumes: a run killed (SIGKILL) at random points and then completed ends with the
tensors of one clean run, no temp files and a manifest of every input; outputs of another encoder
or other options are replaced loudly, never silently."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from safetensors import safe_open
from safetensors.numpy import load_file
from typer.testing import CliRunner

from sslaudio.cli import app
from sslaudio.synth import CLASSES, SR, clip

ENCODER = "random:tiny/byol-a"  # its frontend statistics come from the inputs: part of the identity
REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def make_data(root: Path, n: int = 48) -> Path:
    """n clips of four lengths (so batches of equal length, with partial last batches) in two
    folders, plus one corrupt file (skipped every time)."""
    for i in range(n):
        seconds = (0.3, 0.35, 0.4, 0.45)[i % 4]
        p = root / ("a" if i % 3 else "b") / f"{i:03d}.wav"
        p.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(p), clip(CLASSES[i % len(CLASSES)], i, seconds=seconds), SR)
    (root / "b" / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    return root


def features(out: Path) -> dict[str, dict[str, np.ndarray]]:
    return {str(p.relative_to(out)): load_file(str(p)) for p in sorted(out.rglob("*.safetensors"))}


def temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob(".*") if p.name.endswith(".tmp")]


def killed_run(data: Path, out: Path, stop_at: int, args: list[str]) -> int:
    """Start `python -m sslaudio extract`, SIGKILL it once `stop_at` feature files exist; returns
    the number of feature files when it died (or finished)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sslaudio", "extract", ENCODER, str(data), "--out", str(out), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while proc.poll() is None and time.time() < deadline:
            if out.is_dir() and sum(1 for _ in out.rglob("*.safetensors")) >= stop_at:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None and time.time() >= deadline:
            proc.kill()
        proc.wait()
    return sum(1 for _ in out.rglob("*.safetensors"))


def test_killed_extraction_resumes_to_the_clean_result(tmp_path):
    data = make_data(tmp_path / "data")
    args = ["--frames", "--batch-size", "3"]
    clean = tmp_path / "clean"
    r = invoke("extract", ENCODER, data, "--out", clean, *args)
    assert r.exit_code == 0, r.output
    want = features(clean)
    assert len(want) == 48

    out = tmp_path / "resumed"
    rng = np.random.default_rng(int(time.time()))
    have, kills = 0, 0
    for lo, hi in ((1, 16), (20, 36)):  # two kills at random points, the second resuming the first
        stop_at = int(rng.integers(max(lo, have + 1), hi + 1))
        have = killed_run(data, out, stop_at, args)
        kills += have < 48
    assert kills >= 1 and have < 48, "the extraction finished before it could be killed"
    (out / "a" / ".007.wav.safetensors.abcd1234.tmp").write_bytes(b"half a file")  # as a kill mid-write leaves

    r = invoke("extract", ENCODER, data, "--out", out, *args)
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["reused"] == have and s["written"] == 48 and s["skipped"] == 1 and s["temp_removed"] >= 1
    assert temp_files(out) == []
    got = features(out)
    assert sorted(got) == sorted(want)
    for name in want:
        assert sorted(got[name]) == sorted(want[name])
        for key in want[name]:
            assert np.array_equal(got[name][key], want[name][key]), (name, key)  # bit for bit
    assert (out / "manifest.jsonl").read_text() == (clean / "manifest.jsonl").read_text()
    assert (out / "errors.jsonl").read_text() == (clean / "errors.jsonl").read_text()
    # a run over complete outputs embeds nothing
    r = invoke("extract", ENCODER, data, "--out", out, *args)
    assert r.exit_code == 0 and json.loads((out / "summary.json").read_text())["reused"] == 48


def test_feature_files_carry_the_encoder_identity(tmp_path):
    data = make_data(tmp_path / "data", n=4)
    r = invoke("extract", ENCODER, data, "--out", tmp_path / "f")
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "f" / "summary.json").read_text())
    with safe_open(str(tmp_path / "f" / "a" / "001.wav.safetensors"), framework="np") as f:
        meta = f.metadata()
    assert meta["identity"] == s["identity"] and len(s["identity"]) == 32
    assert meta["source"] == str(data / "a" / "001.wav")


def test_other_options_or_a_changed_source_are_replaced_with_a_warning(tmp_path):
    data = make_data(tmp_path / "data", n=6)
    out = tmp_path / "f"
    assert invoke("extract", ENCODER, data, "--out", out).exit_code == 0
    r = invoke("extract", ENCODER, data, "--out", out, "--frames")  # other options: other numbers
    s = json.loads((out / "summary.json").read_text())
    assert r.exit_code == 0 and s["reused"] == 0 and s["replaced"] == 6
    assert "6 existing output(s)" in r.output and "replaced" in r.output
    assert all("frames" in f for f in features(out).values())
    src = data / "a" / "001.wav"
    sf.write(str(src), clip("bell", 99, seconds=0.3), SR)  # a new version of one audio file
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))
    r = invoke("extract", ENCODER, data, "--out", out, "--frames")
    s = json.loads((out / "summary.json").read_text())
    # the edited file is redone; the random-init frontend statistics come from the inputs, so its
    # new content changes them and with them the identity of every output
    assert r.exit_code == 0 and s["written"] == 6 and "existing output(s)" in r.output


def test_npy_outputs_resume_and_a_partial_set_is_redone(tmp_path):
    data = make_data(tmp_path / "data", n=6)
    out = tmp_path / "f"
    args = ["--format", "npy", "--frames"]
    assert invoke("extract", ENCODER, data, "--out", out, *args).exit_code == 0
    want = {p.name: np.load(p) for p in out.rglob("*.npy")}
    assert len(want) == 18 and len(list(out.rglob("*.wav.json"))) == 6
    (out / "a" / "001.wav.json").unlink()  # killed before its metadata file: redone
    (out / "a" / "002.wav.frames.npy").unlink()  # incomplete: redone
    r = invoke("extract", ENCODER, data, "--out", out, *args)
    s = json.loads((out / "summary.json").read_text())
    assert r.exit_code == 0 and s["reused"] == 4 and s["written"] == 6
    got = {p.name: np.load(p) for p in out.rglob("*.npy")}
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
