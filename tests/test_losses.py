"""Each loss against a hand computation in plain Python (loops over lists, float64 math), plus
the properties its paper relies on: symmetry, temperature, stop-gradient, collapse signals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslaudio.methods import losses
from tests.conftest import gen


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed))


# -- plain-Python helpers: independent of the vectorised code under test ----------------------
def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def unit(a):
    n = math.sqrt(dot(a, a))
    return [x / n for x in a]


def cos(a, b):
    return dot(unit(a), unit(b))


def column(m, j):
    return [row[j] for row in m]


def mean(xs):
    return sum(xs) / len(xs)


def var(xs, unbiased):
    mu = mean(xs)
    return sum((x - mu) ** 2 for x in xs) / (len(xs) - (1 if unbiased else 0))


def log_softmax_at(logits, i):
    mx = max(logits)
    return logits[i] - mx - math.log(sum(math.exp(v - mx) for v in logits))


def close(value, expected, tol=1e-5):
    return value == pytest.approx(expected, rel=tol, abs=tol)


# -- BYOL / SimSiam ---------------------------------------------------------------------------
def test_byol_loss_matches_hand_computation():
    p, z = randn(3, 4, seed=1), randn(3, 4, seed=2)
    expected = mean([2 - 2 * cos(a, b) for a, b in zip(p.tolist(), z.tolist())])
    assert close(losses.byol_loss(p, z).item(), expected)


def test_byol_loss_identical_views_zero_and_opposite_four():
    z = randn(5, 8)
    assert close(losses.byol_loss(z, z).item(), 0.0)
    assert close(losses.byol_loss(z, -3 * z).item(), 4.0)


def test_negative_cosine_matches_hand_computation():
    p, z = randn(3, 4, seed=3), randn(3, 4, seed=4)
    expected = -mean([cos(a, b) for a, b in zip(p.tolist(), z.tolist())])
    assert close(losses.negative_cosine(p, z).item(), expected)
    assert close(losses.negative_cosine(z, 2 * z).item(), -1.0)


@pytest.mark.parametrize("fn", [losses.byol_loss, losses.negative_cosine])
def test_target_gets_no_gradient(fn):
    p = randn(4, 6, seed=5).requires_grad_()
    z = randn(4, 6, seed=6).requires_grad_()
    fn(p, z).backward()
    assert z.grad is None
    assert p.grad is not None and p.grad.abs().sum() > 0


# -- SimCLR NT-Xent ---------------------------------------------------------------------------
def hand_nt_xent(z1, z2, tau):
    """Chen et al. 2020 eq. 1: l(i, j) = -log exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ), mean over 2N."""
    views = z1.tolist() + z2.tolist()
    n = len(z1)
    total, pos, neg = 0.0, [], []
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        others = [k for k in range(2 * n) if k != i]
        logits = [cos(views[i], views[k]) / tau for k in others]
        total -= log_softmax_at(logits, others.index(j))
        pos.append(cos(views[i], views[j]))
        neg += [cos(views[i], views[k]) for k in others if k != j]
    return total / (2 * n), mean(pos), mean(neg)


def test_nt_xent_matches_hand_computation():
    z1, z2 = randn(3, 4, seed=7), randn(3, 4, seed=8)
    loss, pos, neg = hand_nt_xent(z1, z2, 0.1)
    out = losses.nt_xent(z1, z2, temperature=0.1)
    assert close(out.loss.item(), loss)
    assert close(out.terms["pos_sim"].item(), pos)
    assert close(out.terms["neg_sim"].item(), neg)
    assert close(losses.nt_xent(z1, z2, temperature=0.5).loss.item(), hand_nt_xent(z1, z2, 0.5)[0])


def test_nt_xent_is_symmetric():
    z1, z2 = randn(6, 5, seed=9), randn(6, 5, seed=10)
    assert close(losses.nt_xent(z1, z2).loss.item(), losses.nt_xent(z2, z1).loss.item())


def positives_closer_than_negatives(n=6, d=8, seed=11):
    """Two views of n well-separated clips: every positive beats every negative."""
    base = torch.linalg.qr(randn(d, d, seed=seed)).Q[:n]  # orthonormal rows
    noise = 0.1 * randn(n, d, seed=seed + 1)
    return base + noise, base - noise


@pytest.mark.parametrize("name", ["nt_xent", "moco_v3_loss"])
def test_lower_temperature_sharpens_when_positives_win(name):
    fn = getattr(losses, name)
    z1, z2 = positives_closer_than_negatives()
    values = [fn(z1, z2, temperature=t).loss.item() for t in (1.0, 0.5, 0.2, 0.1, 0.05)]
    assert all(a > b for a, b in zip(values, values[1:])), values


def fake_gather(parts, rank):
    """Stand-in for an all-gather: the other ranks' rows (normalised) around the local block."""

    def gather(z):
        rows = [F.normalize(p, dim=1) for p in parts]
        rows[rank] = z  # the local block keeps its gradient
        return torch.cat(rows), sum(p.shape[0] for p in parts[:rank])

    return gather


