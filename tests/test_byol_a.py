import math

import torch

from sslaudio.augment import Mixup, RandomLinearFader, RandomResizeCrop
from sslaudio.methods.ema import EMAConfig, momentum
from tests.conftest import build_tiny, gen, replay_views


def test_mixup_formula_and_memory():
    m = Mixup(Mixup.Config(ratio=0.4, memory=4), shape=(3, 5))
    x1 = torch.randn(2, 3, 5)
    assert torch.equal(m(x1, gen(0)), x1)  # empty memory: nothing to mix with
    assert int(m.filled) == 2 and torch.equal(m.bank[:2], x1)
    x2 = torch.randn(2, 3, 5)
    rng = gen(1)
    out = m(x2, rng)
    # replay the same draws: alpha ~ U(0, ratio), then the memory index
    r = gen(1)
    alpha = 0.4 * torch.rand(2, generator=r)
    idx = torch.randint(0, 2, (2,), generator=r)
    for i in range(2):
        z = x1[idx[i]]
        want = torch.log((1 - alpha[i]) * x2[i].exp() + alpha[i] * z.exp() + torch.finfo(torch.float32).eps)
        assert torch.allclose(out[i], want, atol=1e-6)
    assert 0 <= float(alpha.max()) <= 0.4
    m(torch.randn(3, 3, 5), gen(2))  # FIFO wraps around
    assert int(m.filled) == 4 and int(m.ptr) == (2 + 2 + 3) % 4


def test_rrc_identity_and_range():
    x = torch.randn(4, 8, 12)
    ident = RandomResizeCrop(RandomResizeCrop.Config(virtual_crop=(1.0, 1.0), freq_scale=(1.0, 1.0),
                                                     time_scale=(1.0, 1.0)), (8, 12))
    assert torch.allclose(ident(x, gen()), x, atol=1e-5)
    rrc = RandomResizeCrop(RandomResizeCrop.Config(), (8, 12))
    y = rrc(x, gen())
    assert y.shape == x.shape and not torch.allclose(y, x)
    assert torch.equal(rrc(x, gen(5)), rrc(x, gen(5)))


def test_linear_fader_adds_a_line():
    x = torch.zeros(3, 4, 10)
    y = RandomLinearFader(RandomLinearFader.Config(gain=1.0), (4, 10))(x, gen())
    d = y[:, 0, 1:] - y[:, 0, :-1]
    assert torch.allclose(d, d[:, :1].expand_as(d), atol=1e-6) and float(y.abs().max()) <= 1.0
    assert torch.equal(y[:, 0], y[:, 3])


def _method():
    return build_tiny("byol-a", "encoder.d=64", "encoder.base_d=8", "method.proj_hidden=32", "method.proj_dim=16",
                      "views[0].memory=8")


def test_byol_a_loss_matches_hand_computation():
    m = _method()
    audio = torch.randn(4, 1, 15200) * 0.1
    torch.manual_seed(11)  # dropout draws
    out = m({"audio": audio}, 0, gen(7), 10)
    # recompute as the official train.py / byol_pytorch.diff: the two views (the preset's `views`
    # chain, applied once per view) standardised together (NormalizeBatch over all 2B views), then
    # each view its own forward pass through the online and the target networks; 2 - 2 cos both ways
    m2 = _method()
    v = torch.cat(replay_views(m2, audio, 7))
    v = (v - v.mean()) / v.std()
    v1, v2 = v[:4], v[4:]
    torch.manual_seed(11)
    z1 = m2.projector(m2.encoder.pool(m2.encoder(v1)))
    z2 = m2.projector(m2.encoder.pool(m2.encoder(v2)))
    p1, p2 = m2.predictor(z1), m2.predictor(z2)
    t1 = m2.target_projector(m2.target_encoder.pool(m2.target_encoder(v1))).detach()
    t2 = m2.target_projector(m2.target_encoder.pool(m2.target_encoder(v2))).detach()
    want = 0.0
    for a, b in ((p1, t2), (p2, t1)):
        for i in range(4):
            want += (2 - 2 * torch.dot(a[i], b[i]) / (a[i].norm() * b[i].norm())) / 4
    assert torch.allclose(out["loss"], want, atol=1e-5)


