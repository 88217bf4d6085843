"""CPC: contrastive predictive coding on the waveform.

van den Oord, Li, Vinyals. "Representation Learning with Contrastive Predictive Coding", arXiv
1807.03748, 2018. Official audio re-implementation: github.com/facebookresearch/CPC_audio
(cpc/model.py `CPCModel`; cpc/criterion/criterion.py `CPCUnsupersivedCriterion`,
`PredictionNetwork`; cpc/cpc_default_config.py; cpc/train.py).

The `cpc` encoder turns the waveform into conv features z_t (10 ms frames) and GRU context
vectors c_t. For every offset k = 1..K (`n_predicts`, CPC_audio nPredicts 12) a bias-free Linear
W_k (CPC_audio's `PredictionNetwork` with rnnMode linear; the paper's W_k) predicts z_{t+k} from
c_t. Anchors are the steps t < T - K (CPC_audio's `windowSize = seqSize - nPredicts`, the same
anchors for every k; with padding, t < length - K). Each anchor's candidates are its true
z_{t+k} at index 0 and `negatives` (CPC_audio negativeSamplingExt 128) conv features drawn once
per anchor and shared by all k; the loss is the InfoNCE cross-entropy (`losses.cpc_info_nce`,
scores = dot product / D as CPC_audio), averaged over anchors and then over k.

Negatives (`sample_negatives`) follow CPC_audio's `sampleClean`: for anchor (b, t), each negative
comes from an item b' drawn uniformly from the batch, at step (t + r) mod L_b' with r uniform in
[1, L_b' - 1], so it is never the anchor's own step t and never a padded step (L_b' is b''s valid
length; CPC_audio has no padding, L = T). All draws come from the method's generator, batched.
CPC_audio's default batches hold one speaker ('samespeaker' sampling), so its negatives are
same-speaker; we have no speaker labels and batches of random files (its 'uniform' sampling).
Its criterion runs under DataParallel, so each GPU draws negatives from its own 8 sequences; a
single process here draws from the whole batch.

Logged: loss, acc (mean over k of the fraction of anchors that rank the positive first), acc_<k>
per offset, and the collapse signals ctx_std / z_std (base.embedding_std of the valid frames) and
ctx_dims / z_dims (base.effective_dimension, the participation ratio of the same frames). The
latter show what the stds do not: on devbench's pool the first ~20 updates of tiny/cpc put nearly
all of the frames' variation on one direction (the frame's level, which the first conv's bias lets
through the ChannelNorm; without that bias, onto another direction) while z_std stays near half
its isotropic value (benchmarks/RESULTS.md, "tiny/cpc: what its first updates do").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sslaudio.config import ConfigError
from sslaudio.methods import losses
from sslaudio.methods.base import Method, Needs, effective_dimension, embedding_std
from sslaudio.registry import METHODS


def sample_negatives(lengths: Tensor, n_anchors: int, n_total: int, count: int,
                     generator: torch.Generator) -> Tensor:
    """Flat indices (into the B * n_total frames of the batch) of `count` negatives for each of the
    first `n_anchors` steps of every item: (B, n_anchors, count).

    lengths: (B,) valid frames per item. Negative j of anchor (b, t): item b' ~ U{0..B-1}, step
    (t + r) mod L_b' with r ~ U{1..L_b' - 1} (CPC_audio `sampleClean`); an item of one frame
    offers its only frame.
    """
    B = lengths.shape[0]
    dev = lengths.device
    shape = (B, n_anchors, count)
    item = torch.randint(0, B, shape, generator=generator, device=dev)
    length = lengths[item]  # (B, W, M)
    # a 62-bit draw modulo the span: the modulo bias is below 2^-40 for any audio length
    r = torch.randint(0, 2**62, shape, generator=generator, device=dev) % (length - 1).clamp_min(1) + 1
    t = torch.arange(n_anchors, device=dev).view(1, -1, 1)
    return item * n_total + (t + r) % length


@METHODS.register("cpc")
class CPC(Method):
    @dataclass
    class Config:
        n_predicts: int = 12  # CPC_audio nPredicts
        negatives: int = 128  # CPC_audio negativeSamplingExt

        def __post_init__(self):
            if self.n_predicts < 1:
                raise ConfigError(f"method.n_predicts must be >= 1, found {self.n_predicts}")
            if self.negatives < 1:
                raise ConfigError(f"method.negatives must be >= 1, found {self.negatives}")

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(frontend=("waveform",), encoder=("cpc",), masker="none", segments=1)

    def __init__(self, cfg: Config, inputs, frontend, encoder, masker=None):
        super().__init__(cfg, inputs, frontend, encoder, masker)
        frames = encoder.output_lengths(torch.tensor([inputs.clip_samples])).item()
        if frames <= cfg.n_predicts:
            raise ConfigError(f"method.n_predicts {cfg.n_predicts} needs crops of more than "
                              f"{cfg.n_predicts} frames; data.clip_seconds gives {frames}")
        self.predictors = nn.ModuleList([nn.Linear(encoder.dim, encoder.z_dim, bias=False)
                                         for _ in range(cfg.n_predicts)])

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        audio = batch["audio"][:, 0]  # (B, S); one crop per file
        with torch.no_grad():
            x, lengths = self.frontend(audio, batch.get("lengths"))
        out = self.encoder(x, lengths if "lengths" in batch else None)
        z, c = out.local, out.tokens  # (B, T, C), (B, T, G)
        B, T, C = z.shape
        K = self.cfg.n_predicts
        W = T - K  # anchor steps
        if W < 1:
            raise ValueError(f"cpc: {T} frames per item leave no anchor for {K} predicted steps")
        frame_lengths = out.lengths
        if frame_lengths is None:
            frame_lengths = torch.full((B,), T, dtype=torch.long, device=z.device)

        weight = torch.stack([p.weight for p in self.predictors])  # (K, C, G)
        pred = torch.einsum("bwg,kcg->kbwc", c[:, :W], weight)  # (K, B, W, C): W_k c_t
        positive = torch.stack([z[:, k:k + W] for k in range(1, K + 1)])  # (K, B, W, C): z_{t+k}
        idx = sample_negatives(frame_lengths, W, T, self.cfg.negatives, generator)  # (B, W, M)
        negatives = z.reshape(B * T, C)[idx.flatten()].view(B * W, -1, C)  # (B*W, M, C)
        valid = None
        if out.padding is not None:  # anchors whose K targets are all real frames
            valid = (torch.arange(W, device=z.device)[None] < (frame_lengths - K)[:, None]).flatten()
        loss, terms = losses.cpc_info_nce(pred.reshape(K, B * W, C), positive.reshape(K, B * W, C),
                                          negatives, valid)
        keep = None if out.padding is None else ~out.padding
        c_rows = c.reshape(-1, c.shape[-1]) if keep is None else c[keep]
        z_rows = z.reshape(-1, C) if keep is None else z[keep]
        return {"loss": loss, **terms, "ctx_std": embedding_std(c_rows), "z_std": embedding_std(z_rows),
                "ctx_dims": effective_dimension(c_rows), "z_dims": effective_dimension(z_rows)}
