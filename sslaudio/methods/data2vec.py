"""data2vec (audio) and data2vec 2.0 (audio): regress an EMA teacher's contextualised targets.

data2vec: Baevski, Hsu, Xu, Babu, Gu, Auli. "data2vec: A General Framework for Self-supervised
Learning in Speech, Vision and Language", ICML 2022. Official code: fairseq
examples/data2vec/models/data2vec_audio.py, config/audio/pretraining/base_librispeech.yaml.
The student (a ConvTransformer) encodes the waveform with span-masked frames replaced by a learned
vector; a linear head `final_proj` predicts, at the masked frames, the average of the teacher's
top-K block FFN outputs (each instance-normalised over time). As `ema_transformer_only` /
`ema_layers_only` in fairseq, only the transformer blocks and its LayerNorm are EMA copies: the
teacher reads the student's own projected conv features of the *unmasked* input (before input
dropout) and the student's current positional conv (fairseq copies pos_conv into the teacher at
every step, i.e. shares it), so the conv feature extractor runs once per step.

data2vec 2.0: Baevski, Babu, Hsu, Auli. "Efficient Self-supervised Learning with Contextualized
Target Representations for Vision, Speech and Language", ICML 2023. Official code: fairseq
examples/data2vec/models/data2vec2.py, modalities/{base,audio,modules}.py,
config/v2/base_audio_only_task.yaml. The teacher runs once per clip on the unmasked features; the
student sees `clone_batch` differently masked copies (rows b * K + k) and encodes only the visible
frames (keep-mode mask); a light conv decoder fills the hidden frames with N(0, 0.01) noise
(fairseq `decoder_input`), and predicts the targets at the hidden frames. With `ema_encoder_only:
false` and `ema_local_encoder: false` the teacher EMA-tracks the positional conv, the LayerNorm and
the blocks, and again reads the student's local (conv + projection) features.
Positions: the conv positional embedding plus ALiBi attention biases with a learned per-head scale
(encoder `alibi: true`, fairseq use_alibi_encoder / learned_alibi_scale); kept frames keep their
original positions in the bias, and the teacher uses the student's bias over all frames.

On log-mel patches (encoder `vit`; the spectrogram-patch form of data2vec 2.0 is EAT: Chen, Liang,
Ma, Zheng, Chen. "EAT: Self-Supervised Pre-Training with Efficient Audio Transformer", IJCAI 2024,
official code github.com/cwx-worst-one/EAT, config/pretraining_AS2M.yaml): as EAT (fairseq
`ema_local_encoder: true`, `ema_encoder_only: false`) the teacher is an EMA copy of the whole ViT
(patch embedding and CLS token included) and encodes the unmasked spectrogram itself; the 2.0
decoder is the 2-D grouped conv over the (freq, time) patch grid (fairseq `Decoder2d`), and
`cls_loss` > 0 regresses the clip mean of the targets from the student's CLS token (EAT's
utterance-level loss, weight 1; the data2vec 2.0 image config uses 0.01). As in the official code
(fairseq data2vec2.py / EAT_pretraining.py: the cls term is multiplied by `cls_loss * sample_size`
before the criterion divides everything by sample_size), that term is summed over the student's
clips, not averaged: cls_loss * (B * K) * the per-clip mean. Like fairseq, the weight follows the
clips each process sees (the per-GPU batch x clone_batch), so the EAT preset reproduces EAT's 192
on 4 processes of 12 clips; on one process with the same global batch it is 4x stronger. data2vec (v1) on patches
uses the same whole-ViT teacher with replace-mode masks.

Both evaluate the student encoder (`inference_encoder` default). Loss: `losses.regression_loss`
(loss_beta 0 => MSE, as the released configs; smooth-L1 otherwise), Σ_d / sqrt(D), mean over
masked frames. Logged: target_var / pred_var (fairseq `compute_var`: mean over dimensions of the
std over frames; fairseq stops below 0.1 / 0.01), emb_std (mean-pooled student clip embeddings),
frame_std (the same over single frames), ema_tau. emb_std is small by design here: the targets are
instance-normalised, i.e. zero-mean over each clip's frames, so a student that predicts them well
through the linear final_proj has nearly the same time-mean in every clip; frame_std and
pred_var are the collapse signals to watch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslaudio.config import ConfigError
from sslaudio.encoders.base import EncoderOut, masked_mean
from sslaudio.encoders.layers import gather_tokens, zero_padded
from sslaudio.encoders.vit import ViT
from sslaudio.methods import losses
from sslaudio.methods.base import Method, Needs, embedding_signals, embedding_std, masked_column_var
from sslaudio.methods.ema import EMAConfig, ema_update, make_teacher, momentum
from sslaudio.registry import METHODS

_FINAL_NORMS = (None, "layer_norm", "instance_norm")


def token_std(y: Tensor, select: Tensor | None = None) -> Tensor:
    """fairseq `compute_var`: per-dimension std over all rows of (..., D), averaged over D;
    `select` (...) bool: over those rows only (weights, not indexing: no host sync)."""
    y = y.detach().float().reshape(-1, y.shape[-1])
    if select is None:
        if y.shape[0] < 2:
            return torch.zeros((), device=y.device)
        return torch.sqrt(y.var(dim=0) + 1e-6).mean()
    var, n = masked_column_var(y, select)
    return torch.where(n < 2, 0.0, torch.sqrt(var + 1e-6).mean())


def frame_std(tokens: Tensor, padding: Tensor | None = None) -> Tensor:
    """`embedding_std` over the student's individual frames (B, N, D) rather than clips."""
    rows = tokens.reshape(-1, tokens.shape[-1])
    return embedding_std(rows, None if padding is None else ~padding.reshape(-1))