def test_batchnorm_statistics_are_per_view():
    """Official BYOL.forward(image_one, image_two) runs online_encoder(image_one), then
    online_encoder(image_two) (and the target likewise): every BatchNorm sees B rows, never 2B."""
    m = _method()
    bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and any(b in dict(m.encoder.named_modules()).values() for b in bns)
    assert any(b in dict(m.target_encoder.named_modules()).values() for b in bns)
    seen = []
    hooks = [b.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0])) for b in bns]
    m({"audio": torch.randn(4, 1, 15200) * 0.1}, 0, gen(), 10)
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {4}
    enc_bn = [b for b in m.encoder.modules() if isinstance(b, torch.nn.modules.batchnorm._BatchNorm)][0]
    assert int(enc_bn.num_batches_tracked) == 2  # two passes through the online encoder


def test_post_norm_standardises_both_views_together_for_v1_and_v2():
    """train.py (v1) and v2/train_v2.py both apply NormalizeBatch (axis [0, 2, 3] of (2B, 1, F, T):
    one mean / std over all views) before the forward."""
    from sslaudio.build import load_preset

    for name in ("byol-a", "tiny/byol-a", "byol-a-v2", "tiny/byol-a-v2"):
        assert load_preset(name).method["post_norm"] is True, name
    m = _method()
    seen = []
    h = m.encoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    m({"audio": torch.randn(4, 1, 15200) * 0.1}, 0, gen(), 10)
    h.remove()
    both = torch.cat(seen[:2])  # the online encoder's two inputs
    assert abs(float(both.mean())) < 1e-5 and abs(float(both.std()) - 1) < 1e-4


def test_no_gradient_reaches_target_and_ema_is_exact():
    m = _method()
    out = m({"audio": torch.randn(4, 1, 15200) * 0.1}, 0, gen(), 10)
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in m.target_encoder.parameters())
    assert any(p.grad is not None for p in m.encoder.parameters())
    before = [p.clone() for p in m.target_encoder.parameters()]
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(0.1)
    m.after_step(0, 10)
    for b, t, s in zip(before, m.target_encoder.parameters(), m.encoder.parameters()):
        assert torch.allclose(t, 0.99 * b + 0.01 * s, atol=1e-6)


def test_ema_schedules():
    cos = EMAConfig(start=0.99, end=1.0, schedule="cosine")
    assert momentum(cos, 0, 100) == 0.99 and momentum(cos, 100, 100) == 1.0
    assert abs(momentum(cos, 50, 100) - (1 - 0.01 * (math.cos(math.pi / 2) + 1) / 2)) < 1e-12
    lin = EMAConfig(start=0.999, end=0.9999, schedule="linear", steps=10)
    assert abs(momentum(lin, 5, 1000) - 0.99945) < 1e-12 and momentum(lin, 50, 1000) == 0.9999


def test_v2_post_norm_and_encoder():
    m = build_tiny("byol-a-v2", "encoder.d=160", "encoder.base_d=8", "encoder.mlp_hidden=16",
                   "method.proj_hidden=32", "method.proj_dim=16")
    out = m({"audio": torch.randn(4, 1, 15200) * 0.1}, 0, gen(), 10)
    assert torch.isfinite(out["loss"]) and m.encoder.frame_dim == 160


def test_inference_in_channels_last_gives_the_training_layout_values():
    """AudioNTT encodes in channels-last when not training (faster CPU kernels): the same values as
    the default layout, for both versions."""
    for name, over in (("byol-a", ["encoder.d=64", "encoder.base_d=8"]),
                       ("byol-a-v2", ["encoder.d=160", "encoder.base_d=8", "encoder.mlp_hidden=16"])):
        enc = build_tiny(name, *over).encoder.eval()
        x = torch.randn(3, 64, 101)
        with torch.no_grad():
            got = enc(x).tokens
            enc.training = True  # the encoder's own default-layout path; its layers stay in eval mode
            want = enc(x).tokens
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
