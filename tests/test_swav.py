"""SwAV: Sinkhorn against the official algorithm written as explicit loops and its marginals,
swav_loss against explicit loops (with and without a queue), the method's loss on its own
sub-modules, normalised prototypes, frozen prototypes, the FIFO queue and when it is used, config
errors and a short run without collapse."""

import math

import pytest
import torch
import torch.nn.functional as F

from sslaudio.config import ConfigError
from sslaudio.methods import losses
from tests.conftest import build_tiny, first_last, gen, random_views, run_steps, synth_batch, use_views

SMALL = ["encoder.d=160", "encoder.base_d=8", "encoder.mlp_hidden=32",  # tiny/swav: AudioNTT2022
         "method.proj_hidden=32", "method.proj_dim=16", "method.prototypes=24", "views[0].memory=8", "method.crops.local_crops=2",
         "method.crops.local_frames=16", "method.freeze_prototypes_steps=0", "method.queue_length=0"]
S = 15200  # 0.95 s at 16 kHz: 96 frames


def _method(*over):
    return build_tiny("swav", *SMALL, *over)


def _hand_sinkhorn(scores, eps, iters):
    """Official distributed_sinkhorn (one process), element by element: Q = exp(out / eps)^T (K x B),
    Q /= sum, then per iteration rows to 1/K and columns to 1/B, finally Q *= B, transposed."""
    B, K = len(scores), len(scores[0])
    Q = [[math.exp(scores[b][k] / eps) for b in range(B)] for k in range(K)]
    total = sum(sum(r) for r in Q)
    Q = [[x / total for x in r] for r in Q]
    for _ in range(iters):
        for k in range(K):
            rs = sum(Q[k])
            Q[k] = [x / rs / K for x in Q[k]]
        for b in range(B):
            cs = sum(Q[k][b] for k in range(K))
            for k in range(K):
                Q[k][b] = Q[k][b] / cs / B
    return [[Q[k][b] * B for k in range(K)] for b in range(B)]


@pytest.mark.parametrize("iters", [0, 1, 3])
def test_sinkhorn_matches_the_official_algorithm(iters):
    scores = torch.randn(5, 4, generator=gen(1)).clamp(-1, 1)
    q = losses.sinkhorn(scores, 0.05, iters)
    ref = torch.tensor(_hand_sinkhorn(scores.double().tolist(), 0.05, iters), dtype=torch.float32)
    assert torch.allclose(q, ref, rtol=1e-4, atol=1e-6)


def test_sinkhorn_marginals():
    scores = torch.randn(12, 6, generator=gen(2)).clamp(-1, 1)
    q = losses.sinkhorn(scores, 0.05, 3)
    assert torch.allclose(q.sum(1), torch.ones(12), atol=1e-5)  # every sample's codes sum to 1
    assert (q >= 0).all()
    # prototype loads tend to B/K: closer after more iterations, exact in the limit
    err3 = (q.sum(0) - 12 / 6).abs().max()
    q_many = losses.sinkhorn(scores, 0.05, 200)
    assert torch.allclose(q_many.sum(0), torch.full((6,), 2.0), atol=1e-3)
    assert (q_many.sum(0) - 2.0).abs().max() < err3
    # one very strong prototype cannot take every sample: equipartition spreads them
    skewed = torch.zeros(12, 6)
    skewed[:, 0] = 1.0
    assert losses.sinkhorn(skewed, 0.05, 3).sum(0).max() < 12 * 0.5
    # far outside [-1, 1] the log-domain iterations still give finite codes
    assert torch.isfinite(losses.sinkhorn(torch.randn(8, 5) * 100, 0.05, 3)).all()


def test_sinkhorn_gather_hook_normalises_over_every_process():
    local, other = torch.randn(4, 6, generator=gen(3)), torch.randn(4, 6, generator=gen(4))
    joint = losses.sinkhorn(torch.cat([other, local]), 0.05, 3)
    q = losses.sinkhorn(local, 0.05, 3, gather_fn=lambda rows: (torch.cat([other, rows]), 4))
    assert torch.allclose(q, joint[4:], atol=1e-6)


