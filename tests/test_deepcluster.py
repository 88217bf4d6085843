"""DeepCluster: PCA-whitening, NMI, the uniform cluster weighting and faiss's empty-cluster split
against direct computations; the reassignment (re-initialised classifier, frozen label encoder);
a short run; bit-exact resume through the trainer across a reassignment, and the export."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sslaudio import kmeans
from sslaudio.config import ConfigError
from sslaudio.methods.deepcluster import uniform_cluster_weights
from tests.conftest import (
    build_tiny,
    first_last,
    gen,
    run_steps,
    synth_batch,
    synth_clips,
)

SMALL = ["encoder.d=160", "encoder.base_d=8", "encoder.mlp_hidden=32", "method.k=8", "method.memory=64", "method.pca_dim=16"]
S = 15200  # 0.95 s at 16 kHz


def _prepared(*over, crops: int = 64):
    m = build_tiny("deepcluster", *SMALL, *over)
    clips = synth_clips(crops, S / 16000, seed=40)
    m.prepare(clips[:16], lambda count, batch: iter(clips[:count].split(batch)))
    return m


# -- the clustering components ----------------------------------------------------------------

def test_pca_whitening_against_a_direct_computation():
    g = gen(0)
    x = torch.randn(500, 12, generator=g) @ torch.randn(12, 12, generator=g) + 3.0  # correlated, off-centre
    mean, proj = kmeans.pca_whitening(x, 5)
    y = (x - mean) @ proj
    cov = y.T.double() @ y.double() / x.shape[0]
    assert torch.allclose(cov, torch.eye(5, dtype=torch.float64), atol=1e-4)  # whitened: identity covariance
    xc = (x - x.mean(0)).double()
    ev, vec = torch.linalg.eigh(xc.T @ xc / x.shape[0])
    for j in range(5):  # column j: the j-th leading eigenvector over sqrt(its eigenvalue), up to sign
        want = vec[:, -1 - j] / ev[-1 - j].sqrt()
        got = proj[:, j].double()
        assert min(float((got - want).abs().max()), float((got + want).abs().max())) < 1e-4 * float(want.abs().max())
    z = kmeans.whiten_l2(x, mean, proj)
    assert torch.allclose(z.norm(dim=1), torch.ones(500), atol=1e-5)
    assert torch.allclose(z, y / y.norm(dim=1, keepdim=True), atol=1e-5)
    # fewer rows than dimensions: the components beyond the rank are zero, nothing blows up
    mean, proj = kmeans.pca_whitening(x[:4], 8)
    assert torch.isfinite(proj).all() and (proj.abs().sum(0) > 0).sum() == 3
    # more output dimensions than input ones: zero columns
    assert kmeans.pca_whitening(x, 20)[1][:, 12:].abs().sum() == 0


def test_nmi_against_a_hand_computation():
    a = torch.tensor([0, 0, 0, 1, 1, 1])
    b = torch.tensor([0, 0, 1, 1, 2, 2])
    pa, pb = [1 / 2, 1 / 2], [1 / 3, 1 / 3, 1 / 3]
    joint = {(0, 0): 2 / 6, (0, 1): 1 / 6, (1, 1): 1 / 6, (1, 2): 2 / 6}
    mi = sum(p * math.log(p / (pa[i] * pb[j])) for (i, j), p in joint.items())
    ha, hb = -sum(p * math.log(p) for p in pa), -sum(p * math.log(p) for p in pb)
    assert kmeans.nmi(a, b) == pytest.approx(mi / math.sqrt(ha * hb), rel=1e-6)
    assert kmeans.nmi(a, b, "arithmetic") == pytest.approx(mi / ((ha + hb) / 2), rel=1e-6)
    assert kmeans.nmi(b, 7 - b) == pytest.approx(1.0)  # the same partition under other names
    assert kmeans.nmi(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])) == pytest.approx(0.0, abs=1e-9)
    assert kmeans.nmi(torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long)) == 1.0
    assert kmeans.nmi(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 2, 3])) == 0.0


def test_uniform_cluster_weights_make_every_cluster_count_equally():
    counts = torch.tensor([6.0, 3.0, 1.0, 0.0])
    w = uniform_cluster_weights(counts)
    assert torch.allclose(w, torch.tensor([10 / 18, 10 / 9, 10 / 3, 0.0]))
    # over the memory's crops, mean(w x loss) = the mean over non-empty clusters of their mean loss,
    # the expected loss under UnifLabelSampler's uniform sampling over clusters
    labels = torch.tensor([0] * 6 + [1] * 3 + [2])
    loss = torch.rand(10, generator=gen(3))
    per_cluster = [float(loss[labels == c].mean()) for c in range(3)]
    assert float((w[labels] * loss).mean()) == pytest.approx(sum(per_cluster) / 3, rel=1e-6)
    assert float((w[labels]).mean()) == pytest.approx(1.0)


def test_an_empty_cluster_is_split_off_a_big_one_as_faiss_does():
    centers = torch.tensor([[1.0, 2.0, 3.0], [9.0, 9.0, 9.0], [0.0, 0.0, 0.0]])
    counts = torch.tensor([1.0, 10.0, 0.0])  # a singleton is never split: (1 - 1) / (n - k) = 0
    for seed in range(5):
        c, n = centers.clone(), counts.clone()
        assert kmeans.split_empty(c, n, gen(seed)) == 1
        e = kmeans.SPLIT_EPS
        assert torch.allclose(c[2], torch.tensor([9 * (1 + e), 9 * (1 - e), 9 * (1 + e)]))
        assert torch.allclose(c[1], torch.tensor([9 * (1 - e), 9 * (1 + e), 9 * (1 - e)]))
        assert torch.equal(c[0], centers[0]) and n.tolist() == [1.0, 5.0, 5.0]
    assert kmeans.split_empty(centers.clone(), torch.tensor([1.0, 1.0, 0.0]), gen(0)) == 0  # nothing to split
    # through the iterations: a centre far from every row ends up owning half of the big cluster
    x = torch.cat([torch.randn(100, 3, generator=gen(1)) * 0.1, torch.full((2, 3), 10.0)])
    fit = kmeans.lloyd(x, torch.tensor([[0.0, 0, 0], [10.0, 10, 10], [50.0, 50, 50]]), 3, gen(2))
    assert fit.splits >= 1 and fit.used == 3 and int(fit.counts.min()) > 0
    assert fit.counts[1] == 2 and fit.counts[0] + fit.counts[2] == 100


# -- the method -------------------------------------------------------------------------------

def test_prepare_fills_the_memory_and_the_memory_is_a_fifo():
    m = _prepared(crops=40)
    assert int(m.memory_filled) == 40 and m.memory.dtype == torch.float16
    m.push(torch.full((30, *m.spec_shape()), 7.0))
    assert int(m.memory_filled) == 64 and int(m.memory_ptr) == 6
    assert bool((m.memory[40:] == 7).all()) and bool((m.memory[:6] == 7).all()) and not bool((m.memory[6] == 7).all())


def test_reassignment_reinitialises_the_classifier_and_freezes_the_encoder():
    m = _prepared("method.reassign_every=2")
    audio = synth_batch(1, S / 16000, seed=3)
    m({"audio": audio}, 0, gen(0), 10)  # the first clustering
    assert int(m.clusterings) == 1 and int(m.in_use.sum()) == 8 and int(m.cluster_counts.sum()) == 64
    with torch.no_grad():
        m.classifier.weight.fill_(1.0)
        m.classifier.bias.fill_(1.0)
        for p in m.encoder.parameters():
            p.add_(0.01)
    m({"audio": audio}, 1, gen(1), 10)  # mid-epoch: nothing changes
    assert int(m.clusterings) == 1 and bool((m.classifier.weight == 1).all())
    assert not all(torch.equal(a, b) for a, b in zip(m.encoder.parameters(), m.label_encoder.parameters()))
    m({"audio": audio}, 2, gen(2), 10)  # a reassignment
    assert int(m.clusterings) == 2
    w = m.classifier.weight
    w = w.detach()
    assert float(w.std()) == pytest.approx(0.01, rel=0.1) and float(w.mean().abs()) < 1e-3
    assert bool((m.classifier.bias == 0).all())
    # the frozen copy is the encoder as of the clustering (its BN statistics moved on since, in training)
    assert all(torch.equal(a, b) for a, b in zip(m.encoder.parameters(), m.label_encoder.parameters()))
    assert not any(p.requires_grad for p in m.label_encoder.parameters())


def test_loss_is_the_cluster_weighted_cross_entropy_and_reaches_encoder_and_classifier():
    m = _prepared()
    audio = synth_batch(1, S / 16000, seed=4)
    m({"audio": audio}, 0, gen(0), 10)
    m.cluster_weight.fill_(1.0)
    torch.manual_seed(5)
    out = m({"audio": audio}, 1, gen(1), 10)
    assert float(out["loss"].detach()) == pytest.approx(float(out["ce"]), rel=1e-6)
    m.cluster_weight.fill_(2.5)
    torch.manual_seed(5)
    out = m({"audio": audio}, 1, gen(1), 10)
    assert float(out["loss"].detach()) == pytest.approx(2.5 * float(out["ce"]), rel=1e-5)
    out["loss"].backward()
    assert m.classifier.weight.grad.abs().sum() > 0 and m.classifier.bias.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.encoder.parameters())
    assert all(p.grad is None for p in m.label_encoder.parameters())
    groups = m.param_groups(0.1)
    assert [g.get("betas") for g in groups[-2:]] == [(0.0, 0.999)] * 2
    assert sum(len(g["params"]) for g in groups) == len([p for p in m.parameters() if p.requires_grad])


def test_short_run_lowers_the_loss_without_collapse():
    m = _prepared("method.reassign_every=1000")
    hist = run_steps(m, synth_batch(1, S / 16000, seed=6), 15, lr=3e-3)
    first, last = first_last(hist, key="ce")
    assert last < first - 0.5, (first, last)
    assert hist[-1]["acc"] >= 0.5 and hist[-1]["emb_std"] > 1e-3
    # the trained encoder's features of 64 varied crops still spread over the clusters
    m.push(m.features(synth_clips(64, S / 16000, seed=70)))
    m.recluster(gen(9))
    used, biggest = int((m.cluster_counts > 0).sum()), float(m.cluster_counts.max() / 64)
    assert used >= 6 and biggest < 0.5, (used, biggest)


def test_several_processes_cluster_every_memory_alike():
    m = _prepared(crops=40)
    m.gather_fn = lambda x: (torch.cat([x, x]), 0)  # a second process holding the same memory
    m({"audio": synth_batch(1, S / 16000, seed=3)}, 0, gen(0), 10)
    assert int(m.cluster_counts.sum()) == 80 and int(m.in_use.sum()) == 8


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="method.k must be >= 2"):
        build_tiny("deepcluster", "method.k=1")
    with pytest.raises(ConfigError, match="method.reassign_every must be >= 1"):
        build_tiny("deepcluster", "method.reassign_every=0")
    with pytest.raises(ConfigError, match="classifier_betas"):
        build_tiny("deepcluster", "method.classifier_betas=[1.0, 0.999]")
    with pytest.raises(ConfigError, match="views"):
        build_tiny("deepcluster", "views=[]")
    with pytest.raises(ConfigError, match="data.segments"):
        build_tiny("deepcluster", "data.segments=2")


# -- through the trainer ----------------------------------------------------------------------

RUN = SMALL + ["method.memory=12", "method.k=4", "method.pca_dim=8", "method.reassign_every=2", "train.steps=6",
               "train.ckpt_every=3", "train.batch_size=4", "train.log_every=1", "data.num_workers=0",
               "data.norm_samples=8"]


def test_resume_is_exact_across_a_reassignment_and_the_export_is_the_encoder(audio_dir, tmp_path):
    from sslaudio.build import load_preset
    from sslaudio.inference import load_encoder
    from sslaudio.train import fit

    p = load_preset("tiny/deepcluster", RUN)
    fit(p, [str(audio_dir)], tmp_path / "a", device="cpu")
    fit(p, [str(audio_dir)], tmp_path / "b", device="cpu")
    shutil.rmtree(tmp_path / "b/ckpt/step-000000006")
    assert fit(p, [str(audio_dir)], tmp_path / "b", device="cpu")["start_step"] == 3  # steps 4 (a clustering), 5
    a = load_file(str(tmp_path / "a/ckpt/step-000000006/model.safetensors"))
    b = load_file(str(tmp_path / "b/ckpt/step-000000006/model.safetensors"))
    assert a.keys() == b.keys() and {"memory", "centroids", "pca_proj", "cluster_weight"} <= a.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(line) for line in (tmp_path / "a/log.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (tmp_path / "b/log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in rows_b]
    assert [r["clusterings"] for r in rows] == [1, 1, 2, 2, 3, 3]
    assert "nmi" not in rows[0] and all(0 <= r["nmi"] <= 1 for r in rows[2:])
    state = json.loads((tmp_path / "a/ckpt/step-000000006/state.json").read_text())["method"]
    assert state["k"] == 4 and state["reassign_every"] == 2
    exported = load_file(str(tmp_path / "a/export/encoder.safetensors"))
    assert not any(k.startswith(("label_encoder", "classifier", "memory", "centroids")) for k in exported)
    bundle = load_encoder(str(tmp_path / "a"))
    with torch.no_grad():
        clip, _, _ = bundle.embed(torch.randn(2, 16000) * 0.1)
    assert clip.shape == (2, 160) and torch.isfinite(clip).all()
