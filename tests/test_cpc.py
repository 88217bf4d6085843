"""CPC and the `cpc` encoder: InfoNCE against explicit loops with given negatives (positive at index
0), negative sampling (never padding, never the anchor's own step, from the generator), the whole
method against a hand computation, padded batches, short inputs, config errors and a short run
that lowers the loss without collapse (export: tests/test_methods.py)."""

import math

import numpy as np
import pytest
import torch

from sslaudio.config import ConfigError
from sslaudio.methods import losses
from sslaudio.methods.cpc import sample_negatives
from tests.conftest import build_tiny, first_last, gen, run_steps, synth_clips

SMALL = ["encoder.hidden=8", "encoder.context=8", "method.n_predicts=3", "method.negatives=5",
         "train.batch_size=2", "data.clip_seconds=0.2"]
S = 3200  # 0.2 s -> 20 frames


def _method(*over, small=True):
    return build_tiny("cpc", *(SMALL if small else []), *over)


def dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b))


def _nce_term(scores):
    """One anchor: -log softmax at the positive (index 0) of its scores, and 1 if the positive
    scores highest."""
    mx = max(scores)
    return -(scores[0] - mx - math.log(sum(math.exp(s - mx) for s in scores))), int(scores[0] >= max(scores[1:]))


def _hand_nce(pred, pos, neg, valid):
    """Explicit loops: per offset k, mean over valid anchors of -log softmax at the positive (index 0)
    of the scores mean_d(p_d z_d); then the mean over k. Also the per-k accuracies."""
    K, N, D = pred.shape
    loss_k, acc_k = [], []
    for k in range(K):
        total, hits, count = 0.0, 0, 0
        for n in range(N):
            if not valid[n]:
                continue
            scores = [dot(pred[k, n], pos[k, n]) / D] + [dot(pred[k, n], neg[n, m]) / D for m in range(neg.shape[1])]
            nll, hit = _nce_term(scores)
            total, hits, count = total + nll, hits + hit, count + 1
        loss_k.append(total / count)
        acc_k.append(hits / count)
    return sum(loss_k) / K, acc_k


# -- the loss ------------------------------------------------------------------------------------
def test_info_nce_matches_explicit_loops_with_given_negatives():
    K, N, M, D = 3, 5, 4, 6
    pred, pos = torch.randn(K, N, D, generator=gen(1)), torch.randn(K, N, D, generator=gen(2))
    neg = torch.randn(N, M, D, generator=gen(3))
    valid = torch.tensor([True, True, False, True, True])
    for v in (None, valid):
        loss, terms = losses.cpc_info_nce(pred, pos, neg, v)
        want, acc = _hand_nce(pred, pos, neg, [True] * N if v is None else v.tolist())
        assert loss.item() == pytest.approx(want, abs=1e-5)
        assert terms["acc"].item() == pytest.approx(sum(acc) / K, abs=1e-6)
        assert [terms[f"acc_{k + 1}"].item() for k in range(K)] == pytest.approx(acc, abs=1e-6)
    # an invalid anchor may hold anything
    pred2 = pred.clone()
    pred2[:, 2] = 1e4
    assert losses.cpc_info_nce(pred2, pos, neg, valid).loss.item() == pytest.approx(
        losses.cpc_info_nce(pred, pos, neg, valid).loss.item(), abs=1e-6)


def test_positive_is_at_index_0():
    K, N, M, D = 2, 4, 7, 8
    z = torch.randn(N, D, generator=gen(4))
    neg = torch.randn(N, M, D, generator=gen(5))
    pred = (50.0 * z).expand(K, N, D)  # each prediction points at its own positive
    loss, terms = losses.cpc_info_nce(pred, z.expand(K, N, D), neg)
    assert terms["acc"].item() == 1.0 and loss.item() < 0.05
    # the same candidates with the roles swapped: the "positive" is now a random vector
    loss2, terms2 = losses.cpc_info_nce(pred, neg[:, 0].expand(K, N, D), z[:, None].expand(N, M, D))
    assert terms2["acc"].item() == 0.0 and loss2.item() > math.log(M + 1)
    # all candidates equal: chance level, log(M + 1)
    loss3, _ = losses.cpc_info_nce(pred, z.expand(K, N, D), z[:, None].expand(N, M, D))
    assert loss3.item() == pytest.approx(math.log(M + 1), abs=1e-5)


