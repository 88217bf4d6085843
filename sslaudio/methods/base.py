"""The Method interface: the only thing the training loop knows.

A method is an `nn.Module` holding the frontend, the online encoder and whatever heads, teachers,
queues or memories its objective needs. It is built from its own Config, an `InputSpec` (the
training crops and the preset's view chain), the frontend, the encoder and an optional masker.
The trainer calls:
- `prepare(audio, sample)` once before the first step of a new run, with (N, S) training crops and
  `sample(count, batch)`, an iterator over `count` more crops in (<= batch, S) tensors (a larger
  sample read in bounded memory: HuBERT's k-means);
- `forward(batch, step, generator, max_steps) -> {"loss": ..., ...}`: the loss and other scalars to
  log (tensors; the trainer converts them only when it logs);
- `after_step(step, max_steps)` after each optimizer step (EMA, queues, centres);
- `param_groups(weight_decay)`: a group with `constant_lr: True` stays at optim.lr while the
  others follow the schedule (SimSiam's fix_pred_lr);
- `gather_fn`: set by a multi-process trainer to a differentiable all-gather (losses.GatherFn)
  for methods whose loss needs every process's rows; None in one process.
`inference_encoder()` is what extraction and export use; `needs(cfg)` declares which components
the method works with, checked when the preset is loaded.

A method that reads other checkpoints (HuBERT's label model of iteration 2) lists them in
`sources(cfg) -> {name: spec}`. The trainer records each source's preset in the method section as
`<name>_preset` (so the run's config holds the architecture and a resume needs no source), the
builder passes `sources={name: (frontend, encoder)}` built from it, and for a new run the trainer
loads the source's weights into the method's module `name` (a ModuleDict of frontend and encoder,
frozen); the weights then travel in every checkpoint. `run_info()` is JSON stored in every
checkpoint's state.json (HuBERT: the codebook's source, k and inertia).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sslaudio.augment import MultiCrop, ViewSampler
from sslaudio.frontends import stft_frames


@dataclass(frozen=True)
class Needs:
    """What a method requires of its preset; checked when the preset is loaded."""

    frontend: tuple[str, ...] = ()  # allowed frontend names (empty: any)
    encoder: tuple[str, ...] = ()  # allowed encoder names (empty: any)
    masker: str = "any"  # "any", "none" (no masker section), "keep" / "replace" (a masker of that mode)
    views: bool = False  # needs a `views` augmentation chain
    segments: int = 0  # waveform crops per file (0: any)


@dataclass(frozen=True)
class InputSpec:
    """What a method knows of its training input."""

    sample_rate: int
    clip_samples: int  # samples of one training crop
    segments: int = 1  # crops per file in batch["audio"] (B, segments, clip_samples)
    views: tuple = ()  # the preset's `views` augmentation chain (component sections)


class Method(nn.Module):
    frontend: nn.Module
    encoder: nn.Module
    gather_fn = None  # losses.GatherFn under several processes (set by the trainer)

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs()

    def __init__(self, cfg, inputs: InputSpec, frontend: nn.Module, encoder: nn.Module, masker=None):
        super().__init__()
        self.cfg = cfg
        self.inputs = inputs
        self.frontend = frontend
        self.encoder = encoder
        self.masker = masker
        encoder.check_crop(inputs.clip_samples, getattr(type(self), "registry_name", type(self).__name__))

    # -- helpers shared by methods ------------------------------------------------------------
    def spec_shape(self) -> tuple[int, int]:
        """(F, T) of one training crop after the frontend."""
        return self.frontend.out_channels, stft_frames(self.inputs.clip_samples, self.frontend.hop)

    def features(self, audio: Tensor) -> Tensor:
        """(N, S) waveform -> frontend output, without gradients (frontends have no weights)."""
        with torch.no_grad():
            x, _ = self.frontend(audio)
        return x

    # -- the interface ------------------------------------------------------------------------
    @classmethod
    def sources(cls, cfg) -> dict[str, str]:
        """Checkpoints the method reads (name -> run folder, step folder or encoder file)."""
        return {}

    def run_info(self) -> dict:
        """JSON-able facts about the run stored in every checkpoint's state.json."""
        return {}

    def log_warnings(self, row: dict) -> list[str]:
        """Warnings about a logged row (a collapse signal past its threshold); the trainer prints
        each and stores them in the row under "warnings"."""
        return []

    def prepare(self, audio: Tensor, sample=None) -> None:
        """Before the first step of a new run, from (N, S) training crops: the frontend's
        normalisation statistics. `sample(count, batch)` iterates over more crops (see above)."""
        self.frontend.estimate_stats(audio)

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
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
    """Base of every method that compares augmented views of a clip on log-mel input (BYOL-A,
    BYOL, SimSiam, SimCLR, MoCo, Barlow Twins, VICReg, DINO, SwAV). `crops` says how many global
    and local views it takes (augment.MultiCrop; default two global views); `self.views` samples
    them from batch["audio"] (augment.ViewSampler: one crop augmented per view, or one crop per
    view with data.segments equal to the global views)."""

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(frontend=("logmel",))

    def __init__(self, cfg, inputs: InputSpec, frontend: nn.Module, encoder: nn.Module, masker=None,
                 crops: MultiCrop | None = None):
        super().__init__(cfg, inputs, frontend, encoder, masker)
        self.views = ViewSampler(list(inputs.views), self.spec_shape(), inputs.segments, crops)

    def make_views(self, audio: Tensor, generator: torch.Generator) -> list[Tensor]:
        """batch["audio"] (B, V, S) -> the views, no grad: global (B, F, T) first, then local
        (B, F, L)."""
        B, V = audio.shape[:2]
        x = self.features(audio.flatten(0, 1))  # (B * V, F, T)
        return self.views(x.unflatten(0, (B, V)), generator)


