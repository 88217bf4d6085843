"""The scripts in examples/ run as a user would run them (the console script on PATH, a fresh
working folder) and produce what their comments promise. Slow: the end-to-end pipeline makes the
toy data, pretrains, extracts, probes twice and exports (about a minute on 2 cores); `.ci/run`
runs it after the suite. (examples/onnx_without_torch.py has its own test in
test_export_complete.py; examples/api.py pretrains 50 steps and is the same API calls the
python_api example and the unit tests exercise.)"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    bindir = str(Path(sys.executable).parent)  # the venv's sslaudio and python first
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "2"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    work = tmp_path_factory.mktemp("example")
    p = run(["bash", str(ROOT / "examples" / "pipeline.sh"), "tiny/byol-a", "2"], work)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return work / "sslaudio-example", p


def test_pipeline_example_writes_what_it_says(pipeline):
    work, p = pipeline
    run_dir = work / "runs" / "tiny_byol-a"
    assert (run_dir / "export" / "encoder.safetensors").is_file()
    assert [int(c.name.split("-")[1]) for c in (run_dir / "ckpt").glob("step-*")] == [2]
    feats = list((work / "feats" / "tiny_byol-a").rglob("*.safetensors"))
    assert feats and len(feats) == len(list((work / "data" / "audio").rglob("*.wav")))
    for name in ("probe-tiny_byol-a.json", "probe-random-tiny_byol-a.json"):
        res = json.loads((work / name).read_text())
        assert 0 <= res["accuracy"] <= 1 and 0 <= res["f1"] <= 1
    assert (work / "tiny_byol-a.pt").is_file()
    step, loss = p.stdout.strip().splitlines()[-1].split()  # the loss curve's last line: step, loss
    assert step == "2" and float(loss) > 0


def test_stdout_pipeline_example_prints_one_norm_per_file(pipeline, tmp_path):
    work, _ = pipeline
    audio = work / "data" / "audio" / "test"
    p = run(["bash", str(ROOT / "examples" / "stdout_pipeline.sh"), str(work / "runs" / "tiny_byol-a"), str(audio)],
            tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    assert len(lines) == len(list(audio.rglob("*.wav")))
    path, norm = lines[0].rsplit(" ", 1)
    assert Path(path).is_file() and float(norm) > 0


def test_python_api_example(tmp_path):
    p = run([sys.executable, str(ROOT / "examples" / "python_api.py")], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "clip (512,)" in p.stdout and "batch frame counts [12, 18, 31]" in p.stdout
    assert "looks like (samples, channels)" in p.stdout  # the example shows the one-line error on purpose
    assert "HEAR: scene (2, 512)" in p.stdout
