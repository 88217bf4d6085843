"""MoCo v2 and v3: each loss against explicit loops on the method's own sub-modules, the
temperature, the v2 queue (FIFO, pointer, normalised detached keys, exact resume through a
checkpoint), v2 shuffle-BN (split-batch groups in one process, the batch shuffle across two gloo
processes), no gradient into the momentum encoders, exact EMA, the v3 presets' official ResNet
variant, and short runs without collapse."""

import copy
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from sslaudio import distributed
from sslaudio.build import build_method, load_preset
from sslaudio.methods.moco import MoCoV3
from sslaudio.train import fit
from tests.conftest import (
    build_tiny,
    first_last,
    free_port,
    gen,
    gloo_worker,
    replay_views,
    run_steps,
    synth_clips,
)

SMALL = ["encoder.d=64", "encoder.base_d=8", "method.proj_hidden=32", "method.proj_dim=16",
         "views[0].memory=8"]
NTT2022 = ["encoder.d=160", "encoder.mlp_hidden=32"]  # tiny/moco-v2 and v3: AudioNTT2022 (d > conv width)
V2 = SMALL + NTT2022 + ["method.queue_size=12"]
V3 = SMALL + NTT2022 + ["method.pred_hidden=32"]
S = 15200  # 0.95 s at 16 kHz


def _method(name, *over):
    return build_tiny(name, *(V2 if name == "moco-v2" else V3), *over)


def _unit(v):
    return v.detach().double() / v.detach().double().norm()


def _ce(logits, label):
    return -(logits[label] - math.log(sum(math.exp(v) for v in logits)))


# -- MoCo v2 ------------------------------------------------------------------------------------
def _replay_v2(ref, audio, seed):
    """The views, then the shuffle-BN permutation, as forward draws them from gen(seed)."""
    g, chain = gen(seed), ref.views.global_chains[0]
    x = ref.features(audio[:, 0])
    v1, v2 = chain(x, g), chain(x, g)
    return v1, v2, torch.randperm(audio.shape[0], generator=g)


def _v2_step(tau, *over, batch=4):
    """One forward of a fresh method plus the same step recomputed by hand on a copy: keys by
    shuffle-BN (tiny preset: the permuted key batch in 2 groups, each group encoded on its own)."""
    m = _method("moco-v2", f"method.temperature={tau}", *over)
    ref = copy.deepcopy(m)
    audio = torch.randn(batch, 1, S) * 0.1
    torch.manual_seed(11)  # dropout draws: query encoder, then key encoder group by group, as forward
    out = m({"audio": audio}, 0, gen(7), 10)
    v1, v2, perm = _replay_v2(ref, audio, 7)
    torch.manual_seed(11)
    q = ref.projector(ref.encoder.pool(ref.encoder(v1)))
    k = torch.empty(batch, 16)
    splits = ref.cfg.shuffle_bn_splits if ref.cfg.shuffle_bn else 1
    with torch.no_grad():
        for idx in perm.tensor_split(splits):
            k[idx] = ref.key_projector(ref.key_encoder.pool(ref.key_encoder(v2[idx])))
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


def _first_bn_inputs(encoder):
    """Record the input of the encoder's first BatchNorm at every call: (list, hook handle)."""
    bn = next(mod for mod in encoder.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm))
    seen = []
    return seen, bn.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))


def _v2_loss(q, k, queue, tau):
    want = 0.0
    for i in range(q.shape[0]):
        qi = _unit(q[i])
        logits = [float(qi @ _unit(k[i])) / tau] + [float(qi @ _unit(row)) / tau for row in queue]
        want += _ce(logits, 0) / q.shape[0]
    return want


