"""NPC: non-autoregressive predictive coding of log-mel frames.

Liu, Chung, Glass. "Non-Autoregressive Predictive Coding for Learning Speech Representations from
Local Dependencies", Interspeech 2021. Official code: github.com/Alexander-H-Liu/NPC (model/npc.py,
model/vq.py, bin/self_learning.py, config/self_supervised/npc_example.yml) and s3prl
(github.com/s3prl/s3prl: s3prl/upstream/npc/npc.py, s3prl/upstream/npc/vq.py,
s3prl/pretrain/npc/pretrain_expert.py, config_model.yaml, config_runner.yaml).

The `npc` encoder (encoders/npc.py) turns the log-mel frames into, at every frame t, a feature
that never saw the `mask` input frames centred on t (masked convolutions over stacked ConvBlocks,
summed over blocks). A product VQ layer (`quantizer.GumbelQuantizer` with `split_input`: group g
reads only its hidden / G slice, as s3prl's per-group `VQLayer`s on feature slices; torch's
default Linear initialisation; hard straight-through Gumbel-softmax at a constant temperature in
training, argmax in evaluation) maps the feature to G concatenated codewords of hidden / G, and
the postnet (Linear hidden -> F) predicts frame t itself. Loss: L1 between the prediction and the
input frames, every bin of every valid frame (`losses.masked_reconstruction_loss` with the valid
frames as the mask): s3prl's per-frame mean over bins, summed over valid frames and divided by the
number of valid frames, which is the same number. There is no shift: input = target, since frame t
is hidden from its own prediction by the masks (s3prl's config also lists `n_future: 5`, which the
NPC expert never reads). The VQ layer and postnet are for training only; the encoder (what
extraction and export use) ends at the aggregated masked features, s3prl's NPC upstream output.

`method.groups: 0` builds no VQ layer: the postnet reads the masked features directly, the official
model's `vq: null` (Alexander-H-Liu/NPC model/npc.py, `apply_vq` false). The presets keep the
official 4 x 64 VQ.

Where we differ from the official code, and why:
- Input: the repo's logmel frontend (Hann window) with per-utterance, per-bin CMVN (`frontend.cmvn`,
  as the official input), instead of Kaldi fbank with a Hamming window.
- Padded frames: quantized and predicted only where valid (the official code quantizes them too,
  which changes nothing in the loss but counts them in its codebook usage); BatchNorm statistics
  from valid frames only (see encoders/npc.py).
- The codebook perplexity is logged per step (official: accumulated usage between reports, groups
  1 and 2 only, each group separately).

Logged: loss; with a VQ, `code_perplexity`, the sum over groups of exp(entropy) of the batch's
argmax code usage, and `prob_perplexity`, the same of the averaged softmax (each at most groups x
entries; near groups when every frame takes one code, i.e. a collapsed codebook); `emb_std`, the
spread of the L2-normalised encoder features over valid frames (0 if every frame maps to one
vector), and `emb_dims`, their effective dimension (base.embedding_signals).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sslaudio.config import ConfigError
from sslaudio.methods import losses
from sslaudio.methods.base import Method, Needs, embedding_signals
from sslaudio.methods.quantizer import GumbelQuantizer
from sslaudio.registry import METHODS


@METHODS.register("npc")
class NPC(Method):
    @dataclass
    class Config:
        groups: int = 4  # VQ groups: s3prl vq.codebook_size [64, 64, 64, 64], code_dim [128] * 4 (hidden / 4); 0: no VQ
        entries: int = 64  # codes per group
        tau: float = 1.0  # vq.gumbel_temperature (constant)

        def __post_init__(self):
            if self.groups < 0 or self.entries < 2:
                raise ConfigError(f"method.groups must be >= 0 (0: no VQ) and method.entries >= 2, found "
                                  f"{self.groups} and {self.entries}")
            if not (math.isfinite(self.tau) and self.tau > 0):
                raise ConfigError(f"method.tau must be finite and > 0, found {self.tau}")

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(frontend=("logmel",), encoder=("npc",), masker="none", segments=1)

    def __init__(self, cfg: Config, inputs, frontend, encoder, masker=None):
        super().__init__(cfg, inputs, frontend, encoder, masker)
        hidden = encoder.dim
        if cfg.groups and hidden % cfg.groups:
            raise ConfigError(f"method.groups {cfg.groups} must divide encoder.hidden {hidden} (each group "
                              "quantizes its own slice)")
        self.vq = (GumbelQuantizer(hidden, cfg.groups, cfg.entries, hidden, split_input=True, init="torch")
                   if cfg.groups else None)
        self.postnet = nn.Linear(hidden, frontend.out_channels)  # back to the log-mel frame

    def predict(self, feat: Tensor, valid: Tensor | None, generator: torch.Generator | None):
        """Aggregated masked features (B, T, H) -> (prediction (B, T, F), QuantOut of the valid frames).
        Padded frames (valid False) get the prediction of a zero code. Without a VQ (groups 0) the
        postnet reads the features and the QuantOut is None."""
        if self.vq is None:
            return self.postnet(feat), None
        B, T, H = feat.shape
        rows = feat.reshape(B * T, H) if valid is None else feat[valid]  # (N, H)
        q = self.vq(rows, self.cfg.tau, generator)
        if valid is None:
            codes = q.codes.reshape(B, T, H)
        else:
            codes = q.codes.new_zeros(B, T, H).masked_scatter(valid.unsqueeze(-1), q.codes)
        return self.postnet(codes), q

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        audio = batch["audio"][:, 0]  # (B, S); one crop per file
        with torch.no_grad():
            x, frame_lengths = self.frontend(audio, batch.get("lengths"))  # (B, F, T)
        lengths = frame_lengths if "lengths" in batch else None
        out = self.encoder(x, lengths)  # tokens (B, T, H)
        valid = None if out.padding is None else ~out.padding
        pred, q = self.predict(out.tokens, valid, generator)  # (B, T, F): frame t guessed without it
        target = x.transpose(1, 2)  # (B, T, F)
        where = torch.ones_like(target, dtype=torch.bool) if valid is None else valid.unsqueeze(-1).expand_as(target)
        loss = losses.masked_reconstruction_loss(pred, target, where, "l1")
        feats = out.tokens.reshape(-1, out.tokens.shape[-1]) if valid is None else out.tokens[valid]
        codes = {} if q is None else {"code_perplexity": q.code_perplexity, "prob_perplexity": q.prob_perplexity}
        return {"loss": loss, **codes, **embedding_signals(feats)}
