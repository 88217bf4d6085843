import itertools

import numpy as np
import pytest
import torch

from sslaudio import probe
from sslaudio.probe import (
    ProbeError,
    accuracy,
    average_precision,
    column_moments,
    evaluate,
    macro_f1,
    mean_average_precision,
    read_labels,
    stratified_folds,
)


def test_metrics_by_hand():
    pred, y = np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2])
    assert accuracy(pred, y) == 0.75
    # class 0: f1 1; class 1: tp1 fp1 fn0 -> 2/3; class 2: tp1 fp0 fn1 -> 2/3
    assert macro_f1(pred, y, 3) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    # ranks of positives 1 and 3: precisions 1/1 and 2/3
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    S = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.6]])
    Y = np.array([[1, 0], [0, 1], [0, 1]])
    assert mean_average_precision(S, Y) == pytest.approx((1.0 + 1.0) / 2)


def _blobs(n_per=20, classes=3, dim=8, seed=0, sep=4.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * sep
    X = np.concatenate([centres[c] + rng.normal(size=(n_per, dim)) for c in range(classes)])
    labels = [(str(c),) for c in range(classes) for _ in range(n_per)]
    return X.astype(np.float32), labels


def test_standardisation_is_numpys_in_chunks_and_leaves_the_input(monkeypatch):
    monkeypatch.setattr(probe, "_MOMENT_ROWS", 7)  # 50 rows: 8 chunks, the last one short
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(50, 4)) * [1, 10, 0.1, 0] + [3, -2, 100, 5]).astype(np.float32)
    mu, sd = column_moments(X)
    assert np.allclose(mu, X.astype(np.float64).mean(0), atol=1e-5)
    assert np.allclose(sd, X.astype(np.float64).std(0) + 1e-6, rtol=1e-5)
    before = X.copy()
    tr, other = probe._standardize(X, X[:3].astype(np.float64))
    assert np.array_equal(X, before)  # a new array, not the caller's overwritten
    assert tr.dtype == other.dtype == torch.float32
    assert torch.allclose(tr[:, :3].mean(0), torch.zeros(3), atol=1e-4)  # float32 steps of 100, over 0.1
    assert torch.allclose(tr[:, :3].std(0, unbiased=False), torch.ones(3), atol=1e-4)
    assert torch.equal(tr[:, 3], torch.zeros(50))  # a constant column: 0, not NaN
    assert torch.allclose(other, tr[:3])
    mine = X.copy()  # inplace: the caller's float32 array becomes the standardised one
    (t,) = probe._standardize(mine, inplace=True)
    assert np.shares_memory(t.numpy(), mine) and torch.equal(t, tr)


def test_linear_and_knn_solve_separable_data_with_splits():
    X, labels = _blobs()
    splits = (["train"] * 12 + ["valid"] * 3 + ["test"] * 5) * 3
    r, fit = evaluate(X, labels, splits, return_fit=True)
    assert r["accuracy"] == 1.0 and r["knn_accuracy"] == 1.0 and r["protocol"] == "train/valid/test"
    # the fit fine-tuning starts from: the splits, and the chosen weights on train-standardised inputs
    assert (len(fit.train), len(fit.valid), len(fit.test)) == (36, 9, 15)
    assert np.allclose(fit.mu, X[fit.train].mean(0)) and fit.W.shape == (8, 3) and fit.b.shape == (3,)
    logits = torch.from_numpy((X[fit.valid] - fit.mu) / fit.sd).float() @ fit.W + fit.b
    assert accuracy(logits.argmax(1).numpy(), np.array([int(labels[i][0]) for i in fit.valid])) == r["valid"]
    with pytest.raises(ProbeError, match="split column"):
        evaluate(X, labels, [None] * len(labels), return_fit=True)
    Xr = np.random.default_rng(1).normal(size=X.shape).astype(np.float32)  # no signal: near chance
    assert evaluate(Xr, labels, splits)["accuracy"] < 0.7


def test_cross_validation_without_split():
    X, labels = _blobs()
    r = evaluate(X, labels, [None] * len(labels))
    assert "cross-validation" in r["protocol"] and r["accuracy"] > 0.95 and "accuracy_std" in r


def test_stratified_folds_partition():
    y = np.array([0] * 10 + [1] * 5)
    folds = stratified_folds(y, 5, 0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(15))
    assert all((y[f] == 1).sum() == 1 for f in folds)


def test_multilabel_reports_map():
    X, _ = _blobs(classes=2)
    labels = [("a",) if i < 20 else ("a", "b") for i in range(40)]
    r = evaluate(X, labels, (["train"] * 12 + ["valid"] * 3 + ["test"] * 5) * 2)
    assert r["task"] == "multilabel" and r["map"] > 0.9 and "f1" in r


