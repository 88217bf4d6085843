"""Methods: each module registers its method class in `METHODS` on import (listed explicitly)."""

from sslaudio.methods import (
    apc,  # noqa: F401  APC
    atst,  # noqa: F401  ATST-Clip, ATST-Frame, ATST-C2F
    byol,  # noqa: F401  BYOL, SimSiam
    byol_a,  # noqa: F401  BYOL-A (2021, 2022)
    cpc,  # noqa: F401  CPC
    data2vec,  # noqa: F401  data2vec, data2vec 2.0
    deepcluster,  # noqa: F401  DeepCluster
    dino,  # noqa: F401  DINO
    hubert,  # noqa: F401  HuBERT
    m2d,  # noqa: F401
    moco,  # noqa: F401  MoCo v2, v3
    mpc,  # noqa: F401  Mockingjay, TERA
    npc,  # noqa: F401  NPC
    redundancy,  # noqa: F401  Barlow Twins, VICReg
    simclr,  # noqa: F401
    swav,  # noqa: F401
    wav2vec2,  # noqa: F401  wav2vec 2.0
)