def clip_embedding(encoder: nn.Module, x: Tensor) -> Tensor:
    """(B, F, T) view -> (B, D) pooled clip embedding."""
    return encoder.pool(encoder(x))


def multicrop_embed(encoder: nn.Module, views: list[Tensor]) -> Tensor:
    """Views [(B, F, T_v)...] -> clip embeddings (V * B, D) in view order. Consecutive views of one
    shape go through the encoder as one batch (the official DINO MultiCropWrapper / SwAV forward:
    BatchNorm statistics per group)."""
    out, i = [], 0
    while i < len(views):
        j = i + 1
        while j < len(views) and views[j].shape == views[i].shape:
            j += 1
        out.append(clip_embedding(encoder, torch.cat(views[i:j])))
        i = j
    return torch.cat(out)


def masked_column_var(rows: Tensor, select: Tensor) -> tuple[Tensor, Tensor]:
    """Unbiased per-column variance (D,) of the (N, D) `rows` where `select` (N,) is True, and their
    count, by weights rather than boolean indexing (whose data-dependent size is a host sync on a
    GPU). As Tensor.var: nan for a single row."""
    w = select.reshape(-1, 1).to(rows.dtype)
    n = w.sum()
    mean = (rows * w).sum(0) / n.clamp_min(1)
    return ((rows - mean).pow(2) * w).sum(0) / (n - 1), n


def embedding_std(z: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean per-dimension std of L2-normalised embeddings (N, D): ~1/sqrt(D) when healthy, 0 if
    collapsed. `valid` (N,) bool: only those rows (masked_column_var)."""
    z = nn.functional.normalize(z.detach().float(), dim=-1)
    if valid is None:
        return z.std(dim=0).mean()
    return masked_column_var(z, valid)[0].sqrt().mean()


def effective_dimension(z: Tensor, valid: Tensor | None = None, max_rows: int = 2048) -> Tensor:
    """Participation ratio of embeddings (N, D): (sum of the covariance eigenvalues)^2 / (sum of
    their squares) = tr(C)^2 / ||C||_F^2 for the rows centred on their mean (Gao et al. 2017; exp
    of the Renyi-2 entropy of the variance spectrum, a smooth relative of RankMe). min(N - 1, D)
    for rows with equal variance in every direction; 1 when they vary along one direction only,
    the dimensional collapse that embedding_std does not show (rows can keep a healthy
    per-dimension spread while one direction holds nearly all of it); 0 when they do not vary
    (or there are none).
    Matrix products only: no decomposition, so no convergence check that would wait on the
    device. `valid` (N,) bool: only those rows (by weights, no host sync). Of more than `max_rows`
    rows, that many evenly spaced ones are used (an estimate at a bounded cost; no random draw)."""
    z = z.detach().float()
    if z.shape[0] == 0:  # no rows (a shape the host knows): nothing varies
        return z.new_zeros(())
    if z.shape[0] > max_rows:
        pick = torch.linspace(0, z.shape[0] - 1, max_rows, device=z.device).round().long()
        z, valid = z[pick], (None if valid is None else valid.reshape(-1)[pick])
    w = torch.ones(z.shape[0], 1, device=z.device) if valid is None else valid.reshape(-1, 1).float()
    zc = (z - (z * w).sum(0) / w.sum().clamp_min(1)) * w
    zc = zc / zc.abs().amax().clamp_min(1e-30)  # the ratio is scale-free; this keeps the squares finite
    gram = zc @ zc.T if zc.shape[0] < zc.shape[1] else zc.T @ zc  # the same nonzero eigenvalues
    return gram.diagonal().sum().pow(2) / gram.pow(2).sum().clamp_min(torch.finfo(gram.dtype).tiny)


def embedding_signals(z: Tensor) -> dict[str, Tensor]:
    """The collapse signals every method logs for its embeddings (N, D): `emb_std` (embedding_std,
    0 for a constant output) and `emb_dims` (effective_dimension, 1 for variation along one
    direction only)."""
    return {"emb_std": embedding_std(z), "emb_dims": effective_dimension(z)}
