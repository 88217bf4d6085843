"""BYOL and SimSiam, plus the checks shared by the four non-contrastive two-view methods (BYOL,
SimSiam, Barlow Twins, VICReg): symmetry, gradients, a short run that learns without collapse."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslaudio.augment import ViewSampler
from tests.conftest import build_tiny, first_last, gen, random_views, run_steps, synth_clips, use_views

METHODS = ["byol", "simsiam", "barlow-twins", "vicreg"]
SMALL = ["encoder.d=160", "encoder.base_d=8", "encoder.mlp_hidden=64", "data.clip_seconds=0.3", "encoder.dropout=0.0"]
HEADS = {"byol": ["method.proj_hidden=64", "method.proj_dim=32"],
         "simsiam": ["method.proj_dim=64", "method.pred_hidden=16"],
         "barlow-twins": ["method.projector=[128, 128]"], "vicreg": ["method.projector=[128, 128]"]}


def build(name: str, *overrides: str):
    return build_tiny(name, *SMALL, *HEADS[name], *overrides)


def embed(m, v: torch.Tensor, encoder=None, projector=None) -> torch.Tensor:
    encoder = encoder or m.encoder
    return (projector or m.projector)(encoder.pool(encoder(v)))


def loss_of(m, views) -> torch.Tensor:
    return m({"audio": torch.zeros(views[0].shape[0], 1, 10)}, 0, gen(0), 10)["loss"]


# -- BYOL ---------------------------------------------------------------------------------------
def cos(a, b):
    return F.cosine_similarity(a, b, dim=1)


def test_byol_loss_matches_its_submodules(monkeypatch):
    m = build("byol")
    views = random_views(m, B=6)
    use_views(monkeypatch, views)
    out = m({"audio": torch.zeros(6, 1, 10)}, 0, gen(0), 10)
    v1, v2 = views
    with torch.no_grad():
        p1, p2 = m.predictor(embed(m, v1)), m.predictor(embed(m, v2))
        t1 = embed(m, v1, m.target_encoder, m.target_projector)
        t2 = embed(m, v2, m.target_encoder, m.target_projector)
    expected = (2 - 2 * cos(p1, t2)).mean() + (2 - 2 * cos(p2, t1)).mean()  # the paper's L + L~
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(out) == {"loss", "emb_std", "emb_dims", "target_std"}


def test_byol_no_gradient_reaches_the_target_and_ema_is_exact():
    m = build("byol")
    assert isinstance(m.views, ViewSampler) and m.inference_encoder() is m.encoder
    opt = torch.optim.AdamW(m.param_groups(0.0), lr=1e-2)
    audio = torch.randn(6, 2, int(0.3 * 16000)) * 0.1
    out = m({"audio": audio}, 0, gen(0), 10)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    target = [*m.target_encoder.parameters(), *m.target_projector.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in target)
    online = [*m.encoder.parameters(), *m.projector.parameters(), *m.predictor.parameters()]
    assert all(p.grad is not None for p in online)
    opt.step()
    before = [p.detach().clone() for p in target]
    student = [p.detach().clone() for p in [*m.encoder.parameters(), *m.projector.parameters()]]
    k, K = 3, 10
    m.after_step(k, K)
    tau = 1 - (1 - 0.99) * (math.cos(math.pi * k / K) + 1) / 2  # BYOL's cosine schedule
    for t0, s, t1 in zip(before, student, target):
        assert torch.allclose(t1, tau * t0 + (1 - tau) * s, atol=1e-6)
    assert not torch.allclose(before[0], target[0])
    bn_t, bn_s = m.target_encoder.features[1], m.encoder.features[1]
    assert torch.equal(bn_t.running_mean, bn_s.running_mean)  # buffers are copied


# -- SimSiam ------------------------------------------------------------------------------------
def simsiam_manual(m, views, stop_grad: bool) -> torch.Tensor:
    z1, z2 = embed(m, views[0]), embed(m, views[1])
    p1, p2 = m.predictor(z1), m.predictor(z2)
    sg = (lambda z: z.detach()) if stop_grad else (lambda z: z)
    return -0.5 * (cos(p1, sg(z2)).mean() + cos(p2, sg(z1)).mean())


def grads(m, loss) -> list[torch.Tensor]:
    params = [p for p in m.parameters() if p.requires_grad]
    return [g if g is not None else torch.zeros_like(p)
            for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]


def test_simsiam_loss_and_stop_gradient(monkeypatch):
    m = build("simsiam")
    views = random_views(m, B=6)
    use_views(monkeypatch, views)
    out = m({"audio": torch.zeros(6, 1, 10)}, 0, gen(0), 10)
    detached = simsiam_manual(m, views, stop_grad=True)
    assert out["loss"].item() == pytest.approx(detached.item(), rel=1e-5, abs=1e-6)
    g_method, g_sg = grads(m, out["loss"]), grads(m, detached)
    g_full = grads(m, simsiam_manual(m, views, stop_grad=False))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_method, g_sg))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_method, g_full))


def test_simsiam_heads_follow_the_official_builder():
    m = build("simsiam", "method.proj_hidden=0")
    linears = [mod for mod in m.projector if isinstance(mod, torch.nn.Linear)]
    assert [lin.out_features for lin in linears] == [160, 160, 64]  # hidden = encoder width
    assert linears[-1].bias is None
    assert isinstance(m.projector[-1], torch.nn.BatchNorm1d) and not m.projector[-1].affine
    assert [mod.out_features for mod in m.predictor if isinstance(mod, torch.nn.Linear)] == [16, 64]


def test_simsiam_fix_pred_lr_param_groups():
    m = build("simsiam", "method.fix_pred_lr=true")
    groups = m.param_groups(0.01)
    pred = {id(p) for p in m.predictor.parameters()}
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in m.parameters() if p.requires_grad)
    for g in groups:
        assert all((id(p) in pred) == g["constant_lr"] for p in g["params"])
        assert g["weight_decay"] == (0.0 if g["params"][0].ndim <= 1 else 0.01)
    assert all("constant_lr" not in g for g in build("simsiam", "method.fix_pred_lr=false").param_groups(0.0))


# -- the four methods ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_loss_is_symmetric_in_the_views(monkeypatch, name):
    m = build(name)
    v1, v2 = random_views(m, B=6)
    use_views(monkeypatch, [v1, v2])
    a = loss_of(m, [v1, v2])
    use_views(monkeypatch, [v2, v1])
    assert a.item() == pytest.approx(loss_of(m, [v2, v1]).item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("segments", [1, 2])
def test_one_step_from_audio(name, segments):
    m = build(name, f"data.segments={segments}")
    out = m({"audio": torch.randn(4, segments, int(0.3 * 16000)) * 0.1}, 0, gen(0), 10)
    assert torch.isfinite(out["loss"]) and {"loss", "emb_std"} <= set(out)
    assert all(v.dim() == 0 for v in out.values())
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.encoder.parameters())


def fixed_batch(B: int, V: int, seconds: float) -> torch.Tensor:
    """B synthetic clips (8 classes), V crops each: the start and the end of a 2x longer clip."""
    S = int(seconds * 16000)
    x = synth_clips(B, 2 * seconds, seed=7)
    return torch.stack([x[:, :S], x[:, -S:]][:V], dim=1)


@pytest.mark.parametrize("name", METHODS)
def test_short_run_lowers_the_loss_without_collapse(name):
    m = build(name, "encoder.d=320", "encoder.base_d=16", "data.clip_seconds=0.5")
    audio = fixed_batch(16, m.inputs.segments, 0.5)
    m.frontend.estimate_stats(audio.flatten(0, 1))
    hist = run_steps(m, audio, 20, lr=1e-3)
    first, last = first_last(hist, n=3)
    assert last < first - 0.05 * abs(first), (first, last)
    dim = out_dim(m)
    assert min(h["emb_std"] for h in hist[-3:]) > 0.5 / math.sqrt(dim)  # healthy is ~1/sqrt(D), collapse is 0


def out_dim(m) -> int:
    return [mod for mod in m.projector if isinstance(mod, torch.nn.Linear)][-1].out_features
