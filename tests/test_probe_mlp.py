"""The MLP probe: solves data a linear probe cannot, is deterministic given the seed, reports the
linear probe's metric family with an `mlp_` prefix, and is opt-in (`--mlp`) on the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import sslaudio.probe as probe_mod
from sslaudio.cli import app
from sslaudio.probe import evaluate, mlp_probe


@pytest.fixture(autouse=True)
def small_grid(monkeypatch):
    monkeypatch.setattr(probe_mod, "MLP_EPOCHS", 60)
    monkeypatch.setattr(probe_mod, "MLP_HIDDEN", (32,))


def _xor(n=200, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, size=(n, 2)).astype(np.float32)
    y = ((X[:, 0] > 0) ^ (X[:, 1] > 0)).astype(int)
    return X, y


def test_mlp_solves_xor_where_linear_cannot_and_is_deterministic():
    X, y = _xor()
    tr, va, te = slice(0, 120), slice(120, 160), slice(160, 200)
    r = mlp_probe(X[tr], y[tr], X[va], y[va], X[te], y[te], 2, False, seed=3)
    assert r["mlp_accuracy"] > 0.85 and set(r) >= {"mlp_f1", "mlp_valid", "mlp_lr", "mlp_dropout",
                                                     "mlp_weight_decay", "mlp_hidden", "mlp_epochs"}
    assert r == mlp_probe(X[tr], y[tr], X[va], y[va], X[te], y[te], 2, False, seed=3)
    labels = [(str(v),) for v in y]
    lin = evaluate(X, labels, ["train"] * 120 + ["valid"] * 40 + ["test"] * 40)
    assert lin["accuracy"] < 0.75 and "mlp_accuracy" not in lin  # opt-in


def test_mlp_multilabel_reports_map_and_f1():
    X, y = _xor(seed=1)
    Y = np.stack([y, 1 - y, (X[:, 0] > 0).astype(int)], 1)
    labels = [tuple(c for c, v in zip("abc", row) if v) or ("a",) for row in Y]
    r = evaluate(X, labels, ["train"] * 120 + ["valid"] * 40 + ["test"] * 40, mlp=True)
    assert r["task"] == "multilabel" and {"mlp_map", "mlp_f1", "mlp_f1_macro"} <= set(r) and r["mlp_map"] > 0.8


def test_cli_mlp_flag_adds_mlp_metrics(labeled_dir, tmp_path):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["probe", "random:tiny/byol-a", str(labeled_dir / "labels.csv"), "--mlp",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert 0 <= r["mlp_accuracy"] <= 1 and "accuracy" in r and "knn_accuracy" in r and "mlp_accuracy" in res.output
