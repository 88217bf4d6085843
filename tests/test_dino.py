"""DINO: dino_loss against explicit loops (centre, both temperatures, the i != v pairing), the
method's loss on its own sub-modules, the exact centre and EMA updates, no gradient to the
teacher, the frozen last layer, the schedules, config errors and a short run without collapse."""

import math

import pytest
import torch

from sslaudio.build import load_preset
from sslaudio.config import ConfigError
from sslaudio.methods import losses
from sslaudio.methods.ema import momentum
from tests.conftest import build_tiny, first_last, gen, random_views, run_steps, synth_batch, use_views

SMALL = ["encoder.d=160", "encoder.base_d=8", "encoder.mlp_hidden=32",  # tiny/dino: AudioNTT2022
         "method.hidden_dim=32", "method.bottleneck_dim=16",
         "method.out_dim=32", "views[0].memory=8", "method.crops.local_crops=2",
         "method.crops.local_frames=16", "method.freeze_last_layer=0"]
S = 15200  # 0.95 s at 16 kHz: 96 frames


def _method(*over):
    return build_tiny("dino", *SMALL, *over)


def _hand_dino(student, teacher, center, t_temp, s_temp):
    """Explicit loops over (teacher crop i, student crop v != i, sample n, class k)."""
    V, N, K = student.shape
    G = teacher.shape[0]
    s, t, c = student.double().tolist(), teacher.double().tolist(), center.double().tolist()
    total, pairs = 0.0, 0
    for i in range(G):
        for v in range(V):
            if v == i:
                continue
            pair = 0.0
            for n in range(N):
                te = [math.exp((t[i][n][k] - c[k]) / t_temp) for k in range(K)]
                pt = [e / sum(te) for e in te]
                z = math.log(sum(math.exp(s[v][n][k] / s_temp) for k in range(K)))
                pair += -sum(pt[k] * (s[v][n][k] / s_temp - z) for k in range(K))
            total += pair / N
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("t_temp,s_temp", [(0.04, 0.1), (0.07, 0.2)])
def test_dino_loss_matches_explicit_loops(t_temp, s_temp):
    rng = gen(1)
    student, teacher = torch.randn(4, 3, 5, generator=rng), torch.randn(2, 3, 5, generator=rng)
    center = torch.randn(5, generator=rng) * 0.3
    student.requires_grad_(True)
    loss, terms = losses.dino_loss(student, teacher, center, t_temp, s_temp)
    assert loss.item() == pytest.approx(_hand_dino(student.detach(), teacher, center, t_temp, s_temp), rel=1e-5)
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    pt = torch.softmax((teacher - center) / t_temp, dim=-1)
    assert terms["teacher_entropy"].item() == pytest.approx(-(pt * pt.log()).sum(-1).mean().item(), rel=1e-5)
    mean = pt.reshape(-1, 5).mean(0)
    assert terms["teacher_mean_entropy"].item() == pytest.approx(-(mean * mean.log()).sum().item(), rel=1e-5)


def test_dino_loss_entropy_signals_detect_both_collapses():
    K = 16
    student = torch.randn(3, 4, K)
    uniform = torch.zeros(2, 4, K)  # every teacher output equal: uniform distribution
    _, terms = losses.dino_loss(student, uniform, torch.zeros(K))
    assert terms["teacher_entropy"].item() == pytest.approx(math.log(K), rel=1e-5)
    assert terms["teacher_mean_entropy"].item() == pytest.approx(math.log(K), rel=1e-5)
    one_hot = torch.zeros(2, 4, K)
    one_hot[..., 3] = 10.0  # every sample on the same dimension
    _, terms = losses.dino_loss(student, one_hot, torch.zeros(K))
    assert terms["teacher_entropy"].item() < 1e-3 and terms["teacher_mean_entropy"].item() < 1e-3
    with pytest.raises(ValueError, match="dino_loss"):
        losses.dino_loss(torch.randn(1, 4, K), torch.randn(1, 4, K), torch.zeros(K))