def _check_common(cfg, path: str) -> None:
    if cfg.top_k < 1:
        raise ConfigError(f"{path}.top_k must be >= 1, found {cfg.top_k}")
    if cfg.final_norm not in _FINAL_NORMS:
        raise ConfigError(f"{path}.final_norm: {cfg.final_norm!r} is not one of {list(_FINAL_NORMS)}")
    if cfg.loss_beta < 0:
        raise ConfigError(f"{path}.loss_beta must be >= 0 (0: MSE), found {cfg.loss_beta}")


class _TeacherStudent(Method):
    """Shared by data2vec and 2.0: the EMA teacher (the transformer part of a ConvTransformer, or a
    whole ViT), its targets on the unmasked input, and the EMA step."""

    ema_pos_conv: bool  # waveform: does the teacher keep its own EMA copy of the positional conv?

    mask_mode: str  # "replace" (data2vec) or "keep" (2.0)

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(frontend=("waveform", "logmel"), encoder=("conv_transformer", "vit"), masker=cls.mask_mode,
                     segments=1)

    def __init__(self, cfg, inputs, frontend, encoder, masker=None):
        super().__init__(cfg, inputs, frontend, encoder, masker)
        self.on_patches = isinstance(encoder, ViT)
        if cfg.top_k > encoder.cfg.depth:
            raise ConfigError(f"method.top_k {cfg.top_k} exceeds encoder.depth {encoder.cfg.depth}")
        self.teacher = make_teacher(self._student_parts())
        self.teacher.eval()

    def _student_parts(self) -> nn.Module:
        """The student modules the teacher tracks (a fresh container, never registered)."""
        if self.on_patches:  # EAT: the whole encoder, its patch embedding and CLS token included
            return self.encoder
        parts = {"norm": self.encoder.norm, "blocks": self.encoder.blocks}
        if self.ema_pos_conv:
            parts = {"pos_conv": self.encoder.pos_conv, **parts}
        return nn.ModuleDict(parts)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # fairseq runs the EMA model in eval mode: no dropout, no LayerDrop
        return self

    def tau(self, step: int, max_steps: int) -> float:
        return momentum(self.cfg.ema, step, max_steps)

    def after_step(self, step: int, max_steps: int) -> None:
        ema_update(self.teacher, self._student_parts(), self.tau(step, max_steps))

    @torch.no_grad()
    def teacher_layers(self, x: Tensor, lengths: Tensor, out: EncoderOut) -> list[Tensor]:
        """Per-block FFN outputs (B, N, D) of the teacher on the unmasked input: the EMA ViT on the
        spectrogram itself, or the encoder's context network with the teacher's copies of its parts
        on the student's projected conv features (`out.local`, before input dropout and masking).
        With ALiBi (data2vec 2.0) the student's bias over all frames, as fairseq's teacher reuses
        the student's local encoder and its learned alibi scale."""
        if self.on_patches:
            return self.teacher(x, lengths, return_layers=True).ffn
        pos_conv = self.teacher["pos_conv"] if self.ema_pos_conv else self.encoder.pos_conv
        parts = (pos_conv, self.teacher["norm"], self.teacher["blocks"])
        return self.encoder.context(out.local, out.frame_padding, parts=parts, return_layers=True,
                                    unpadded=lengths is None)[3]

    def targets(self, x: Tensor, lengths: Tensor, out: EncoderOut) -> Tensor:
        """(B, N, D) float32: mean of the top-K teacher FFN outputs, each instance-normalised."""
        padding = out.frame_padding
        return losses.average_top_k_layers(self.teacher_layers(x, lengths, out), self.cfg.top_k,
                                           instance_norm=self.cfg.instance_norm_targets,
                                           final_norm=self.cfg.final_norm,
                                           padding=None if lengths is None else padding)

    def _inputs(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """-> frontend output x (normalised waveform (B, S) or log-mel (B, F, T)), lengths (B,),
        token padding (B, N)."""
        x = self.features(batch["audio"][:, 0])
        # whole crops: no lengths for the encoders to check, all-False padding made on the device
        n = math.prod(self.encoder.token_grid(x.shape))
        return x, None, torch.zeros(x.shape[0], n, dtype=torch.bool, device=x.device)


@METHODS.register("data2vec")
class Data2Vec(_TeacherStudent):
    ema_pos_conv = False  # fairseq ema_layers_only: pos_conv is copied from the student each step
    mask_mode = "replace"

    @dataclass
    class Config:
        top_k: int = 8  # average_top_k_layers
        instance_norm_targets: bool = True  # instance_norm_target_layer
        final_norm: str | None = None  # layer_norm_targets / instance_norm_targets (both off)
        loss_beta: float = 0.0  # 0: MSE (released config); > 0: smooth-L1 with this beta
        ema: EMAConfig = field(default_factory=lambda: EMAConfig(
            start=0.999, end=0.9999, schedule="linear", steps=30000))

        def __post_init__(self):
            _check_common(self, "method")

    def __init__(self, cfg: Config, inputs, frontend, encoder, masker=None):
        super().__init__(cfg, inputs, frontend, encoder, masker)
        self.final_proj = nn.Linear(encoder.dim, encoder.dim)

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        x, lengths, padding = self._inputs(batch)
        mask = self.masker(self.encoder.token_grid(x.shape), x.shape[0], None if lengths is None else padding,
                           generator)
        out = self.encoder(x, lengths, mask=mask)  # masked tokens replaced by the mask embedding
        y = self.targets(x, lengths, out)  # (B, N, D), teacher on the unmasked input
        sel = mask.masked.to(x.device) & ~padding
        # masked frames only, selected by weights: indexing by `sel` has a data-dependent shape
        pred = self.final_proj(out.tokens)
        loss = losses.regression_loss(pred, y, self.cfg.loss_beta, select=sel)
        return {"loss": loss, "target_var": token_std(y, sel), "pred_var": token_std(pred, sel),
                **embedding_signals(self.encoder.pool(out)),
                "frame_std": frame_std(out.tokens, out.padding),
                "masked_pct": sel.float().mean().detach(),
                "ema_tau": torch.full((), self.tau(step, max_steps), device=loss.device)}


class ConvDecoder(nn.Module):
    """data2vec 2.0 decoder (fairseq modalities/modules.py `Decoder1d` for audio frames,
    `Decoder2d` for image / spectrogram patches, as EAT): `layers` blocks of grouped Conv1d over
    time or Conv2d over the (freq, time) token grid (same padding) -> LayerNorm without affine ->
    GELU, each adding its input when the widths match (so every block but a first one that
    changes width), then Linear back to the input width. (N, T, D_in) or (N, Fg*Tg, D_in) in
    row-major grid order -> the same shape."""

    def __init__(self, in_dim: int, dim: int, layers: int, kernel: int, groups: int, ndim: int = 1):
        super().__init__()
        conv = nn.Conv1d if ndim == 1 else nn.Conv2d
        self.ndim = ndim
        self.convs = nn.ModuleList(conv(in_dim if i == 0 else dim, dim, kernel, padding=kernel // 2,
                                        groups=groups) for i in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim, elementwise_affine=False) for _ in range(layers))
        self.proj = nn.Linear(dim, in_dim)

    def forward(self, x: Tensor, padding: Tensor | None = None, grid: tuple[int, ...] | None = None) -> Tensor:
        n, length = x.shape[0], x.shape[1]
        shape = (length,) if self.ndim == 1 else tuple(grid)
        if len(shape) != self.ndim or shape[0] * (shape[1] if self.ndim == 2 else 1) != length:
            raise ValueError(f"decoder: {length} tokens do not fit the grid {shape}")
        for conv, norm in zip(self.convs, self.norms):
            h = zero_padded(x, padding).transpose(1, 2).reshape(n, -1, *shape)
            h = conv(h)[(..., *(slice(0, s) for s in shape))]  # an even kernel pads one too many
            h = F.gelu(norm(h.flatten(2).transpose(1, 2)))
            x = h + x if h.shape[-1] == x.shape[-1] else h
        return self.proj(x)