def test_nt_xent_gather_equals_full_batch():
    world, n = 3, 2
    z1, z2 = randn(world * n, 5, seed=12), randn(world * n, 5, seed=13)
    full = losses.nt_xent(z1, z2).loss
    parts1, parts2 = list(z1.split(n)), list(z2.split(n))
    per_rank = []
    for rank in range(world):
        a = parts1[rank].clone().requires_grad_()
        b = parts2[rank].clone()
        gather_1, gather_2 = fake_gather(parts1, rank), fake_gather(parts2, rank)
        calls = iter([gather_1, gather_2])
        out = losses.nt_xent(a, b, gather_fn=lambda z: next(calls)(z))
        out.loss.backward()
        assert a.grad is not None and a.grad.abs().sum() > 0
        per_rank.append(out.loss.item())
    assert close(mean(per_rank), full.item())


# -- MoCo -------------------------------------------------------------------------------------
def test_info_nce_queue_matches_hand_computation():
    q, k, queue = randn(3, 4, seed=14), randn(3, 4, seed=15), randn(5, 4, seed=16)
    tau, total, pos, neg = 0.2, 0.0, [], []
    for qi, ki in zip(q.tolist(), k.tolist()):
        sims = [cos(qi, ki)] + [cos(qi, r) for r in queue.tolist()]
        total -= log_softmax_at([s / tau for s in sims], 0)
        pos.append(sims[0])
        neg += sims[1:]
    out = losses.info_nce_queue(q, k, queue, temperature=tau)
    assert close(out.loss.item(), total / 3)
    assert close(out.terms["pos_sim"].item(), mean(pos))
    assert close(out.terms["neg_sim"].item(), mean(neg))


def test_info_nce_queue_keys_and_queue_get_no_gradient():
    q = randn(4, 6, seed=17).requires_grad_()
    k = randn(4, 6, seed=18).requires_grad_()
    queue = randn(7, 6, seed=19).requires_grad_()
    losses.info_nce_queue(q, k, queue).loss.backward()
    assert k.grad is None and queue.grad is None and q.grad.abs().sum() > 0


def test_info_nce_queue_lower_temperature_sharpens():
    z1, z2 = positives_closer_than_negatives(seed=11)
    queue = torch.linalg.qr(randn(8, 8, seed=11)).Q[6:]  # the basis rows no clip uses
    values = [losses.info_nce_queue(z1, z2, queue, temperature=t).loss.item() for t in (1.0, 0.2, 0.05)]
    pos = losses.info_nce_queue(z1, z2, queue).terms
    assert pos["pos_sim"] > pos["neg_sim"]
    assert values[0] > values[1] > values[2]


def test_moco_v3_matches_hand_computation_with_two_tau_factor():
    q, k, tau = randn(3, 4, seed=22), randn(3, 4, seed=23), 0.2
    ql, kl = q.tolist(), k.tolist()
    ce = -mean([log_softmax_at([cos(ql[i], kj) / tau for kj in kl], i) for i in range(3)])
    out = losses.moco_v3_loss(q, k, temperature=tau)
    assert close(out.loss.item(), 2 * tau * ce)
    assert close(out.terms["pos_sim"].item(), mean([cos(ql[i], kl[i]) for i in range(3)]))
    neg = [cos(ql[i], kl[j]) for i in range(3) for j in range(3) if i != j]
    assert close(out.terms["neg_sim"].item(), mean(neg))


