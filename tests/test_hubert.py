"""HuBERT with its k-means built in: MFCC labels, the clustering component, the codeword loss, label
alignment, the checks, and the two iterations through the trainer."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from safetensors.torch import load_file

from sslaudio import kmeans
from sslaudio.config import ConfigError
from sslaudio.frontends import KaldiMFCC
from sslaudio.methods import losses
from sslaudio.methods.hubert import parse_targets
from tests.conftest import build_tiny, first_last, gen, run_steps, synth_batch, synth_clips

SR = 16000


# -- targets and clustering ------------------------------------------------------------------

def test_batched_mfcc_equals_torchaudio_kaldi_per_clip():
    m = KaldiMFCC(SR)
    audio = synth_clips(3, 0.5, seed=3)
    out = m(audio)
    assert out.shape == (3, 1 + (audio.shape[1] - 400) // 160, 39)
    for b in range(3):
        c = torchaudio.compliance.kaldi.mfcc(audio[b:b + 1], sample_frequency=SR, use_energy=False).t()
        d = torchaudio.functional.compute_deltas(c)
        ref = torch.cat([c, d, torchaudio.functional.compute_deltas(d)]).t()
        assert torch.allclose(out[b], ref, atol=1e-3, rtol=1e-4)


def test_kmeans_finds_separated_blobs_and_assign_is_nearest():
    g = gen(0)
    true = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = (true.repeat_interleave(200, 0) + 0.1 * torch.randn(800, 2, generator=g))
    cfg = kmeans.KMeansConfig(k=4, batch=256, iters=50, n_init=3)
    fit = kmeans.fit(x, cfg, gen(1))
    assert fit.used == 4 and fit.rows == 800
    # every true centre has a fitted centre within 0.1, and the inertia is the noise's
    d = torch.cdist(true, fit.centers)
    assert float(d.min(1).values.max()) < 0.1
    assert fit.inertia == pytest.approx(0.02, rel=0.3)
    labels, dist = kmeans.assign(x[:50], fit.centers)
    brute = [min(range(4), key=lambda j: float(((x[i] - fit.centers[j]) ** 2).sum())) for i in range(50)]
    assert labels.tolist() == brute
    assert torch.allclose(dist, ((x[:50] - fit.centers[labels]) ** 2).sum(1), atol=1e-4)


def test_reservoir_is_bounded_and_uniform():
    r = kmeans.Reservoir(100, gen(2))
    for i in range(50):  # 5000 rows in chunks, row value = its index
        r.add(torch.arange(i * 100, (i + 1) * 100, dtype=torch.float32)[:, None])
        assert r.rows.shape[0] <= 100
    assert r.seen == 5000 and r.rows.shape == (100, 1)
    # a uniform sample of 0..4999: mean near 2500 (sd of the mean ~144), rows from every part
    assert abs(float(r.rows.mean()) - 2500) < 600
    assert float(r.rows.min()) < 1000 and float(r.rows.max()) > 4000


def test_purity_and_usage_by_hand():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    classes = torch.tensor([5, 5, 1, 2, 3, 1])
    # cluster 0: majority 5 (2 of 3); cluster 1: 1 of 2; cluster 2: 1 of 1 -> 4 / 6
    assert kmeans.purity(labels, classes) == pytest.approx(4 / 6)
    p = [3 / 6, 2 / 6, 1 / 6, 0.0]
    assert float(kmeans.usage_entropy(labels, 4)) == pytest.approx(
        -sum(q * math.log(q) for q in p if q) / math.log(4), rel=1e-5)
    assert float(kmeans.usage_entropy(torch.zeros(10, dtype=torch.long), 4)) == 0.0


def test_cluster_prediction_loss_by_hand():
    pred = torch.randn(3, 4, generator=gen(4))
    code = torch.randn(5, 4, generator=gen(5))
    labels = torch.tensor([1, 4, 0])
    out = losses.cluster_prediction_loss(pred, code, labels, 0.1)
    total, correct = 0.0, 0
    for i in range(3):
        p = pred[i].tolist()
        logits = []
        for c in range(5):
            e = code[c].tolist()
            dot = sum(a * b for a, b in zip(p, e))
            logits.append(dot / math.sqrt(sum(a * a for a in p)) / math.sqrt(sum(b * b for b in e)) / 0.1)
        total += math.log(sum(math.exp(v) for v in logits)) - logits[labels[i]]
        correct += int(max(range(5), key=lambda c: logits[c]) == labels[i])
    assert float(out.loss) == pytest.approx(total, rel=1e-5)
    assert float(out.terms["correct"]) == correct and float(out.terms["rows"]) == 3


def test_parse_targets():
    assert parse_targets("mfcc", 6) == ("mfcc", 0)
    assert parse_targets("runs/it1:9", 6) == ("runs/it1", 9)
    assert parse_targets("runs/it1", 6) == ("runs/it1", 6)
    assert parse_targets("C:/x/run", 6) == ("C:/x/run", 6)


# -- the method ------------------------------------------------------------------------------

def _prepared(name="hubert", *overrides, seed=0):
    m = build_tiny(name, "method.kmeans.k=8", "method.kmeans.batch=512", "method.kmeans.iters=20",
                   "method.kmeans.n_init=2", *overrides, seed=seed)
    audio = synth_clips(8, 2.0, seed=seed)
    m.prepare(audio, lambda count, batch: iter(audio.split(batch)))
    return m


def test_frame_labels_of_50hz_frames_are_every_second_mfcc_label():
    m = _prepared("hubert-wave").eval()
    audio = synth_clips(2, 2.0, seed=9)
    n_frames = int(m.encoder.output_lengths(torch.tensor([audio.shape[1]]))[0])
    labels = m.frame_labels(audio, n_frames)
    ids, _ = kmeans.assign(m.mfcc(audio).reshape(-1, 39), m.codebook)
    ids = ids.view(2, -1)
    assert labels.shape == (2, n_frames)
    assert torch.equal(labels, ids[:, 0:2 * n_frames:2])


def test_loss_is_masked_cross_entropy_plus_feature_penalty():
    m = _prepared("hubert-wave")
    m.eval()  # no dropout: the encoder output is a function of the mask alone
    audio = synth_clips(2, 2.0, seed=11).unsqueeze(1)
    out = m({"audio": audio}, 0, gen(7), 10)
    # recompute from the same mask
    x = m.features(audio[:, 0])
    lengths = torch.full((2,), x.shape[-1], dtype=torch.long)
    mask = m.masker(m.encoder.token_grid(x.shape), 2, m.encoder.token_padding(lengths, x.shape), gen(7))
    enc = m.encoder(x, lengths, mask=mask)
    labels = m.frame_labels(audio[:, 0], enc.tokens.shape[1])
    pred = m.final_proj(enc.tokens)[mask.masked]
    logits = torch.nn.functional.normalize(pred, dim=-1) @ torch.nn.functional.normalize(m.label_embs, dim=-1).t() / 0.1
    ce = torch.nn.functional.cross_entropy(logits, labels[mask.masked])
    assert float(out["loss"].detach()) == pytest.approx(float((ce + 10 * enc.features_pen).detach()), rel=1e-5)
    assert 0.5 < float(out["masked_pct"]) < 0.95  # p 0.8 x length 10 spans


def test_unmasked_weight_adds_visible_frames():
    m = _prepared("hubert", "method.unmasked_weight=1.0").eval()
    out = m({"audio": synth_clips(2, 2.0, seed=12).unsqueeze(1)}, 0, gen(1), 10)
    loss = float(out["loss"].detach())
    assert float(out["acc_unmasked"]) >= 0.0 and math.isfinite(loss)
    assert loss != pytest.approx(float(out["masked_loss"]))


def test_gradients_reach_student_and_heads_only():
    m = _prepared("hubert-wave")
    out = m({"audio": synth_clips(4, 2.0, seed=13).unsqueeze(1)}, 0, gen(2), 10)
    out["loss"].backward()
    named = dict(m.named_parameters())
    assert {"final_proj.weight", "label_embs", "encoder.mask_emb"} <= named.keys()
    assert any(k.startswith("encoder.extractor.") for k in named)
    silent = [k for k, p in named.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, silent  # every trainable part, the conv extractor included (x 0.1)
    assert "codebook" not in named  # a buffer, never trained


def test_degenerate_codebook_and_bad_rates_are_config_errors():
    m = build_tiny("hubert", "method.kmeans.k=8", "method.kmeans.n_init=1", "method.kmeans.iters=5")
    silence = torch.zeros(4, 2 * SR)
    with pytest.raises(ConfigError, match="uses only 1 of 8 clusters"):
        m.prepare(silence, lambda count, batch: iter(silence.split(batch)))
    with pytest.raises(ConfigError, match="whole multiple"):  # 66.7 Hz frames, 100 Hz labels
        build_tiny("hubert", "frontend.hop=240")
    with pytest.raises(ConfigError, match="mask_token"):
        build_tiny("hubert", "encoder.mask_token=false")


def test_short_run_lowers_loss_without_collapse():
    m = _prepared("hubert", "method.kmeans.k=16")
    hist = run_steps(m, synth_batch(1, 2.0, seed=20), 25, lr=2e-3)
    first, last = first_last(hist)
    assert last < first - 0.2, (first, last)
    assert hist[-1]["acc_masked"] > 2 / 16
    assert hist[-1]["cluster_usage"] > 0.3 and hist[-1]["frame_std"] > 1e-3


# -- through the trainer: iteration 1, iteration 2, resume --------------------------------------

@pytest.fixture(scope="module")
def speechless(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubert-data")
    rng = np.random.default_rng(0)
    t = np.arange(int(2.2 * SR)) / SR
    for i in range(8):
        f = 150 + 90 * i
        x = 0.3 * np.sin(2 * np.pi * f * t * (1 + 0.2 * np.sin(2 * np.pi * 3 * t))) + 0.05 * rng.standard_normal(t.size)
        sf.write(str(root / f"{i}.wav"), x.astype(np.float32), SR)
    return root


SMALL = ["train.steps=4", "train.ckpt_every=2", "train.batch_size=4", "train.log_every=1", "data.num_workers=0",
         "method.kmeans.k=8", "method.kmeans.sample_crops=16", "method.kmeans.iters=10", "method.kmeans.n_init=2",
         "method.kmeans.batch=1024"]


def test_two_iterations_resume_exactly_and_export_without_targets(speechless, tmp_path):
    from sslaudio.build import load_preset
    from sslaudio.train import fit

    it1 = load_preset("tiny/hubert", SMALL)
    fit(it1, [str(speechless)], tmp_path / "it1", device="cpu")
    state = json.loads((tmp_path / "it1/ckpt/step-000000004/state.json").read_text())
    assert state["method"]["targets"] == "mfcc" and state["method"]["k"] == 8
    assert state["method"]["kmeans_used"] >= 4
    rows = [json.loads(line) for line in (tmp_path / "it1/log.jsonl").read_text().splitlines()]
    assert all("acc_masked" in r and "cluster_usage" in r and "kmeans_inertia" in r for r in rows)

    src = tmp_path / "src"
    shutil.copytree(tmp_path / "it1", src)
    it2 = load_preset("tiny/hubert", SMALL + [f"method.targets={src}:2"])
    fit(it2, [str(speechless)], tmp_path / "a", device="cpu")
    fit(it2, [str(speechless)], tmp_path / "b", device="cpu")
    shutil.rmtree(tmp_path / "b/ckpt/step-000000004")
    shutil.rmtree(src)  # the source is gone: the resumed run has its preset and weights already
    summary = fit(it2, [str(speechless)], tmp_path / "b", device="cpu")
    assert summary["start_step"] == 2
    a = load_file(str(tmp_path / "a/ckpt/step-000000004/model.safetensors"))
    b = load_file(str(tmp_path / "b/ckpt/step-000000004/model.safetensors"))
    assert a.keys() == b.keys() and "codebook" in a and any(k.startswith("label_model.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    info = json.loads((tmp_path / "a/ckpt/step-000000004/state.json").read_text())["method"]
    assert info["layer"] == 2 and len(info["source_sha256"]) == 64
    # the label model's weights are iteration 1's
    it1_w = load_file(str(tmp_path / "it1/ckpt/step-000000004/model.safetensors"))
    enc_keys = [k for k in it1_w if k.startswith("encoder.")]
    assert enc_keys and all(torch.equal(a[f"label_model.{k}"], it1_w[k]) for k in enc_keys)
    exported = load_file(str(tmp_path / "a/export/encoder.safetensors"))
    assert not any("label" in k or "codebook" in k or "final_proj" in k for k in exported)


def test_targets_without_such_layer_or_checkpoint_fail_in_one_line(speechless, tmp_path):
    from sslaudio.build import load_preset
    from sslaudio.train import fit

    fit(load_preset("tiny/hubert", SMALL[1:] + ["train.steps=1"]), [str(speechless)], tmp_path / "it1", device="cpu")
    with pytest.raises(ConfigError, match="has 4 blocks .* no layer 9"):
        fit(load_preset("tiny/hubert", SMALL + [f"method.targets={tmp_path / 'it1'}:9"]), [str(speechless)],
            tmp_path / "x", device="cpu")
    with pytest.raises(ConfigError, match="cannot read the checkpoint"):
        fit(load_preset("tiny/hubert", SMALL + [f"method.targets={tmp_path / 'nope'}"]), [str(speechless)],
            tmp_path / "y", device="cpu")