def test_method_loss_center_update_and_teacher_match_hand_computation(monkeypatch):
    m = _method("method.warmup_teacher_temp_steps=10", "method.warmup_teacher_temp=0.04",
                "method.teacher_temp=0.07", "encoder.dropout=0.0")
    m.center.copy_(torch.randn(32) * 0.1)
    views = random_views(m)
    use_views(monkeypatch, views)
    step = 4
    out = m({"audio": torch.zeros(4, 1, 10)}, step, gen(), 10)
    with torch.no_grad():  # student: globals as one batch, locals as another; teacher: globals only
        h = torch.cat([m.encoder.pool(m.encoder(torch.cat(views[:2]))),
                       m.encoder.pool(m.encoder(torch.cat(views[2:])))])
        s = m.head(h).unflatten(0, (4, 4))
        t = m.teacher_head(m.teacher_encoder.pool(m.teacher_encoder(torch.cat(views[:2])))).unflatten(0, (2, 4))
    temp = 0.04 + (0.07 - 0.04) * step / 9  # np.linspace(0.04, 0.07, 10)[4]
    assert out["teacher_temp"].item() == pytest.approx(temp)
    assert out["loss"].item() == pytest.approx(_hand_dino(s, t, m.center, temp, 0.1), rel=1e-5)
    assert out["ema_tau"].item() == pytest.approx(momentum(m.cfg.ema, step, 10))
    assert {"teacher_entropy", "teacher_mean_entropy", "emb_std"} <= out.keys()
    old = m.center.clone()
    m.after_step(step, 100)
    expected = 0.9 * old + 0.1 * t.reshape(8, 32).mean(0)
    assert torch.allclose(m.center, expected, atol=1e-6)
    assert "center" in m.state_dict()  # checkpointed
    m.after_step(step, 100)  # nothing pending: the centre moves once per forward
    assert torch.allclose(m.center, expected, atol=1e-6)


def test_gathered_teacher_mean_feeds_the_center(monkeypatch):
    m = _method("encoder.dropout=0.0")
    views = random_views(m)
    use_views(monkeypatch, views)
    other = torch.full((1, 32), 2.0)  # "another process's" batch mean
    m.gather_fn = lambda rows: (torch.cat([rows, other]), 0)
    m({"audio": torch.zeros(4, 1, 10)}, 0, gen(), 10)
    with torch.no_grad():
        t = m.teacher_head(m.teacher_encoder.pool(m.teacher_encoder(torch.cat(views[:2]))))
    m.after_step(0, 10)
    assert torch.allclose(m.center, 0.1 * (t.mean(0) + other[0]) / 2, atol=1e-6)


def test_teacher_gets_no_gradient_and_ema_is_exact():
    m = _method("method.ema.start=0.996", "method.ema.schedule=cosine")
    assert all(not p.requires_grad for p in [*m.teacher_encoder.parameters(), *m.teacher_head.parameters()])
    assert all(d.p == 0.0 for d in m.teacher_encoder.modules() if isinstance(d, torch.nn.Dropout))
    assert m.inference_encoder() is m.encoder  # tiny preset: eval_teacher false
    opt = torch.optim.AdamW(m.param_groups(0.0), lr=1e-2)
    audio = torch.randn(4, 1, S) * 0.1
    m.frontend.estimate_stats(audio[:, 0])
    out = m({"audio": audio}, 0, gen(), 10)
    out["loss"].backward()
    assert all(p.grad is None for p in [*m.teacher_encoder.parameters(), *m.teacher_head.parameters()])
    assert m.head.last_layer.weight_g.grad is None and not m.head.last_layer.weight_g.requires_grad
    opt.step()
    t_before = [p.clone() for p in [*m.teacher_encoder.parameters(), *m.teacher_head.parameters()]]
    s_after = [p.detach().clone() for p in [*m.encoder.parameters(), *m.head.parameters()]]
    m.after_step(5, 20)
    tau = momentum(m.cfg.ema, 5, 20)
    assert 0.996 < tau < 1.0
    for t0, s1, t1 in zip(t_before, s_after, [*m.teacher_encoder.parameters(), *m.teacher_head.parameters()]):
        assert torch.allclose(t1, tau * t0 + (1 - tau) * s1, atol=1e-7)


def test_eval_teacher_exports_the_teacher(tmp_path):
    from sslaudio.export import export
    from sslaudio.inference import EncoderBundle

    m = _method("method.eval_teacher=true")
    assert m.inference_encoder() is m.teacher_encoder
    m.frontend.estimate_stats(torch.randn(2, S) * 0.1)
    bundle = EncoderBundle(m.frontend, m.inference_encoder(), load_preset("tiny/dino")).eval()
    r = export(bundle, "torchscript", tmp_path / "teacher.pt")  # raises if it disagrees with PyTorch
    assert r["dim"] == 160 and r["max_abs_diff"] < 1e-3  # SMALL: encoder.d 160


def test_last_layer_is_frozen_for_the_first_steps():
    m = _method("method.freeze_last_layer=2")
    opt = torch.optim.AdamW(m.param_groups(0.05), lr=1e-2)
    audio = torch.randn(4, 1, S) * 0.1
    m.frontend.estimate_stats(audio[:, 0])
    last = m.head.last_layer.weight_v
    for step in range(3):
        before, mlp_before = last.detach().clone(), m.head.mlp[0].weight.detach().clone()
        opt.zero_grad(set_to_none=True)
        m({"audio": audio}, step, gen(step), 10)["loss"].backward()
        opt.step()
        assert not torch.equal(m.head.mlp[0].weight, mlp_before)  # the rest of the head trains
        if step < 2:
            assert last.grad is None and torch.equal(last.detach(), before), step
        else:
            assert last.grad is not None and not torch.equal(last.detach(), before)


