"""`probe --suite`: several checkpoints on several tasks, one table and one JSON; features cached by
encoder identity and file list, so a second run (another probe) embeds nothing; bad suites are
one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import sslaudio.evaluation as ev
import sslaudio.probe as probe_mod
from sslaudio.cli import app


@pytest.fixture
def suite(labeled_dir, tmp_path):
    rows = (labeled_dir / "labels.csv").read_text().splitlines()
    multi = [rows[0]]  # a multi-label copy: every other clip also tagged x (absolute paths)
    for i, r in enumerate(rows[1:]):
        path, label, split = r.split(",")
        multi.append(f"{labeled_dir / path},{label}{';x' if i % 2 else ''},{split}")
    (tmp_path / "multi.csv").write_text("\n".join(multi) + "\n")
    y = tmp_path / "suite.yaml"  # one task by absolute path, one relative to the suite's folder
    y.write_text(f"tasks:\n  - name: toy\n    labels: {labeled_dir / 'labels.csv'}\n"
                 f"  - name: toy-multi\n    labels: multi.csv\n")
    return y


def test_suite_table_json_and_cache(suite, tmp_path, monkeypatch):
    calls = []
    real = ev.embed_files

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ev, "embed_files", counting)
    monkeypatch.setattr(probe_mod, "MLP_EPOCHS", 30)
    monkeypatch.setattr(probe_mod, "MLP_HIDDEN", (32,))
    ckpts = ["random:tiny/byol-a", "random:tiny/m2d"]
    out, cache = tmp_path / "r.json", tmp_path / "cache"
    res = CliRunner().invoke(app, ["probe", *ckpts, "--suite", str(suite), "--cache", str(cache), "--json", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["tasks"] == ["toy", "toy-multi"] and r["checkpoints"] == ckpts
    assert r["main_metric"] == {"toy": "accuracy", "toy-multi": "map"}
    assert all(0 <= r["table"][t][c] <= 1 for t in r["tasks"] for c in ckpts)
    # both tasks probe the same files: one extraction per checkpoint, the second task from the cache
    assert r["results"]["toy"][ckpts[0]]["confusion"] and r["extracted"] == 2 and r["cached"] == 2
    assert len(calls) == 2 and len(list(cache.glob("*.safetensors"))) == 2
    assert "toy-multi" in res.output and "random:tiny/m2d" in res.output
    # a second run with another probe (the MLP): nothing embedded again, the linear results unchanged
    res = CliRunner().invoke(app, ["probe", *ckpts, "--suite", str(suite), "--cache", str(cache), "--mlp",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    r2 = json.loads(out.read_text())
    assert len(calls) == 2 and r2["extracted"] == 0 and r2["cached"] == 4
    assert r2["table"] == r["table"]
    assert set(r2["table_mlp"]) == {"toy", "toy-multi"} and not list(cache.glob(".*.tmp"))


@pytest.mark.parametrize("text, message", [
    ("tasks: []\n", "non-empty `tasks:`"),
    ("tasks:\n  - name: a\n", "needs `name` and `labels`"),
    ("tasks:\n  - name: a\n    labels: nope.csv\n", "no such labels file"),
    ("tasks:\n  - name: a\n    labels: LAB\n    colour: red\n", "unknown key(s) colour"),
    ("tasks:\n  - name: a\n    labels: LAB\n  - name: a\n    labels: LAB\n", "used twice"),
    ("tasks:\n  - name: a\n    labels: LAB\n    frame_hop: fast\n", "frame_hop must be"),
    ("tasks: [unclosed\n", "not a YAML file"),
])
def test_bad_suites_are_one_line_errors(labeled_dir, tmp_path, text, message):
    y = tmp_path / "s.yaml"
    y.write_text(text.replace("LAB", str(labeled_dir / "labels.csv")))
    res = CliRunner().invoke(app, ["probe", "random:tiny/byol-a", "--suite", str(y)])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output


def test_probe_arguments_without_suite(labeled_dir, tmp_path):
    lab = str(labeled_dir / "labels.csv")
    for args, message in ((["random:tiny/byol-a", "random:tiny/simclr", lab], "need --suite"),
                          (["random:tiny/byol-a", lab, "--cache", str(tmp_path)], "--cache is for --suite"),
                          (["random:tiny/byol-a", "--suite", str(tmp_path / "none.yaml")], "no such suite file")):
        res = CliRunner().invoke(app, ["probe", *args])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