def test_label_file_errors(tmp_path):
    bad = tmp_path / "l.csv"
    bad.write_text("file,label\na.wav,x\n")
    with pytest.raises(ProbeError, match="path,label"):
        read_labels(bad)
    bad.write_text("path,label,split\na.wav,x,training\n")
    with pytest.raises(ProbeError, match="split must be one of"):
        read_labels(bad)
    good = tmp_path / "g.tsv"
    good.write_text("path\tlabel\nsub/a.wav\tx;y\n")
    (row,) = read_labels(good)
    assert row.path == str(tmp_path / "sub" / "a.wav") and row.labels == ("x", "y") and row.split is None


@pytest.mark.parametrize("multilabel,groups", [(False, 1), (True, 1), (False, 2), (True, 3)])
def test_the_grid_fit_trains_each_config_as_it_would_alone(multilabel, groups, monkeypatch):
    """The linear probe trains its whole (lr, wd) grid at once; each config must follow the plain
    full-batch Adam trajectory of its own loss (mean CE or mean BCE over items and classes +
    wd * ||W||^2) from the same initial weights. With `groups` (--layer weighted), X is that many
    layers side by side and each config's logits are sum_l softmax(a)_l X_l W + b, the layer logits a
    starting at zero and trained with W and b; the fit hands W over as its equivalent on the whole
    X (block l: softmax(a)_l W)."""
    import torch.nn.functional as F

    import sslaudio.probe as probe_mod

    monkeypatch.setattr(probe_mod, "EPOCHS", 6)
    monkeypatch.setattr(probe_mod, "EVAL_EVERY", 3)
    rng = np.random.default_rng(0)
    X = torch.from_numpy(rng.normal(size=(40, 5 * groups)).astype(np.float32))
    Y = (torch.from_numpy((rng.random((40, 3)) < 0.4).astype(np.float32)) if multilabel
         else torch.from_numpy(rng.integers(0, 3, 40)))
    got = list(probe_mod._fit_linear(X, Y, multilabel, seed=7, groups=groups))
    assert [e for e, *_ in got] == [3, 6]
    _, Ws, bs, As = got[-1]
    assert Ws.shape == (len(probe_mod.LRS) * len(probe_mod.WDS), 5 * groups, 3) and bs.shape == (Ws.shape[0], 3)
    assert (As is None) == (groups == 1)
    g = torch.Generator().manual_seed(7)
    init = [torch.randn(len(probe_mod.WDS), 5, 3, generator=g) * 0.01 for _ in probe_mod.LRS]
    for k, (lr, wd) in enumerate(itertools.product(probe_mod.LRS, probe_mod.WDS)):
        W = init[k // len(probe_mod.WDS)][k % len(probe_mod.WDS)].clone().requires_grad_()
        b = torch.zeros(3, requires_grad=True)
        a = torch.zeros(groups, requires_grad=True)
        opt = torch.optim.Adam([W, b] + ([a] if groups > 1 else []), lr=lr)
        for _ in range(6):
            w = a.softmax(0)
            logits = sum(w[i] * X[:, 5 * i:5 * (i + 1)] @ W for i in range(groups)) + b
            loss = (F.binary_cross_entropy_with_logits(logits, Y) if multilabel
                    else F.cross_entropy(logits, Y)) + wd * (W * W).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        w = a.detach().softmax(0)
        torch.testing.assert_close(Ws[k], torch.cat([w[i] * W.detach() for i in range(groups)]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bs[k], b.detach(), rtol=1e-5, atol=1e-6)
        if groups > 1:
            torch.testing.assert_close(As[k], w, rtol=1e-5, atol=1e-6)


def test_the_weighted_sum_probe_finds_the_layer_that_carries_the_labels():
    """Three layers side by side, only the middle one tells the classes apart: the weighted-sum
    probe puts most of its weight there and classifies as a probe on that layer alone does."""
    from sslaudio.probe import evaluate

    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 60)
    means = rng.normal(size=(4, 8)) * 1.5
    layers = [rng.normal(size=(240, 8)), means[y] + rng.normal(size=(240, 8)), rng.normal(size=(240, 8))]
    X = np.concatenate(layers, 1).astype(np.float32)
    splits = list(np.tile(["train"] * 3 + ["valid", "test"], 48))
    labels = [(str(c),) for c in y]
    res = evaluate(X, labels, splits, groups=3)
    alone = evaluate(layers[1].astype(np.float32), labels, splits)
    assert len(res["layer_weights"]) == 3 and abs(sum(res["layer_weights"]) - 1) < 1e-3
    assert int(np.argmax(res["layer_weights"])) == 1 and res["layer_weights"][1] > 0.5
    assert res["accuracy"] >= alone["accuracy"] - 0.05 and res["accuracy"] > 0.6
    assert "layer_weights" not in alone
