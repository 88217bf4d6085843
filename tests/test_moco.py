"""MoCo v2 and v3: each loss against explicit loops on the method's own sub-modules, the
temperature, the v2 queue (FIFO, pointer, normalised detached keys, exact resume through a
checkpoint), no gradient into the momentum encoders, exact EMA, and short runs without collapse."""

import copy
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sslaudio.build import load_preset
from sslaudio.train import fit
from tests.conftest import build_tiny, first_last, gen, replay_views, run_steps, synth_clips

SMALL = ["encoder.d=64", "encoder.base_d=8", "method.proj_hidden=32", "method.proj_dim=16",
         "views[0].memory=8"]
V2 = SMALL + ["method.queue_size=12"]
V3 = SMALL + ["method.pred_hidden=32"]
S = 15200  # 0.95 s at 16 kHz


def _method(name, *over):
    return build_tiny(name, *(V2 if name == "moco-v2" else V3), *over)


def _unit(v):
    return v.detach().double() / v.detach().double().norm()


def _ce(logits, label):
    return -(logits[label] - math.log(sum(math.exp(v) for v in logits)))


# -- MoCo v2 ------------------------------------------------------------------------------------
def _v2_step(tau):
    """One forward of a fresh method plus the same step recomputed by hand on a copy."""
    m = _method("moco-v2", f"method.temperature={tau}")
    ref = copy.deepcopy(m)
    audio = torch.randn(4, 1, S) * 0.1
    torch.manual_seed(11)  # dropout draws: query encoder, then key encoder, as in forward
    out = m({"audio": audio}, 0, gen(7), 10)
    v1, v2 = replay_views(ref, audio, 7)
    torch.manual_seed(11)
    q = ref.projector(ref.encoder.pool(ref.encoder(v1)))
    k = ref.key_projector(ref.key_encoder.pool(ref.key_encoder(v2)))
    return m, ref, out, q, k


@pytest.mark.parametrize("tau", [0.07, 0.2])
def test_v2_loss_matches_explicit_logits(tau):
    m, ref, out, q, k = _v2_step(tau)
    queue = ref.queue
    want = 0.0
    for i in range(4):
        qi = _unit(q[i])
        logits = [float(qi @ _unit(k[i])) / tau] + [float(qi @ _unit(queue[j])) / tau for j in range(12)]
        want += _ce(logits, 0) / 4
    assert out["loss"].item() == pytest.approx(want, abs=1e-5)
    assert {"pos_sim", "neg_sim", "emb_std"} <= out.keys()


def test_v2_high_temperature_gives_uniform_loss():
    _, _, out, _, _ = _v2_step(1.0e4)
    assert out["loss"].item() == pytest.approx(math.log(1 + 12), abs=1e-3)  # log(1 + K)


def test_v2_queue_fifo_pointer_and_keys():
    m, ref, out, q, k = _v2_step(0.2)
    assert int(m.queue_ptr) == 0 and torch.equal(m.queue, ref.queue)  # forward leaves the queue alone
    out["loss"].backward()
    m.after_step(0, 10)
    # this step's keys (computed before the EMA update), L2-normalised, sit at the old pointer
    assert torch.allclose(m.queue[:4], torch.nn.functional.normalize(k.detach(), dim=1), atol=1e-6)
    assert torch.allclose(m.queue.norm(dim=1), torch.ones(12), atol=1e-6)
    assert torch.equal(m.queue[4:], ref.queue[4:]) and int(m.queue_ptr) == 4
    assert not m.queue.requires_grad and m.queue.grad_fn is None
    # pointer advances modulo K: three more batches of 4 wrap a queue of 12 around to 4
    for step in range(1, 4):
        m({"audio": torch.randn(4, 1, S) * 0.1}, step, gen(step), 10)
        newest = m._new_keys.clone()
        ptr = int(m.queue_ptr)
        m.after_step(step, 10)
        assert torch.allclose(m.queue[ptr:ptr + 4], newest, atol=1e-6) and int(m.queue_ptr) == (ptr + 4) % 12
    assert int(m.queue_ptr) == 4


def test_v2_enqueue_wraps_a_batch_that_does_not_divide_k():
    m = _method("moco-v2", "method.queue_size=6")
    m.queue_ptr.fill_(4)
    keys = torch.randn(4, 16)
    m.enqueue(keys)
    unit = torch.nn.functional.normalize(keys, dim=1)
    assert torch.allclose(m.queue[[4, 5, 0, 1]], unit, atol=1e-6) and int(m.queue_ptr) == 2


def test_v2_no_gradient_to_key_encoder_and_exact_ema():
    m, ref, out, _, _ = _v2_step(0.2)
    out["loss"].backward()
    keys = list(m.key_encoder.parameters()) + list(m.key_projector.parameters())
    assert all(p.grad is None and not p.requires_grad for p in keys)
    assert all(p.grad is not None for p in list(m.encoder.parameters()) + list(m.projector.parameters()))
    before = [p.clone() for p in keys]
    with torch.no_grad():
        for p in list(m.encoder.parameters()) + list(m.projector.parameters()):
            p.add_(0.1)
    m.after_step(0, 10)
    online = list(m.encoder.parameters()) + list(m.projector.parameters())
    for b, t, s in zip(before, keys, online):
        assert torch.allclose(t, 0.99 * b + 0.01 * s, atol=1e-6)  # tiny preset: m = 0.99, constant


