"""The Method interface: the only thing the training loop knows.

A method is an `nn.Module` holding the frontend, the online encoder and whatever heads, teachers,
queues or memories its objective needs. `forward(batch, step, generator) -> {"loss": ..., ...}`
returns the loss and other scalars to log (tensors; the trainer converts them only when it logs).
`after_step(step, max_steps)` runs after each optimizer step (EMA, queues, centres).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sslaudio.augment import ViewChain, ViewSampler
from sslaudio.config import Preset


@dataclass(frozen=True)
class Needs:
    """What a method requires of its preset; checked before training starts."""

    frontend: tuple[str, ...] = ()  # allowed frontend names (empty: any)
    masker: bool = False
    views: bool = False
    segments: int = 0  # waveform crops per file (0: any)


class Method(nn.Module):
    frontend: nn.Module
    encoder: nn.Module

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs()

    def __init__(self, cfg, preset: Preset, frontend: nn.Module, encoder: nn.Module, masker=None):
        super().__init__()
        self.cfg = cfg
        self.preset = preset
        self.frontend = frontend
        self.encoder = encoder
        self.masker = masker

    # -- helpers shared by methods ------------------------------------------------------------
    def spec_shape(self) -> tuple[int, int]:
        """(F, T) of one training crop after the frontend."""
        n = int(round(self.preset.data.clip_seconds * self.preset.data.sample_rate))
        return self.frontend.out_channels, n // self.frontend.hop + 1

    def build_views(self) -> ViewChain:
        return ViewChain(self.preset.views or [], self.spec_shape())

    def features(self, audio: Tensor) -> Tensor:
        """(N, S) waveform -> frontend output, without gradients (frontends have no weights)."""
        with torch.no_grad():
            x, _ = self.frontend(audio)
        return x

    # -- the interface ------------------------------------------------------------------------
    def forward(self, batch: dict, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        raise NotImplementedError

    def after_step(self, step: int, max_steps: int) -> None:
        """Called after every optimizer step (EMA updates, queues, ...)."""

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Trainable parameters; biases and norm weights (ndim <= 1) get no weight decay."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def inference_encoder(self) -> nn.Module:
        """The encoder used for extraction and export (the online one unless the paper says so)."""
        return self.encoder


class ViewMethod(Method):
    """Base of the methods that compare augmented views of a clip on log-mel input (SimSiam,
    SimCLR, MoCo, Barlow Twins, VICReg): `self.views` samples them (augment.ViewSampler: one crop
    augmented per view, or one crop per view with data.segments 2), and `gather_fn` is the hook a
    multi-process trainer sets to gather embeddings across processes (losses.GatherFn)."""

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(frontend=("logmel",))

    def __init__(self, cfg, preset: Preset, frontend: nn.Module, encoder: nn.Module, masker=None):
        super().__init__(cfg, preset, frontend, encoder, masker)
        self.views = ViewSampler.for_method(self)
        self.gather_fn = None  # None: single process


def embedding_std(z: Tensor) -> Tensor:
    """Mean per-dimension std of L2-normalised embeddings: ~1/sqrt(D) when healthy, 0 if collapsed."""
    z = nn.functional.normalize(z.detach().float(), dim=-1)
    return z.std(dim=0).mean()