@METHODS.register("data2vec2")
class Data2Vec2(_TeacherStudent):
    ema_pos_conv = True  # ema_encoder_only false: the positional conv is part of the EMA teacher
    mask_mode = "keep"

    @dataclass
    class Config:
        top_k: int = 8
        instance_norm_targets: bool = True
        final_norm: str | None = None
        loss_beta: float = 0.0
        clone_batch: int = 8  # differently masked student copies per clip
        decoder_dim: int = 384
        decoder_layers: int = 4
        decoder_kernel: int = 7
        decoder_groups: int = 16
        decoder_input_dropout: float = 0.1
        mask_noise_std: float = 0.01  # hidden frames enter the decoder as N(0, std^2) noise
        cls_loss: float = 0.0  # CLS -> clip-mean-target regression (ViT with cls_token); weight per clip, summed
        ema: EMAConfig = field(default_factory=lambda: EMAConfig(
            start=0.999, end=0.99999, schedule="linear", steps=75000))

        def __post_init__(self):
            _check_common(self, "method")
            if self.clone_batch < 1:
                raise ConfigError(f"method.clone_batch must be >= 1, found {self.clone_batch}")
            if min(self.decoder_dim, self.decoder_layers, self.decoder_kernel, self.decoder_groups) < 1:
                raise ConfigError("method.decoder_dim/_layers/_kernel/_groups must be >= 1")
            if self.decoder_dim % self.decoder_groups:
                raise ConfigError(f"method.decoder_groups {self.decoder_groups} must divide "
                                  f"method.decoder_dim {self.decoder_dim}")
            if not 0.0 <= self.decoder_input_dropout < 1.0 or self.mask_noise_std < 0:
                raise ConfigError("method.decoder_input_dropout must be in [0, 1) and "
                                  "method.mask_noise_std >= 0")
            if self.cls_loss < 0:
                raise ConfigError(f"method.cls_loss must be >= 0, found {self.cls_loss}")

    def __init__(self, cfg: Config, inputs, frontend, encoder, masker=None):
        super().__init__(cfg, inputs, frontend, encoder, masker)
        if encoder.dim % cfg.decoder_groups:
            raise ConfigError(f"method.decoder_groups {cfg.decoder_groups} must divide "
                              f"encoder.dim {encoder.dim}")
        if cfg.cls_loss > 0 and not (self.on_patches and encoder.cls is not None):
            raise ConfigError("method.cls_loss needs a CLS token: encoder.name vit with cls_token: true")
        self.decoder = ConvDecoder(encoder.dim, cfg.decoder_dim, cfg.decoder_layers, cfg.decoder_kernel,
                                   cfg.decoder_groups, ndim=2 if self.on_patches else 1)

    def decoder_input(self, tokens: Tensor, mask, generator: torch.Generator) -> Tensor:
        """Visible student tokens (N, K_vis, D) -> full sequence (N, T, D): input dropout, then
        noise appended for the hidden frames and everything put back in time order."""
        x = F.dropout(tokens, self.cfg.decoder_input_dropout, self.training)
        n, k, d = x.shape
        noise = torch.randn((n, mask.restore_idx.shape[1] - k, d), generator=generator,
                            device=generator.device)
        x = torch.cat([x, (noise * self.cfg.mask_noise_std).to(device=x.device, dtype=x.dtype)], dim=1)
        return gather_tokens(x, mask.restore_idx.to(x.device))

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        x, lengths, padding = self._inputs(batch)
        K = self.cfg.clone_batch
        padding_k = padding.repeat_interleave(K, 0)  # (B*K, N), rows b*K + k
        grid = self.encoder.token_grid(x.shape)
        mask = self.masker(grid, x.shape[0] * K, None if lengths is None else padding_k, generator)
        out = self.encoder(x, lengths, mask=mask)  # (B*K, visible, D); local features computed once
        y = self.targets(x, lengths, out)  # teacher once per clip: (B, N, D)
        y_k = y.repeat_interleave(K, 0)
        pred = self.decoder(self.decoder_input(out.tokens, mask, generator), padding_k, grid)
        sel = mask.masked.to(x.device) & ~padding_k
        loss = losses.regression_loss(pred, y_k, self.cfg.loss_beta, select=sel)  # masked tokens only
        logs = {}
        if self.cfg.cls_loss > 0:  # EAT utterance loss / fairseq cls_loss: CLS -> mean target
            clip_target = masked_mean(y, padding).repeat_interleave(K, 0)
            cls = losses.regression_loss(out.cls, clip_target, self.cfg.loss_beta)  # mean over clips
            # fairseq / EAT: losses["cls"] = d2v_loss(cls_pred, cls_target) * (cls_loss * sample_size)
            # summed over its (B*K, D) elements, and the criterion divides the whole loss by
            # sample_size (the masked-token count): the CLS term is cls_loss * Σ_clips, i.e. the
            # clip mean times the number of student clips this process sees (EAT: 12 x 16 = 192)
            loss = loss + self.cfg.cls_loss * out.cls.shape[0] * cls
            logs["cls_loss"] = cls.detach()
        return {"loss": loss, "target_var": token_std(y_k, sel), "pred_var": token_std(pred, sel),
                **embedding_signals(masked_mean(out.tokens, out.padding)),
                "frame_std": frame_std(out.tokens, out.padding),
                "masked_pct": sel.float().mean().detach(),
                "ema_tau": torch.full((), self.tau(step, max_steps), device=loss.device), **logs}
