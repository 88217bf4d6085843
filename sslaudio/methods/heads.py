"""Projection / prediction heads described as a list of layer widths."""

from __future__ import annotations

from torch import nn

from sslaudio.config import ConfigError


def mlp(dims: list[int], norm: str = "bn", last_norm: str | None = None, act: type = nn.ReLU,
        bias_last: bool = True) -> nn.Sequential:
    """[in, hidden..., out] -> Linear (+norm +act) for every hidden layer, then a plain Linear.

    BYOL projector/predictor: mlp([d, 4096, 256]) = Linear - BN - ReLU - Linear.
    `last_norm` adds a final affine-free BN (SimSiam / MoCo v3 projector output).
    """
    if len(dims) < 2 or any(int(w) < 1 for w in dims):  # a zero width built and then failed mid-step
        raise ConfigError(f"method: every head width must be >= 1, found {list(dims)} (check the method's "
                          f"*_dim and *_hidden settings)")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=bias_last or not last))
        if not last:
            if norm == "bn":
                layers.append(nn.BatchNorm1d(b))
            elif norm == "ln":
                layers.append(nn.LayerNorm(b))
            layers.append(act())
        elif last_norm == "bn":
            layers.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*layers)
