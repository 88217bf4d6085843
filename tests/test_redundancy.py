"""Barlow Twins and VICReg: the method's loss and logged terms against the official formulas
written out from its sub-modules (symmetry, gradients and the short run: tests/test_byol.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sslaudio.build import load_preset
from sslaudio.config import ConfigError
from tests.conftest import build_tiny, gen, random_views, use_views

SMALL = ["encoder.d=160", "encoder.base_d=8", "encoder.mlp_hidden=64", "data.clip_seconds=0.3", "encoder.dropout=0.0",
         "method.projector=[96, 64]"]


def build(name: str, *overrides: str):
    return build_tiny(name, *SMALL, *overrides)


def run_on_views(monkeypatch, m, B: int = 8):
    views = random_views(m, B)
    use_views(monkeypatch, views)
    out = m({"audio": torch.zeros(B, 1, 10)}, 0, gen(0), 10)
    with torch.no_grad():
        z1, z2 = (m.projector(m.encoder.pool(m.encoder(v))) for v in views)
    return out, z1, z2


def off_diagonal(c: torch.Tensor) -> torch.Tensor:
    n = c.shape[0]
    return c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()  # the official helper's trick


@pytest.mark.parametrize("lambd", [0.0051, 0.0])
def test_barlow_twins_loss_matches_the_official_formula(monkeypatch, lambd):
    m = build("barlow-twins", f"method.lambd={lambd}")
    out, z1, z2 = run_on_views(monkeypatch, m)
    bn = torch.nn.BatchNorm1d(z1.shape[1], affine=False)  # official: self.bn, training mode
    c = bn(z1).T @ bn(z2) / z1.shape[0]
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    assert out["on_diag"].item() == pytest.approx(on_diag.item(), rel=1e-4)
    assert out["off_diag"].item() == pytest.approx(off_diag.item(), rel=1e-4)
    assert out["loss"].item() == pytest.approx((on_diag + lambd * off_diag).item(), rel=1e-4)
    assert {"loss", "on_diag", "off_diag", "emb_std", "emb_dims"} == set(out)


def test_vicreg_loss_matches_the_official_formula(monkeypatch):
    m = build("vicreg", "method.sim_coeff=20.0", "method.std_coeff=30.0", "method.cov_coeff=2.0")
    out, x, y = run_on_views(monkeypatch, m)
    n, d = x.shape
    repr_loss = F.mse_loss(x, y)
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    std_x, std_y = torch.sqrt(x.var(dim=0) + 1e-4), torch.sqrt(y.var(dim=0) + 1e-4)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x, cov_y = x.T @ x / (n - 1), y.T @ y / (n - 1)
    cov_loss = off_diagonal(cov_x).pow(2).sum() / d + off_diagonal(cov_y).pow(2).sum() / d
    assert out["invariance"].item() == pytest.approx(repr_loss.item(), rel=1e-4)
    assert out["variance"].item() == pytest.approx(std_loss.item(), rel=1e-4)
    assert out["covariance"].item() == pytest.approx(cov_loss.item(), rel=1e-4)
    expected = 20 * repr_loss + 30 * std_loss + 2 * cov_loss
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert {"loss", "invariance", "variance", "covariance", "emb_std", "emb_dims"} == set(out)


@pytest.mark.parametrize("name", ["barlow-twins", "vicreg"])
def test_projector_shape(name):
    m = build(name)
    linears = [mod for mod in m.projector if isinstance(mod, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(160, 96), (96, 64)]
    assert linears[-1].bias is None  # both official projectors end in a bias-free Linear
    assert isinstance(m.projector[1], torch.nn.BatchNorm1d) and isinstance(m.projector[2], torch.nn.ReLU)


@pytest.mark.parametrize("override", ["method.projector=[]", "method.lambd=-1.0"])
def test_config_errors(override):
    with pytest.raises(ConfigError):
        build("barlow-twins", override)
    with pytest.raises(ConfigError):
        build("vicreg", "method.std_coeff=-1.0")


def test_full_presets_load_at_paper_widths():
    for name, key in (("barlow-twins", "lambd"), ("vicreg", "sim_coeff")):
        preset = load_preset(name)
        assert preset.method["projector"] == [8192, 8192, 8192] and key in preset.method
        assert preset.train.batch_size == 256
