"""Pure loss functions shared by the methods, each following its paper and official code.

Return convention: a single-term loss (byol_loss, negative_cosine, regression_loss, ...) returns
its float32 scalar Tensor. A loss whose parts are worth logging returns `LossOut(loss, terms)`:
`loss` the float32 scalar carrying the gradient, `terms` a dict of detached float32 scalar
tensors (tensors, so a loss never forces a device sync; the trainer calls `.item()` when it
logs). `loss, terms = nt_xent(z1, z2)` unpacks it; adding two LossOut raises, so symmetrise with
`a.loss + b.loss`. Embedding collapse monitors are the method's (`sslaudio.methods.base.embedding_std`).

Every function computes in float32 with autocast off, whatever the input dtype: the
normalisations, exponentials and (N, N) correlations lose too much in fp16/bf16.

Each function is one direction: symmetrising over the views, and any queue or EMA update, is the
caller's job. Arguments the paper treats as targets (stop-gradient or momentum encoder) are
detached inside, so no caller can forget it.
"""

from sslaudio.methods.losses._common import GatherFn, LossOut
from sslaudio.methods.losses.clustering import (
    cluster_prediction_loss,
    dino_loss,
    sinkhorn,
    swav_loss,
)
from sslaudio.methods.losses.contrastive import (
    cpc_info_nce,
    info_nce_queue,
    moco_v3_loss,
    nt_xent,
    wav2vec2_contrastive,
)
from sslaudio.methods.losses.predictive import apc_l1_loss, masked_reconstruction_loss
from sslaudio.methods.losses.redundancy import barlow_twins_loss, vicreg_loss
from sslaudio.methods.losses.regression import (
    average_top_k_layers,
    byol_loss,
    negative_cosine,
    regression_loss,
)

__all__ = [
    "GatherFn",
    "LossOut",
    "apc_l1_loss",
    "average_top_k_layers",
    "barlow_twins_loss",
    "byol_loss",
    "cluster_prediction_loss",
    "cpc_info_nce",
    "dino_loss",
    "info_nce_queue",
    "masked_reconstruction_loss",
    "moco_v3_loss",
    "negative_cosine",
    "nt_xent",
    "regression_loss",
    "sinkhorn",
    "swav_loss",
    "vicreg_loss",
    "wav2vec2_contrastive",
]