def test_info_nce_shape_errors():
    with pytest.raises(ValueError, match="negatives"):
        losses.cpc_info_nce(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(3, 5, 2))
    with pytest.raises(ValueError, match="no valid anchor"):
        losses.cpc_info_nce(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(3, 5, 4),
                            torch.zeros(3, dtype=torch.bool))


# -- negative sampling ---------------------------------------------------------------------------
def test_negatives_avoid_padding_and_the_anchor_step_and_cover_the_batch():
    lengths = torch.tensor([10, 3, 7, 1])
    T, W, M = 10, 6, 400
    idx = sample_negatives(lengths, W, T, M, gen(7))
    assert idx.shape == (4, W, M)
    item, step = idx // T, idx % T
    assert bool((step < lengths[item]).all()), "a negative landed on a padded step"
    anchor = torch.arange(W).view(1, W, 1).expand_as(step)
    long_enough = lengths[item] > 1
    assert not bool(((step == anchor % lengths[item]) & long_enough).any()), "drew the anchor's own step"
    # items are uniform over the batch; within item b' the steps other than t are uniform
    counts = torch.bincount(item.flatten(), minlength=4).float() / item.numel()
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.02)
    first = idx[:, 0][item[:, 0] == 0] % T  # anchor t = 0 in item 0: steps 1..9, uniform
    hist = torch.bincount(first, minlength=T).float()
    assert hist[0] == 0 and hist[1:].min() > 0.6 * hist[1:].mean()
    # the generator decides everything
    assert torch.equal(idx, sample_negatives(lengths, W, T, M, gen(7)))
    assert not torch.equal(idx, sample_negatives(lengths, W, T, M, gen(8)))


# -- the encoder ---------------------------------------------------------------------------------
def test_encoder_shapes_downsampling_and_layers():
    m = _method(small=False)
    enc = m.encoder
    assert enc.downsample == 160 and enc.receptive_field == 465 and enc.min_samples == 159
    out = enc(torch.randn(2, 20480) * 0.1, return_layers=True)  # CPC_audio's window: 128 frames
    assert out.tokens.shape == (2, 128, 128) and [t.shape[-1] for t in out.layers] == [128, 128]
    assert out.layers[0] is out.local and out.layers[1] is out.tokens
    assert bool((out.local >= 0).all())  # ReLU after the last ChannelNorm
    times = enc.frame_times(128)
    assert times[0] > 0 and float(times[-1]) <= 20480 / 16000


def test_padded_batch_equals_each_item_alone():
    enc = _method().encoder.eval()
    x = torch.randn(3, 4000, generator=gen(9))
    lengths = torch.tensor([4000, 2345, 159])
    x[1, 2345:] = 3.0  # padding content must not matter
    x[2, 159:] = -5.0
    out = enc(x, lengths, return_layers=True)
    frames = enc.output_lengths(lengths)
    assert frames.tolist() == [25, 14, 1]
    assert torch.equal(out.padding, torch.arange(25)[None] >= frames[:, None])
    for b in range(3):
        alone = enc(x[b:b + 1, :int(lengths[b])], return_layers=True)
        n = int(frames[b])
        assert alone.tokens.shape[1] == n
        for la, lb in zip(alone.layers, out.layers):
            assert torch.allclose(la[0], lb[b, :n], atol=1e-5)


def test_too_short_input_is_a_clear_error():
    enc = _method().encoder
    with pytest.raises(ValueError, match="at least 159 samples"):
        enc(torch.zeros(1, 158))
    with pytest.raises(ValueError, match="at least 159 samples"):
        enc(torch.zeros(2, 400), torch.tensor([400, 100]))
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        enc(torch.zeros(1, 1, 400))
    m = _method()
    with pytest.raises(ValueError, match="no anchor"):  # 3 frames, 3 predicted steps
        m({"audio": torch.randn(2, 1, 480)}, 0, gen(), 10)