def test_moco_v3_key_gets_no_gradient_and_gather_equals_full_batch():
    world, n = 2, 3
    q, k = randn(world * n, 5, seed=24), randn(world * n, 5, seed=25)
    full = losses.moco_v3_loss(q, k).loss.item()
    q_parts, k_parts = list(q.split(n)), list(k.split(n))
    per_rank = []
    for rank in range(world):
        q_local = q_parts[rank].clone().requires_grad_()
        k_local = k_parts[rank].clone().requires_grad_()
        out = losses.moco_v3_loss(q_local, k_local, gather_fn=fake_gather(k_parts, rank))
        out.loss.backward()
        assert k_local.grad is None and q_local.grad.abs().sum() > 0
        per_rank.append(out.loss.item())
    assert close(mean(per_rank), full)


def test_gather_fn_with_impossible_offset_is_an_error():
    z = randn(4, 3)
    with pytest.raises(ValueError, match="gather_fn"):
        losses.moco_v3_loss(z, z, gather_fn=lambda k: (k, 2))


# -- Barlow Twins -----------------------------------------------------------------------------
def hand_barlow(z1, z2, lambd):
    a, b = z1.tolist(), z2.tolist()
    n, d = len(a), len(a[0])

    def standardise(m):
        cols = []
        for j in range(d):
            c = column(m, j)
            mu, v = mean(c), var(c, unbiased=False)
            cols.append([(x - mu) / math.sqrt(v + 1e-5) for x in c])
        return cols  # cols[j][n]

    sa, sb = standardise(a), standardise(b)
    on = off = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(sa[i][t] * sb[j][t] for t in range(n)) / n
            if i == j:
                on += (1 - c_ij) ** 2
            else:
                off += c_ij ** 2
    return on + lambd * off, on, off


def test_barlow_twins_matches_hand_computation():
    z1, z2 = randn(5, 4, seed=26), randn(5, 4, seed=27)
    loss, on, off = hand_barlow(z1, z2, 5e-3)
    out = losses.barlow_twins_loss(z1, z2)
    assert close(out.loss.item(), loss)
    assert close(out.terms["on_diag"].item(), on)
    assert close(out.terms["off_diag"].item(), off)


def test_barlow_twins_matches_official_batchnorm_formulation():
    z1, z2 = randn(16, 6, seed=28), randn(16, 6, seed=29)
    bn = torch.nn.BatchNorm1d(6, affine=False).train()
    c = bn(z1).T @ bn(z2) / 16
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = (c - torch.diag(torch.diagonal(c))).pow(2).sum()
    assert close(losses.barlow_twins_loss(z1, z2, lambd=0.0051).loss.item(), (on + 0.0051 * off).item())


def test_barlow_twins_is_symmetric_in_value():
    # swapping the views transposes c, which keeps both sums of squares
    z1, z2 = randn(8, 5, seed=30), randn(8, 5, seed=31)
    assert close(losses.barlow_twins_loss(z1, z2).loss.item(), losses.barlow_twins_loss(z2, z1).loss.item())


def test_barlow_twins_decorrelated_standardised_embeddings():
    h = torch.tensor([[1.0]])
    for _ in range(3):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)  # Sylvester Hadamard 8x8
    z = h[:, 1:]  # 7 zero-mean, unit-variance, mutually orthogonal columns
    out = losses.barlow_twins_loss(z, z.clone())
    assert out.terms["off_diag"].item() < 1e-10
    assert out.terms["on_diag"].item() < 1e-8