def test_weight_norm_last_layer_has_unit_rows_and_trainable_gain_when_asked():
    m = _method()
    ll = m.head.last_layer
    ll.weight_v.data.mul_(3.0)
    x = torch.randn(5, 16)
    w = ll.weight_v / ll.weight_v.norm(dim=1, keepdim=True)
    assert torch.allclose(ll(x), x @ w.T, atol=1e-6)  # the gain is 1 and the scale of v is irrelevant
    free = _method("method.norm_last_layer=false").head.last_layer
    assert free.weight_g.requires_grad and torch.equal(free.weight_g, torch.ones(32, 1))


def test_teacher_temperature_schedule():
    m = _method("method.warmup_teacher_temp_steps=4", "method.warmup_teacher_temp=0.04", "method.teacher_temp=0.07")
    assert [round(m.teacher_temp_at(s), 6) for s in range(6)] == [0.04, 0.05, 0.06, 0.07, 0.07, 0.07]
    m = _method("method.warmup_teacher_temp_steps=0", "method.teacher_temp=0.05")
    assert m.teacher_temp_at(0) == 0.05


@pytest.mark.parametrize("over,key", [
    ("method.teacher_temp=0", "method.teacher_temp"),
    ("method.student_temp=-1", "method.student_temp"),
    ("method.out_dim=0", "method.out_dim"),
    ("method.center_momentum=1.5", "method.center_momentum"),
    ("method.freeze_last_layer=-1", "method.freeze_last_layer"),
    ("method.crops.local_frames=200", "local_frames"),
])
def test_config_errors(over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _method(over)


def test_config_needs_two_views():
    with pytest.raises(ConfigError, match="2 views"):
        _method("method.crops.global_crops=1", "method.crops.local_crops=0")


def test_short_run_lowers_the_loss_without_collapse():
    # a constant teacher temperature, so that the loss of the first and the last steps compare
    m = _method("method.warmup_teacher_temp_steps=0", "method.teacher_temp=0.04")
    audio = synth_batch(1, S / 16000)  # 8 clips, one per class
    m.frontend.estimate_stats(audio[:, 0])
    hist = run_steps(m, audio, 40)
    first, last = first_last(hist)
    assert last < first - 0.3, (first, last)
    end = hist[-1]
    # neither collapse: not uniform (per-sample entropy well below log K) and not one dimension for
    # every clip (the batch-mean distribution is much wider than each sample's)
    assert 0.05 < end["teacher_entropy"] < math.log(32) - 1.0, end
    assert end["teacher_mean_entropy"] > end["teacher_entropy"] + 1.0, end
    assert end["emb_std"] > 0.1 / math.sqrt(16), end


def test_teacher_keeps_its_own_batchnorm_statistics():
    """Official main_dino.py: the EMA loops over `zip(student.module.parameters(),
    teacher_without_ddp.parameters())` only; the teacher (in train mode, as the student) updates its
    BatchNorm running statistics from its own forwards on the global views and never takes the
    student's, which also saw the local crops. The evaluated teacher must carry those statistics."""
    m = _method("method.eval_teacher=true").train()
    t_bns = [b for b in m.teacher_encoder.modules() if isinstance(b, torch.nn.modules.batchnorm._BatchNorm)]
    s_bns = [b for b in m.encoder.modules() if isinstance(b, torch.nn.modules.batchnorm._BatchNorm)]
    assert t_bns and len(t_bns) == len(s_bns)
    audio = torch.randn(4, 1, S) * 0.1
    m.frontend.estimate_stats(audio[:, 0])
    inputs = []
    hook = t_bns[0].register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach().clone()))
    for step in range(2):
        mean0 = t_bns[0].running_mean.clone()
        m({"audio": audio}, step, gen(step), 10)
        x = inputs[-1]  # the teacher's first BN input: the 2 global views, B rows each
        assert x.shape[0] == 2 * 4
        dims = [d for d in range(x.dim()) if d != 1]
        assert torch.allclose(t_bns[0].running_mean, 0.9 * mean0 + 0.1 * x.mean(dims), atol=1e-6)
        t_buf = [b.clone() for bn in t_bns for b in (bn.running_mean, bn.running_var)]
        s_buf = [b.clone() for bn in s_bns for b in (bn.running_mean, bn.running_var)]
        m.after_step(step, 10)
        after = [b for bn in t_bns for b in (bn.running_mean, bn.running_var)]
        assert all(torch.equal(a, b) for a, b in zip(after, t_buf))  # the EMA left them alone
        assert not all(torch.allclose(a, b) for a, b in zip(after, s_buf))  # not the student's
    hook.remove()
    assert int(t_bns[0].num_batches_tracked) == 2  # one teacher pass (the globals) per step
    assert int(s_bns[0].num_batches_tracked) == 4  # globals and locals per step
    assert m.inference_encoder() is m.teacher_encoder