# -- the method ----------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True])
def test_loss_matches_hand_computation(padded):
    m = _method()
    audio = synth_clips(2, S / 16000)
    batch = {"audio": audio[:, None]}
    if padded:
        batch["lengths"] = torch.tensor([S, 2400])  # 20 and 15 frames
    out = m(batch, 0, gen(11), 10)
    with torch.no_grad():
        x, lengths = m.frontend(audio, batch.get("lengths"))
        eo = m.encoder(x, lengths if padded else None)
        z, c = eo.local, eo.tokens
        B, T, D = z.shape
        K, M = m.cfg.n_predicts, m.cfg.negatives
        W = T - K
        fl = m.encoder.output_lengths(lengths) if padded else torch.full((B,), T)
        idx = sample_negatives(fl, W, T, M, gen(11))  # the method's only draws, in the same order
        loss_k, acc_k = [], []
        for k in range(1, K + 1):
            total, hits, count = 0.0, 0, 0
            for b in range(B):
                for t in range(W):
                    if t >= int(fl[b]) - K:  # the anchor's targets run into padding
                        continue
                    p = m.predictors[k - 1].weight @ c[b, t]
                    cands = [z[b, t + k]] + [z[int(j) // T, int(j) % T] for j in idx[b, t]]
                    assert all(int(j) % T < int(fl[int(j) // T]) for j in idx[b, t])
                    nll, hit = _nce_term([dot(p, q) / D for q in cands])
                    total, hits, count = total + nll, hits + hit, count + 1
            loss_k.append(total / count)
            acc_k.append(hits / count)
    assert out["loss"].item() == pytest.approx(sum(loss_k) / K, abs=1e-5)
    assert out["acc"].item() == pytest.approx(sum(acc_k) / K, abs=1e-6)
    assert {"ctx_std", "z_std", "acc_1", "acc_3"} <= out.keys() and all(v.ndim == 0 for v in out.values())
    # the participation ratios of the valid frames the stds read (padding left out)
    for key, frames in (("z_dims", z), ("ctx_dims", c)):
        rows = frames[~eo.padding] if padded else frames.reshape(-1, frames.shape[-1])
        cov = torch.cov(rows.T.double())
        assert out[key].item() == pytest.approx((cov.trace() ** 2 / cov.pow(2).sum()).item(), rel=1e-3), key


def test_gradients_reach_encoder_context_and_predictors():
    m = _method()
    out = m({"audio": synth_clips(2, S / 16000)[:, None]}, 0, gen(), 10)
    out["loss"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_config_errors():
    with pytest.raises(ConfigError, match="n_predicts"):
        _method("method.n_predicts=0")
    with pytest.raises(ConfigError, match="negatives"):
        _method("method.negatives=0")
    with pytest.raises(ConfigError, match="frontend.name"):
        _method("frontend={name: logmel}")
    with pytest.raises(ConfigError, match="clip_seconds"):
        _method("data.clip_seconds=0.1", "method.n_predicts=12")  # 10 frames for 12 steps
    with pytest.raises(ConfigError, match="conv_layers"):
        _method("encoder.conv_layers=[[10, 5]]")
    with pytest.raises(ConfigError, match="cpc"):
        _method("encoder={name: conv_transformer, dim: 16, depth: 1, heads: 2, ffn_dim: 16, "
                "conv_layers: [[8, 10, 5]], pos_conv_kernel: 4, pos_conv_groups: 2}")


def test_short_run_lowers_the_loss_without_collapse():
    m = _method("encoder.hidden=32", "encoder.context=32", "method.n_predicts=4", "method.negatives=16",
                "data.clip_seconds=0.32")
    audio = synth_clips(8, 0.32, seed=20)[:, None]  # one clip per class, 32 frames each
    hist = run_steps(m, audio, 40, lr=3e-3)
    first, last = first_last(hist)
    assert first == pytest.approx(math.log(17), abs=0.1)  # 16 negatives: chance is log(17)
    assert last < first - 0.25, (first, last)
    assert np.mean([h["acc"] for h in hist[-5:]]) > 1.5 / 17  # above chance at picking the positive
    assert hist[-1]["ctx_std"] > 0.05 and hist[-1]["z_std"] > 0.05  # collapsed: ~0.003