# -- VICReg -----------------------------------------------------------------------------------
def hand_vicreg(z1, z2, eps=1e-4):
    a, b = z1.tolist(), z2.tolist()
    n, d = len(a), len(a[0])
    inv = sum((x - y) ** 2 for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / (n * d)

    def var_term(m):
        return mean([max(0.0, 1 - math.sqrt(var(column(m, j), unbiased=True) + eps)) for j in range(d)])

    def cov_term(m):
        cols = [column(m, j) for j in range(d)]
        mus = [mean(c) for c in cols]
        s = 0.0
        for i in range(d):
            for j in range(d):
                if i != j:
                    cov = sum((cols[i][t] - mus[i]) * (cols[j][t] - mus[j]) for t in range(n)) / (n - 1)
                    s += cov ** 2
        return s / d

    return inv, (var_term(a) + var_term(b)) / 2, cov_term(a) + cov_term(b)


def test_vicreg_matches_hand_computation():
    z1, z2 = 0.5 * randn(5, 4, seed=32), 0.5 * randn(5, 4, seed=33) + 1.0
    inv, variance, cov = hand_vicreg(z1, z2)
    out = losses.vicreg_loss(z1, z2)
    assert close(out.terms["invariance"].item(), inv)
    assert close(out.terms["variance"].item(), variance)
    assert close(out.terms["covariance"].item(), cov)
    assert close(out.loss.item(), 25 * inv + 25 * variance + cov)


def test_vicreg_symmetric_and_identical_views_have_zero_invariance():
    z1, z2 = randn(8, 6, seed=34), randn(8, 6, seed=35)
    assert close(losses.vicreg_loss(z1, z2).loss.item(), losses.vicreg_loss(z2, z1).loss.item())
    assert losses.vicreg_loss(z1, z1.clone()).terms["invariance"].item() == 0.0


def test_vicreg_collapsed_embeddings_pay_the_full_variance_hinge():
    z = torch.ones(8, 4)
    terms = losses.vicreg_loss(z, z).terms
    assert close(terms["variance"].item(), 1 - math.sqrt(1e-4))
    assert terms["covariance"].item() == 0.0


# -- data2vec targets and regression ----------------------------------------------------------
def hand_instance_norm(x):
    """x: nested list (T, D) of one sample -> normalised over T per channel (biased, eps 1e-5)."""
    t_len, d = len(x), len(x[0])
    out = [[0.0] * d for _ in range(t_len)]
    for j in range(d):
        c = column(x, j)
        mu, v = mean(c), var(c, unbiased=False)
        for t in range(t_len):
            out[t][j] = (c[t] - mu) / math.sqrt(v + 1e-5)
    return out


def test_average_top_k_layers_matches_hand_computation():
    layers = [randn(2, 5, 3, seed=40 + i) for i in range(4)]
    got = losses.average_top_k_layers(layers, k=2)
    for b in range(2):
        normed = [hand_instance_norm(layer[b].tolist()) for layer in layers[-2:]]
        for t in range(5):
            for j in range(3):
                assert close(got[b, t, j].item(), (normed[0][t][j] + normed[1][t][j]) / 2)


def test_average_top_k_layers_without_padding_equals_instance_norm():
    layers = [randn(3, 7, 4, seed=50 + i) for i in range(3)]
    ref = sum(F.instance_norm(t.transpose(1, 2)).transpose(1, 2) for t in layers) / 3
    no_pad = torch.zeros(3, 7, dtype=torch.bool)
    torch.testing.assert_close(losses.average_top_k_layers(layers, k=3), ref)
    torch.testing.assert_close(losses.average_top_k_layers(layers, k=3, padding=no_pad), ref)
    plain = losses.average_top_k_layers(layers, k=2, instance_norm=False)
    torch.testing.assert_close(plain, (layers[1] + layers[2]) / 2)


@pytest.mark.parametrize("final_norm", [None, "layer_norm", "instance_norm"])
def test_average_top_k_layers_padded_equals_each_clip_alone(final_norm):
    lengths, t_max, d = [6, 3, 1], 6, 4
    layers = [randn(3, t_max, d, seed=60 + i) for i in range(3)]
    padding = torch.arange(t_max)[None, :] >= torch.tensor(lengths)[:, None]
    for layer in layers:  # garbage in the padded steps must not leak into the statistics
        layer[padding] = float("nan")
    got = losses.average_top_k_layers(layers, k=2, final_norm=final_norm, padding=padding)
    for b, n in enumerate(lengths):
        alone = losses.average_top_k_layers([t[b:b + 1, :n] for t in layers], k=2, final_norm=final_norm)
        torch.testing.assert_close(got[b:b + 1, :n], alone)
    assert (got[padding] == 0).all()


def test_average_top_k_layers_final_norms():
    layers = [randn(2, 5, 3, seed=70 + i) for i in range(2)]
    avg = losses.average_top_k_layers(layers, k=2)
    ln = losses.average_top_k_layers(layers, k=2, final_norm="layer_norm")
    torch.testing.assert_close(ln, F.layer_norm(avg, (3,)))
    inn = losses.average_top_k_layers(layers, k=2, final_norm="instance_norm")
    torch.testing.assert_close(inn, F.instance_norm(avg.transpose(1, 2)).transpose(1, 2))


def test_average_top_k_layers_bad_arguments_are_errors():
    layers = [randn(2, 5, 3)]
    with pytest.raises(ValueError, match="k=2"):
        losses.average_top_k_layers(layers, k=2)
    with pytest.raises(ValueError, match="final_norm"):
        losses.average_top_k_layers(layers, k=1, final_norm="batch_norm")
    with pytest.raises(ValueError, match="padding"):
        losses.average_top_k_layers(layers, k=1, padding=torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_regression_loss_matches_hand_computation(beta):
    pred, target = randn(2, 3, 4, seed=80), randn(2, 3, 4, seed=81)
    per_token = []
    for pt, tt in zip(pred.reshape(-1, 4).tolist(), target.reshape(-1, 4).tolist()):
        s = 0.0
        for x, y in zip(pt, tt):
            e = abs(x - y)
            if beta == 0:
                s += e * e
            else:
                s += 0.5 * e * e / beta if e < beta else e - 0.5 * beta
        per_token.append(s / math.sqrt(4))
    assert close(losses.regression_loss(pred, target, beta=beta).item(), mean(per_token))


def test_regression_loss_target_gets_no_gradient_and_empty_is_zero():
    pred = randn(5, 8, seed=82).requires_grad_()
    target = randn(5, 8, seed=83).requires_grad_()
    losses.regression_loss(pred, target).backward()
    assert target.grad is None and pred.grad.abs().sum() > 0
    assert losses.regression_loss(torch.zeros(0, 8), torch.zeros(0, 8)).item() == 0.0


# -- float32 under autocast -------------------------------------------------------------------
CASES = {
    "byol_loss": lambda a, b: losses.byol_loss(a, b),
    "negative_cosine": lambda a, b: losses.negative_cosine(a, b),
    "nt_xent": lambda a, b: losses.nt_xent(a, b).loss,
    "info_nce_queue": lambda a, b: losses.info_nce_queue(a, b, b.flip(0)).loss,
    "moco_v3_loss": lambda a, b: losses.moco_v3_loss(a, b).loss,
    "barlow_twins_loss": lambda a, b: losses.barlow_twins_loss(a, b).loss,
    "vicreg_loss": lambda a, b: losses.vicreg_loss(a, b).loss,
    "regression_loss": lambda a, b: losses.regression_loss(a, b),
    "average_top_k_layers": lambda a, b: losses.average_top_k_layers([a[None], b[None]], k=2).sum(),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_under_autocast_and_low_precision_inputs(name):
    a, b = randn(8, 16, seed=90), randn(8, 16, seed=91)
    ref = CASES[name](a, b)
    a16, b16 = a.bfloat16(), b.bfloat16()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = CASES[name](a16, b16)
    assert got.dtype == torch.float32
    # the only difference left is rounding the inputs to bf16
    torch.testing.assert_close(got, CASES[name](a16.float(), b16.float()))
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)


def test_loss_out_unpacks_but_does_not_add():
    out = losses.nt_xent(randn(4, 3), randn(4, 3, seed=1))
    loss, terms = out
    assert loss is out.loss and set(terms) == {"pos_sim", "neg_sim"}
    with pytest.raises(TypeError):
        out + out


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(4, 5\)"):
        losses.byol_loss(randn(4, 3), randn(4, 5))