def _hand_swav(scores, assign, temp, eps, iters, queue=None):
    """Explicit loops: for assigned crop i, codes from its (queue +) batch scores; every other crop
    v predicts them with softmax(scores_v / temp)."""
    V, N, K = scores.shape
    s = scores.double().tolist()
    total = 0.0
    for a, i in enumerate(assign):
        rows = (queue[a].double().tolist() if queue is not None else []) + s[i]
        q = _hand_sinkhorn(rows, eps, iters)[-N:]
        sub = 0.0
        for v in range(V):
            if v == i:
                continue
            ce = 0.0
            for n in range(N):
                z = math.log(sum(math.exp(s[v][n][k] / temp) for k in range(K)))
                ce += -sum(q[n][k] * (s[v][n][k] / temp - z) for k in range(K))
            sub += ce / N
        total += sub / (V - 1)
    return total / len(assign)


@pytest.mark.parametrize("with_queue", [False, True])
def test_swav_loss_matches_explicit_loops(with_queue):
    rng = gen(5)
    scores = torch.randn(4, 3, 5, generator=rng).clamp(-1, 1).requires_grad_(True)
    queue = torch.randn(2, 6, 5, generator=rng).clamp(-1, 1) if with_queue else None
    loss, terms = losses.swav_loss(scores, [0, 1], 0.1, 0.05, 3, queue)
    assert loss.item() == pytest.approx(_hand_swav(scores.detach(), [0, 1], 0.1, 0.05, 3, queue), rel=1e-5)
    loss.backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()
    assert {"q_entropy", "q_mean_entropy"} == set(terms)
    q0 = losses.sinkhorn(scores[0] if queue is None else torch.cat([queue[0], scores[0]]), 0.05, 3)[-3:]
    q1 = losses.sinkhorn(scores[1] if queue is None else torch.cat([queue[1], scores[1]]), 0.05, 3)[-3:]
    ent = lambda p: -(p * p.log()).sum(-1)
    assert terms["q_entropy"].item() == pytest.approx(((ent(q0).mean() + ent(q1).mean()) / 2).item(), rel=1e-5)
    assert terms["q_mean_entropy"].item() == pytest.approx(((ent(q0.mean(0)) + ent(q1.mean(0))) / 2).item(),
                                                           rel=1e-5)
    with pytest.raises(ValueError, match="crops_for_assign"):
        losses.swav_loss(scores.detach(), [0, 4])


def _scores(m, views):
    with torch.no_grad():
        h = torch.cat([m.encoder.pool(m.encoder(torch.cat(views[:2]))),
                       m.encoder.pool(m.encoder(torch.cat(views[2:])))])
        z = F.normalize(m.projector(h), dim=1)
        return z, (z @ m.prototypes.weight.T).unflatten(0, (len(views), views[0].shape[0]))


def test_method_loss_matches_hand_computation_and_prototypes_are_normalised(monkeypatch):
    m = _method("encoder.dropout=0.0")
    m.prototypes.weight.data.mul_(5.0)
    views = random_views(m)
    use_views(monkeypatch, views)
    out = m({"audio": torch.zeros(4, 1, 10)}, 0, gen(), 10)
    assert torch.allclose(m.prototypes.weight.norm(dim=1), torch.ones(24), atol=1e-6)
    _, scores = _scores(m, views)
    assert out["loss"].item() == pytest.approx(_hand_swav(scores, [0, 1], 0.1, 0.05, 3), rel=1e-5)
    assert {"q_entropy", "q_mean_entropy", "emb_std", "queue_used"} <= out.keys()
    assert out["queue_used"].item() == 0.0