def test_v2_shuffle_bn_groups_key_bn_statistics():
    """Shuffle-BN in one process (S = 2, B = 6): the key encoder's first BN runs once per group of
    the permuted batch, over exactly that group's rows (3, never the whole batch), the keys come
    back in batch order, and the loss is the hand computation on those keys."""
    m = _method("moco-v2", "method.temperature=0.2")
    assert m.cfg.shuffle_bn and m.cfg.shuffle_bn_splits == 2  # the tiny preset's setting
    m_copy = copy.deepcopy(m)
    seen, hook = _first_bn_inputs(m.key_encoder)
    audio = torch.randn(6, 1, S) * 0.1
    torch.manual_seed(11)
    out = m({"audio": audio}, 0, gen(7), 10)
    hook.remove()
    v1, v2, perm = _replay_v2(m_copy, audio, 7)
    groups = perm.tensor_split(2)
    assert sorted(torch.cat(groups).tolist()) == list(range(6)) and [len(g) for g in groups] == [3, 3]
    # the key encoder's BN: one call per group, never the whole batch
    assert [x.shape[0] for x in seen] == [3, 3]
    ref_seen, ref_hook = _first_bn_inputs(m_copy.key_encoder)
    torch.manual_seed(11)
    q = m_copy.projector(m_copy.encoder.pool(m_copy.encoder(v1)))
    k = torch.empty(6, 16)
    with torch.no_grad():
        for idx in groups:
            k[idx] = m_copy.key_projector(m_copy.key_encoder.pool(m_copy.key_encoder(v2[idx])))
        whole = m_copy.key_encoder.pool(m_copy.key_encoder(v2))  # the batch statistics without shuffle-BN
    ref_hook.remove()
    for x, y in zip(seen, ref_seen):
        assert torch.allclose(x, y, atol=1e-6)  # exactly the rows of the group, in permuted order
        # its statistics are the group's, not the whole batch's
        assert not torch.allclose(x.mean(dim=(0, 2, 3)), ref_seen[2].mean(dim=(0, 2, 3)), atol=1e-4)
    assert torch.allclose(ref_seen[2][perm], torch.cat(seen), atol=1e-6)
    # keys in batch order: the enqueued keys are the hand keys row by row
    assert torch.allclose(m._new_keys, nn.functional.normalize(k, dim=1), atol=1e-6)
    assert not torch.allclose(k, m_copy.key_projector(whole), atol=1e-4)  # the grouping changed them
    assert out["loss"].item() == pytest.approx(_v2_loss(q, k, m_copy.queue, 0.2), abs=1e-5)


@pytest.mark.parametrize("over", [["method.shuffle_bn=false"], ["method.shuffle_bn_splits=1"]])
def test_v2_shuffle_bn_off_encodes_the_key_batch_whole(over):
    audio = torch.randn(4, 1, S) * 0.1
    m = _method("moco-v2", "method.temperature=0.2", *over)
    ref = copy.deepcopy(m)
    seen, hook = _first_bn_inputs(m.key_encoder)
    torch.manual_seed(11)
    out = m({"audio": audio}, 0, gen(7), 10)
    hook.remove()
    assert [x.shape[0] for x in seen] == [4]  # one BN batch: the previous behaviour
    v1, v2, _ = _replay_v2(ref, audio, 7)
    torch.manual_seed(11)
    q = ref.projector(ref.encoder.pool(ref.encoder(v1)))
    k = ref.key_projector(ref.key_encoder.pool(ref.key_encoder(v2)))
    assert out["loss"].item() == pytest.approx(_v2_loss(q, k, ref.queue, 0.2), abs=1e-5)


def test_v2_shuffle_bn_config_and_small_batch():
    from sslaudio.config import ConfigError
    with pytest.raises(ConfigError, match="shuffle_bn_splits"):
        _method("moco-v2", "method.shuffle_bn_splits=0")
    m = _method("moco-v2", "method.shuffle_bn_splits=3")
    with pytest.raises(ValueError, match="shuffle_bn_splits"):
        m({"audio": torch.randn(2, 1, S) * 0.1}, 0, gen(), 10)
    out = m({"audio": torch.randn(5, 1, S) * 0.1}, 0, gen(), 10)  # groups of 2, 2 and 1 rows
    assert torch.isfinite(out["loss"]) and m._new_keys.shape == (5, 16)


