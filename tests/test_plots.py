"""`sslaudio plot RUN` and `probe --plots DIR`: PNGs written atomically with matplotlib (the optional
`plots` extra); without it, and without a log, one `error:` line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from sslaudio import plots
from sslaudio.atomic import TEMP_NAME
from sslaudio.cli import app

try:
    import matplotlib  # noqa: F401

    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False
needs_mpl = pytest.mark.skipif(not HAVE_MPL, reason="matplotlib not installed (pip install 'sslaudio[plots]')")

PNG = b"\x89PNG\r\n\x1a\n"


def _run(tmp_path, rows):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _rows(n=6):
    rows = [{"step": 10 * (i + 1), "loss": 2.0 / (i + 1), "lr": 1e-3, "emb_std": 0.1 + 0.01 * i,
             "code_ppl": 30.0 - i, "steps_per_s": 2.0, "audio_h_per_s": 0.01, "data_wait": 0.1, "time": float(i)}
            for i in range(n)]
    rows[3]["warnings"] = ["emb_std is low: the embedding may be collapsing"]
    return rows


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG, f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR width, height


def test_import_needs_neither_torch_nor_matplotlib():
    code = "import sys, sslaudio.plots; print(sorted({'torch', 'matplotlib'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@needs_mpl
def test_plot_training_png_and_panels(tmp_path):
    rows = _rows()
    rows.insert(2, {"step": 20, "loss": 9.0})  # a step logged twice (a resume): the later row wins
    run = _run(tmp_path, rows)
    with (run / "log.jsonl").open("a") as f:
        f.write('{"step": 70, "lo')  # a line cut short by a killed process: skipped
    res = plots.plot_training(run)
    out = run / "plots" / "training.png"
    assert res["out"] == str(out) and res["steps"] == 6
    assert res["panels"] == ["loss", "emb_std", "code_ppl"]  # not step/time/lr/throughput
    assert res["warnings"] == [40]
    w, h = _png_size(out)
    assert w > 100 and h > 100
    assert not [p for p in out.parent.iterdir() if TEMP_NAME.match(p.name)]


@needs_mpl
def test_plot_command(tmp_path):
    run = _run(tmp_path, _rows())
    target = tmp_path / "elsewhere" / "curves.png"
    res = CliRunner().invoke(app, ["plot", str(run), "--out", str(target)])
    assert res.exit_code == 0, res.output
    _png_size(target)
    assert not (run / "plots").exists()
    res = CliRunner().invoke(app, ["plot", str(run / "log.jsonl")])  # the log file itself
    assert res.exit_code == 0, res.output
    _png_size(run / "plots" / "training.png")


@pytest.mark.parametrize("case", ["missing", "empty", "no-run"])
def test_plot_without_a_log_is_one_line(tmp_path, case):
    run = tmp_path / "run"
    if case != "no-run":
        run.mkdir()
    if case == "empty":
        (run / "log.jsonl").write_text("\n")
    res = CliRunner().invoke(app, ["plot", str(run)])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(run) in lines[0]
    assert not (run / "plots").exists()


def test_missing_matplotlib_hint(tmp_path, monkeypatch, labeled_dir):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    run = _run(tmp_path, _rows())
    hint = "error: plotting needs matplotlib: pip install 'sslaudio[plots]'"
    res = CliRunner().invoke(app, ["plot", str(run)])
    assert res.exit_code == 2 and res.output.strip() == hint
    # probe --plots refuses before probing anything
    res = CliRunner().invoke(app, ["probe", "random:tiny/byol-a", str(labeled_dir / "labels.csv"),
                                   "--plots", str(tmp_path / "p")])
    assert res.exit_code == 2 and res.output.strip() == hint
    assert not (tmp_path / "p").exists()


@needs_mpl
def test_probe_plots_confusion(labeled_dir, tmp_path):
    out = tmp_path / "plots"
    res = CliRunner().invoke(app, ["probe", "random:tiny/byol-a", str(labeled_dir / "labels.csv"),
                                   "--plots", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png"]
    _png_size(out / "confusion.png")


@needs_mpl
def test_probe_suite_plots(labeled_dir, tmp_path):
    rows = (labeled_dir / "labels.csv").read_text().splitlines()
    multi = [rows[0]] + [f"{labeled_dir / r.split(',')[0]},{r.split(',')[1]};x,{r.split(',')[2]}"
                         for r in rows[1:]]  # a multi-label task: no confusion matrix
    (tmp_path / "multi.csv").write_text("\n".join(multi) + "\n")
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"tasks:\n  - name: toy/a\n    labels: {labeled_dir / 'labels.csv'}\n"
                     f"  - name: toy-multi\n    labels: multi.csv\n")
    out = tmp_path / "plots"
    res = CliRunner().invoke(app, ["probe", "random:tiny/byol-a", "random:tiny/m2d", "--suite", str(suite),
                                   "--cache", str(tmp_path / "cache"), "--plots", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["confusion-toy_a.png", "suite.png"]
    for p in out.iterdir():
        _png_size(p)