def test_prototypes_are_frozen_for_the_first_steps():
    m = _method("method.freeze_prototypes_steps=2")
    opt = torch.optim.AdamW(m.param_groups(0.05), lr=1e-2)
    audio = torch.randn(4, 1, S) * 0.1
    m.frontend.estimate_stats(audio[:, 0])
    w = m.prototypes.weight
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        loss = m({"audio": audio}, step, gen(step), 10)["loss"]  # normalises the prototypes first
        before, proj_before = w.detach().clone(), m.projector[0].weight.detach().clone()
        loss.backward()
        opt.step()
        assert not torch.equal(m.projector[0].weight, proj_before)  # the head trains
        if step < 2:
            assert w.grad is None and torch.equal(w.detach(), before), step
        else:
            assert w.grad is not None and not torch.equal(w.detach(), before)


def test_queue_fills_fifo_from_its_start_step_and_is_used_once_full(monkeypatch):
    m = _method("encoder.dropout=0.0", "method.queue_length=8", "method.queue_start_step=2")
    views = random_views(m)
    use_views(monkeypatch, views)
    audio = torch.zeros(4, 1, 10)
    assert m.queue.shape == (2, 8, 16) and "queue" in m.state_dict() and "queue_count" in m.state_dict()
    for step in (0, 1):  # before queue_start_step: neither filled nor used
        out = m({"audio": audio}, step, gen(), 10)
        m.after_step(step, 10)
        assert out["queue_used"].item() == 0.0 and int(m.queue_count) == 0 and not m.queue.any()
    z2, _ = _scores(m, views)
    out = m({"audio": audio}, 2, gen(), 10)
    m.after_step(2, 10)
    assert out["queue_used"].item() == 0.0 and int(m.queue_count) == 4  # half full: not used yet
    assert torch.allclose(m.queue[0, :4], z2[:4], atol=1e-6) and torch.allclose(m.queue[1, :4], z2[4:8], atol=1e-6)
    assert not m.queue[:, 4:].any()
    views[0].add_(0.5)  # new rows for the next step
    views[1].add_(0.5)
    z3, _ = _scores(m, views)
    out = m({"audio": audio}, 3, gen(), 10)
    m.after_step(3, 10)
    assert out["queue_used"].item() == 0.0 and int(m.queue_count) == 8
    # newest rows first, the older ones pushed back (official queue[i, bs:] = queue[i, :-bs])
    assert torch.allclose(m.queue[0], torch.cat([z3[:4], z2[:4]]), atol=1e-6)
    assert torch.allclose(m.queue[1], torch.cat([z3[4:8], z2[4:8]]), atol=1e-6)
    queue = m.queue.clone()
    z4, scores = _scores(m, views)
    out = m({"audio": audio}, 4, gen(), 10)
    assert out["queue_used"].item() == 1.0  # full: its scores join Sinkhorn
    queue_scores = queue @ m.prototypes.weight.detach().T
    assert out["loss"].item() == pytest.approx(_hand_swav(scores, [0, 1], 0.1, 0.05, 3, queue_scores), rel=1e-5)
    m.after_step(4, 10)
    assert torch.allclose(m.queue[0], torch.cat([z4[:4], z3[:4]]), atol=1e-6)  # the oldest fell off
    assert int(m.queue_count) == 8


@pytest.mark.parametrize("over,key", [
    ("method.temperature=0", "method.temperature"),
    ("method.epsilon=-1", "method.epsilon"),
    ("method.prototypes=0", "method.prototypes"),
    ("method.queue_length=-1", "method.queue_length"),
    ("method.crops_for_assign=[0, 6]", "method.crops_for_assign"),
    ("method.crops_for_assign=[]", "method.crops_for_assign"),
])
def test_config_errors(over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _method(over)


def test_short_run_lowers_the_loss_without_collapse():
    m = _method()
    audio = synth_batch(2, S / 16000)  # 16 clips, two per class
    m.frontend.estimate_stats(audio[:, 0])
    hist = run_steps(m, audio, 30)
    first, last = first_last(hist)
    assert last < first - 0.2, (first, last)
    end = hist[-1]
    # the batch's codes stay spread over the prototypes (equipartition), the embeddings too
    assert end["q_mean_entropy"] > math.log(24) - 0.3, end
    assert end["emb_std"] > 0.1 / math.sqrt(16), end