def _no_dropout(m):
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    return m


def _shuffle_worker(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    with gloo_worker(rank, world_size, port):
        m = _no_dropout(_method("moco-v2"))
        m.gather_fn = distributed.gather_rows
        views = torch.randn(8, 64, 96, generator=gen(5))  # the global key batch; this rank has 4 rows
        seen, hook = _first_bn_inputs(m.key_encoder)
        mine, every = m._keys(views[4 * rank:4 * rank + 4], gen(100 + rank))  # generators differ by rank
        hook.remove()
        audio = torch.randn(8, 1, S, generator=gen(6)) * 0.1
        m({"audio": audio[4 * rank:4 * rank + 4]}, 0, gen(200 + rank), 10)
        m.after_step(0, 10)
        torch.save({"mine": mine, "every": every, "bn": seen, "queue": m.queue.clone(),
                    "ptr": int(m.queue_ptr)}, Path(out, f"{rank}.pt"))


def test_v2_shuffle_bn_across_two_processes(tmp_path):
    """The official batch shuffle over 2 gloo processes with different step generators: both
    draw one permutation (rank 0's seed), each encodes its slice of the permuted global batch
    (the only rows its BN sees), and the unshuffled keys are the global batch's in order."""
    mp.spawn(_shuffle_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"{k}.pt") for k in range(2)]
    views = torch.randn(8, 64, 96, generator=gen(5))
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen(100))[0])
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(seed))
    ref = _no_dropout(_method("moco-v2"))
    ref_seen, hook = _first_bn_inputs(ref.key_encoder)
    with torch.no_grad():
        shuffled = torch.cat([ref._encode_keys(views[perm[4 * k:4 * k + 4]]) for k in range(2)])
    hook.remove()
    want = shuffled[torch.argsort(perm)]
    assert not torch.equal(perm, torch.arange(8))
    for k in range(2):
        assert len(r[k]["bn"]) == 1 and torch.allclose(r[k]["bn"][0], ref_seen[k], atol=1e-5)
        assert torch.allclose(r[k]["every"], want, atol=1e-5)
        assert torch.allclose(r[k]["mine"], want[4 * k:4 * k + 4], atol=1e-5)
        assert r[k]["ptr"] == 8  # every process's keys were enqueued
    assert torch.equal(r[0]["queue"], r[1]["queue"])  # the replicas' queues stay identical


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


@pytest.mark.parametrize("preset", ["tiny/moco-v3", "moco-v3"])
def test_v3_presets_build_the_official_resnet_variant(preset):
    """MoCo_ResNet (official moco/builder.py), as our encoder is a CNN: 2-layer projector ending in
    an affine-free BN, 2-layer predictor without the output BN, no output bias, temperature 1.0; the
    Config defaults are the same variant."""
    torch.manual_seed(0)
    m = build_method(load_preset(preset))
    linear = [[x for x in head if isinstance(x, nn.Linear)] for head in (m.projector, m.predictor)]
    assert [len(x) for x in linear] == [2, 2]
    assert linear[0][-1].bias is None and linear[1][-1].bias is None  # hidden ones: cancelled by BN
    assert isinstance(m.projector[-1], nn.BatchNorm1d) and not m.projector[-1].affine
    assert isinstance(m.predictor[-1], nn.Linear)
    assert sum(isinstance(x, nn.BatchNorm1d) for x in m.predictor) == 1  # the hidden layer's only
    assert m.cfg.temperature == 1.0
    default = MoCoV3.Config()
    assert (default.proj_layers, default.pred_last_bn, default.temperature) == (2, False, 1.0)
    assert (m.cfg.proj_layers, m.cfg.pred_last_bn) == (default.proj_layers, default.pred_last_bn)


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
