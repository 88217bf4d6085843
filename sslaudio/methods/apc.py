"""APC: autoregressive predictive coding of log-mel frames.

Chung, Hsu, Tang, Glass. "An Unsupervised Autoregressive Model for Speech Representation
Learning", Interspeech 2019. Official code: github.com/iamyuanchung/Autoregressive-Predictive-Coding
(apc_model.py `Postnet`, `APCModel`; train_apc.py); s3prl pretrain/apc (config_model.yaml,
pretrain_expert.py).

A unidirectional GRU stack (`encoders.rnn`) reads the log-mel frames x_1..x_T; a postnet (the
official Conv1d of kernel 1, i.e. a Linear H -> F) maps the last layer's output at step t to a
prediction of the frame n = `time_shift` steps later, and the loss is the L1 distance to x_{t+n}
(`losses.apc_l1_loss`), averaged over valid (t, t + n) pairs and bins. The official code feeds
x[:, :-n] and compares with x[:, n:]; we feed the whole crop and drop the last n predictions,
which is the same computation since a causal GRU's outputs up to step t ignore later frames.
The postnet is for training only; features are the last GRU layer's outputs.

Logged: loss, and the collapse signal `frame_std`, the per-dimension std over valid frames of the
last layer averaged over dimensions (0 if every frame maps to one vector), with `pred_std`, the
same for the predictions (it falls to 0 if the postnet predicts a constant frame); `frame_dims`,
base.effective_dimension of the valid frames (1 if they vary along one direction only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sslaudio.config import ConfigError
from sslaudio.methods import losses
from sslaudio.methods.base import Method, Needs, effective_dimension
from sslaudio.registry import METHODS


def frame_std(h: Tensor, padding: Tensor | None) -> Tensor:
    """(B, T, D) -> mean over D of the std over valid frames (detached, float32)."""
    h = h.detach().float()
    frames = h.reshape(-1, h.shape[-1]) if padding is None else h[~padding]
    return frames.std(dim=0).mean()


@METHODS.register("apc")
class APC(Method):
    @dataclass
    class Config:
        # predict x_{t+n}: s3prl's n_future 5 (official flag default 1; the paper's sweep put
        # phone classification best around 3); see presets/apc.yaml
        time_shift: int = 5

        def __post_init__(self):
            if self.time_shift < 1:
                raise ConfigError(f"method.time_shift must be >= 1, found {self.time_shift}")

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(frontend=("logmel",), encoder=("rnn",), masker="none", segments=1)

    def __init__(self, cfg: Config, inputs, frontend, encoder, masker=None):
        super().__init__(cfg, inputs, frontend, encoder, masker)
        n_frames = self.spec_shape()[1]
        if n_frames <= cfg.time_shift:
            raise ConfigError(f"method.time_shift {cfg.time_shift} needs crops of more frames; "
                              f"data.clip_seconds gives {n_frames}")
        self.postnet = nn.Linear(encoder.dim, frontend.out_channels)  # official Conv1d, kernel 1

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        audio = batch["audio"][:, 0]  # (B, S); APC uses one crop per file
        with torch.no_grad():
            x, frame_lengths = self.frontend(audio, batch.get("lengths"))  # (B, F, T)
        lengths = frame_lengths if "lengths" in batch else None
        out = self.encoder(x, lengths)  # tokens (B, T, H): the last GRU layer
        pred = self.postnet(out.tokens)  # (B, T, F): the guess at x_{t+n} made at step t
        loss = losses.apc_l1_loss(pred, x.transpose(1, 2), self.cfg.time_shift, out.padding)
        tokens = out.tokens.reshape(-1, out.tokens.shape[-1])
        return {"loss": loss, "frame_std": frame_std(out.tokens, out.padding),
                "frame_dims": effective_dimension(tokens, None if out.padding is None else ~out.padding.reshape(-1)),
                "pred_std": frame_std(pred, out.padding)}
