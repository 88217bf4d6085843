"""Methods: each module registers its method class in `METHODS` on import (listed explicitly)."""

from __future__ import annotations

from sslaudio.methods import apc  # noqa: F401  APC
from sslaudio.methods import byol_a  # noqa: F401  BYOL-A (2021, 2022)
from sslaudio.methods import byol  # noqa: F401  BYOL, SimSiam
from sslaudio.methods import cpc  # noqa: F401  CPC
from sslaudio.methods import data2vec  # noqa: F401  data2vec, data2vec 2.0
from sslaudio.methods import dino  # noqa: F401  DINO
from sslaudio.methods import m2d  # noqa: F401
from sslaudio.methods import moco  # noqa: F401  MoCo v2, v3
from sslaudio.methods import mpc  # noqa: F401  Mockingjay, TERA
from sslaudio.methods import redundancy  # noqa: F401  Barlow Twins, VICReg
from sslaudio.methods import simclr  # noqa: F401
from sslaudio.methods import swav  # noqa: F401


def build_method(preset):
    """Frontend, encoder, masker and method from a validated preset."""
    from sslaudio.frontends import build_frontend
    from sslaudio.registry import ENCODERS, MASKERS, METHODS

    frontend = build_frontend(preset.frontend, preset.data.sample_rate)
    encoder = ENCODERS.build(preset.encoder, "encoder", frontend=frontend)
    masker = MASKERS.build(preset.masker, "masker") if preset.masker else None
    return METHODS.build(preset.method, "method", preset=preset, frontend=frontend, encoder=encoder,
                         masker=masker)