def test_v2_symmetric_option():
    m = _method("moco-v2", "method.symmetric=true")
    out = m({"audio": torch.randn(4, 1, S) * 0.1}, 0, gen(), 10)
    assert torch.isfinite(out["loss"]) and m._new_keys.shape == (8, 16)
    m.after_step(0, 10)
    assert int(m.queue_ptr) == 8


def test_v2_queue_survives_checkpoint_round_trip(audio_dir, tmp_path):
    preset = load_preset("tiny/moco-v2", V2 + ["train.steps=4", "train.ckpt_every=2", "train.batch_size=4",
                                               "train.log_every=1", "data.num_workers=0", "data.norm_samples=8",
                                               "train.keep_last=5"])
    a, b = tmp_path / "a", tmp_path / "b"
    fit(preset, [str(audio_dir)], a)
    fit(preset, [str(audio_dir)], b)
    shutil.rmtree(b / "ckpt" / "step-000000004")  # as if stopped after step 2
    assert fit(preset, [str(audio_dir)], b, resume=True)["start_step"] == 2
    wa = load_file(str(a / "ckpt" / "step-000000004" / "model.safetensors"))
    wb = load_file(str(b / "ckpt" / "step-000000004" / "model.safetensors"))
    assert {"queue", "queue_ptr"} <= wa.keys() and wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert int(wa["queue_ptr"]) == (4 * 4) % 12


# -- MoCo v3 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_v3_loss_matches_explicit_logits(tau):
    m = _method("moco-v3", f"method.temperature={tau}")
    ref = copy.deepcopy(m)
    audio = torch.randn(4, 1, S) * 0.1
    torch.manual_seed(11)
    out = m({"audio": audio}, 0, gen(7), 10)
    v1, v2 = replay_views(ref, audio, 7)
    torch.manual_seed(11)  # same order as forward: online v1, online v2, momentum v1, momentum v2
    q1 = ref.predictor(ref.projector(ref.encoder.pool(ref.encoder(v1))))
    q2 = ref.predictor(ref.projector(ref.encoder.pool(ref.encoder(v2))))
    k1 = ref.momentum_projector(ref.momentum_encoder.pool(ref.momentum_encoder(v1)))
    k2 = ref.momentum_projector(ref.momentum_encoder.pool(ref.momentum_encoder(v2)))
    want = 0.0
    for q, k in ((q1, k2), (q2, k1)):
        for i in range(4):
            logits = [float(_unit(q[i]) @ _unit(k[j])) / tau for j in range(4)]
            want += 2 * tau * _ce(logits, i) / 4
    assert out["loss"].item() == pytest.approx(want, abs=1e-5)
    assert {"pos_sim", "neg_sim", "emb_std"} <= out.keys()


def test_v3_gather_hook_adds_keys():
    audio = torch.randn(4, 1, S) * 0.1
    losses = []
    for gather in (None, lambda k: (k, 0), lambda k: (torch.cat([torch.eye(4, 16), k]), 4)):
        m = _method("moco-v3", "method.temperature=0.2")
        m.gather_fn = gather
        torch.manual_seed(1)
        losses.append(m({"audio": audio}, 0, gen(), 10).get("loss").item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6) and losses[2] > losses[0]


def test_v3_no_gradient_to_momentum_encoder_and_cosine_ema():
    m = _method("moco-v3")
    out = m({"audio": torch.randn(4, 1, S) * 0.1}, 0, gen(), 10)
    out["loss"].backward()
    mom = list(m.momentum_encoder.parameters()) + list(m.momentum_projector.parameters())
    online = list(m.encoder.parameters()) + list(m.projector.parameters())
    assert all(p.grad is None and not p.requires_grad for p in mom)
    assert all(p.grad is not None for p in online + list(m.predictor.parameters()))
    before = [p.clone() for p in mom]
    with torch.no_grad():
        for p in online:
            p.add_(0.1)
    m.after_step(2, 10)  # the update before iteration 3: official adjust_moco_momentum at 3/10
    tau = 1 - 0.5 * (1 + math.cos(math.pi * 3 / 10)) * (1 - 0.99)
    for b, t, s in zip(before, mom, online):
        assert torch.allclose(t, tau * b + (1 - tau) * s, atol=1e-6)


# -- short runs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["moco-v2", "moco-v3"])
def test_short_run_lowers_the_loss_without_collapse(name):
    audio = synth_clips(8, S / 16000, seed=100)[:, None]  # (8, 1, S), one clip per class
    m = _method(name, "method.temperature=0.2")
    m.frontend.estimate_stats(audio[:, 0])
    hist = run_steps(m, audio, 30)
    # from step 2 on, the v2 queue (12) holds only real keys: its random initial rows make the
    # first losses artificially low
    first, last = first_last(hist, start=2)
    assert last < first - 0.2, (first, last)
    assert hist[-1]["emb_std"] > 0.1 / math.sqrt(16)  # healthy ~ 1/sqrt(D), collapse -> 0
    assert hist[-1]["pos_sim"] > hist[-1]["neg_sim"]
