"""The Gumbel product quantizer shared by wav2vec 2.0 and NPC, against direct computations."""

from __future__ import annotations

import math

import pytest
import torch

from sslaudio.config import ConfigError
from sslaudio.methods.quantizer import GumbelQuantizer, gumbel_temperature
from tests.conftest import gen


def test_temperature_schedule_is_fairseqs():
    assert gumbel_temperature(0, 2.0, 0.5, 0.999995) == 2.0
    assert gumbel_temperature(1000, 2.0, 0.5, 0.999995) == pytest.approx(2.0 * 0.999995 ** 1000)
    assert gumbel_temperature(10**7, 2.0, 0.5, 0.999995) == 0.5


def test_eval_codes_and_perplexities_by_hand():
    q = GumbelQuantizer(in_dim=3, groups=2, entries=3, code_dim=4).eval()
    x = torch.randn(5, 3, generator=gen(0))
    out = q(x, tau=2.0)
    W, b, C = q.weight.detach(), q.bias.detach(), q.codebook.detach()
    ppl_soft, ppl_hard = 0.0, 0.0
    for g in range(2):
        logits = [[sum(W[g, v, i].item() * x[n, i].item() for i in range(3)) + b[g, v].item()
                   for v in range(3)] for n in range(5)]
        for n in range(5):
            best = max(range(3), key=lambda v: logits[n][v])
            assert out.indices[n, g].item() == best
            assert torch.allclose(out.codes[n, 2 * g:2 * g + 2], C[g, best], atol=1e-6)
        probs = [[math.exp(v) / sum(math.exp(w) for w in row) for v in row] for row in logits]
        avg = [sum(p[v] for p in probs) / 5 for v in range(3)]
        ppl_soft += math.exp(-sum(p * math.log(p + 1e-7) for p in avg))
        counts = [sum(1 for row in logits if max(range(3), key=lambda v: row[v]) == k) / 5 for k in range(3)]
        ppl_hard += math.exp(-sum(p * math.log(p + 1e-7) for p in counts))
    assert out.prob_perplexity.item() == pytest.approx(ppl_soft, rel=1e-5)
    assert out.code_perplexity.item() == pytest.approx(ppl_hard, rel=1e-5)
    assert out.diversity.item() == pytest.approx((6 - ppl_soft) / 6, rel=1e-5)


def test_split_input_reads_only_its_slice():
    q = GumbelQuantizer(in_dim=8, groups=4, entries=5, code_dim=8, split_input=True, init="torch").eval()
    x = torch.randn(6, 8, generator=gen(1))
    logits = q.logits(x)
    for g in range(4):
        ref = x[:, 2 * g:2 * g + 2] @ q.weight[g].t() + q.bias[g]
        assert torch.allclose(logits[:, g], ref, atol=1e-6)
    y = x.clone()
    y[:, :2] += 10.0  # group 0's slice only
    assert torch.equal(q(x, 1.0).indices[:, 1:], q(y, 1.0).indices[:, 1:])


def test_training_is_straight_through_and_reproducible():
    q = GumbelQuantizer(in_dim=4, groups=2, entries=8, code_dim=6).train()
    x = torch.randn(32, 4, generator=gen(2), requires_grad=True)
    a = q(x, 2.0, gen(3))
    b = q(x, 2.0, gen(3))
    assert torch.equal(a.codes, b.codes)
    # forward values are exactly codewords (hard choice)
    for n in range(4):
        for g in range(2):
            assert torch.allclose(a.codes[n, 3 * g:3 * g + 3], q.codebook[g, a.indices[n, g]], atol=1e-6)
    (a.codes.square().sum() + a.diversity).backward()
    assert q.weight.grad.abs().sum() > 0 and q.codebook.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_bad_shapes_are_config_errors():
    with pytest.raises(ConfigError):
        GumbelQuantizer(in_dim=4, groups=3, entries=8, code_dim=8)
    with pytest.raises(ConfigError):
        GumbelQuantizer(in_dim=6, groups=4, entries=8, code_dim=8, split_input=True)
