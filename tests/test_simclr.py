"""SimCLR: the method's loss against an explicit-loop NT-Xent on its own sub-modules, the
temperature, the multi-process gather hook, a training step and a short run without collapse."""

import copy
import math

import pytest
import torch

from sslaudio.config import ConfigError
from tests.conftest import build_tiny, first_last, gen, replay_views, run_steps, synth_batch

SMALL = ["encoder.d=160", "encoder.base_d=8", "encoder.mlp_hidden=64", "method.proj_hidden=32", "method.proj_dim=16",
         "views[0].memory=8"]
S = 15200  # 0.95 s at 16 kHz


def _method(*over):
    return build_tiny("simclr", *SMALL, *over)


def _hand_nt_xent(z1, z2, tau):
    """Explicit loops: anchor a of 2N, positive its partner, every other view but itself below."""
    z = torch.cat([z1, z2]).detach().double()
    n2 = z.shape[0]
    unit = [z[i] / z[i].norm() for i in range(n2)]
    total = 0.0
    for a in range(n2):
        pos = (a + n2 // 2) % n2
        logits = {j: float(unit[a] @ unit[j]) / tau for j in range(n2) if j != a}
        denom = sum(math.exp(v) for v in logits.values())
        total += -(logits[pos] - math.log(denom))
    return total / n2


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_loss_matches_explicit_nt_xent(tau):
    m = _method(f"method.temperature={tau}")
    ref = copy.deepcopy(m)  # same weights and mixup memory, to replay the step
    audio = torch.randn(4, 1, S) * 0.1
    torch.manual_seed(11)  # dropout draws
    out = m({"audio": audio}, 0, gen(7), 10)
    v1, v2 = replay_views(ref, audio, 7)  # data.segments 1: one crop augmented twice
    torch.manual_seed(11)
    z = ref.projector(ref.encoder.pool(ref.encoder(torch.cat([v1, v2]))))
    assert out["loss"].item() == pytest.approx(_hand_nt_xent(z[:4], z[4:], tau), abs=1e-5)
    assert {"pos_sim", "neg_sim", "emb_std"} <= out.keys()


def test_high_temperature_gives_uniform_loss():
    out = _method("method.temperature=1.0e4")({"audio": torch.randn(4, 1, S) * 0.1}, 0, gen(), 10)
    assert out["loss"].item() == pytest.approx(math.log(2 * 4 - 1), abs=1e-3)  # log(2N - 1)


def test_gather_hook_adds_negatives():
    audio = torch.randn(4, 1, S) * 0.1
    losses = []
    for gather in (None, lambda z: (z, 0), lambda z: (torch.cat([z, torch.eye(z.shape[0], z.shape[1])]), 0)):
        m = _method()
        m.gather_fn = gather
        torch.manual_seed(1)
        losses.append(m({"audio": audio}, 0, gen(), 10).get("loss").item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)  # one process: nothing gathered
    assert losses[2] > losses[0]  # more negatives from "other processes"


def test_two_segments_are_the_two_views_and_other_counts_are_refused():
    m = _method("data.segments=2")
    ref = copy.deepcopy(m)
    audio = torch.randn(4, 2, S) * 0.1
    torch.manual_seed(3)
    out = m({"audio": audio}, 0, gen(5), 10)
    rng, chain = gen(5), ref.views.global_chains[0]
    v1, v2 = chain(ref.features(audio[:, 0]), rng), chain(ref.features(audio[:, 1]), rng)  # one per crop
    torch.manual_seed(3)
    z = ref.projector(ref.encoder.pool(ref.encoder(torch.cat([v1, v2]))))
    assert out["loss"].item() == pytest.approx(_hand_nt_xent(z[:4], z[4:], 0.5), abs=1e-5)
    with pytest.raises(ConfigError, match="data.segments"):
        _method("data.segments=3")
    with pytest.raises(ConfigError, match="views"):
        _method("views=[]")


def test_training_step_reaches_every_trainable_parameter():
    m = _method()
    out = m({"audio": torch.randn(4, 1, S) * 0.1}, 0, gen(), 10)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    for name, p in m.named_parameters():
        assert p.requires_grad and p.grad is not None, name


def test_short_run_lowers_the_loss_without_collapse():
    m = _method()
    audio = synth_batch(1, S / 16000)  # 8 clips, one per class
    m.frontend.estimate_stats(audio[:, 0])
    hist = run_steps(m, audio, 30)
    first, last = first_last(hist)
    assert last < first - 0.3, (first, last)
    assert hist[-1]["emb_std"] > 0.1 / math.sqrt(16)  # healthy ~ 1/sqrt(D), collapse -> 0
    assert hist[-1]["pos_sim"] > hist[-1]["neg_sim"]
