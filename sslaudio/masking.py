"""Masks and maskers.

A masker draws, for a token grid (T,) or (F, T) flattened row-major, which tokens are hidden:
`masker(grid, batch, padding, generator) -> Mask`. Every draw comes from the passed
`torch.Generator` (on CPU or CUDA; masks end up on `generator.device`), so a resumed run draws
the same masks. The span masker draws on the host, as fairseq's numpy `compute_mask_indices`
does: its per-row hidden counts are random, and knowing them on the host (`Mask.host`) lets the
methods select the hidden tokens without reading a count back from the GPU (see
`host_generator`).

`Mask.masked` (B, N) is True where a token is hidden. In keep mode (MAE / M2D / data2vec 2.0)
the encoder drops hidden tokens; this needs the same number of visible tokens per row, and
`keep_idx` (B, N_keep) / `restore_idx` (B, N) give the gather and un-shuffle indices.
In replace mode (wav2vec 2.0 / HuBERT / data2vec) hidden tokens are swapped for a learned vector.

Maskers: "none", "random" (MAE / M2D patches), "span" (wav2vec 2.0 / HuBERT / data2vec, fairseq
`compute_mask_indices`; also ATST-Frame's "block" masks, which the official code draws with fairseq's
overlapping spans), "block" (time / frequency blocks: TERA), "inverse_block"
(data2vec 2.0: visible blocks, the rest hidden). Padding (B, N) marks tokens that are padding;
padding is assumed to be a suffix in time. In keep mode every masker equalises the hidden count
across rows (hiding or revealing random tokens as fairseq's `require_same_masks` does).

Multi-mask (data2vec 2.0 `clone_batch`): call any masker with batch B*K (and padding
`padding.repeat_interleave(K, 0)`); rows b*K .. b*K+K-1 are K independent masks of sample b,
and the encoders accept such a mask for a batch of B inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from sslaudio.config import ConfigError, check_range
from sslaudio.registry import MASKERS


@dataclass
class Mask:
    masked: Tensor  # (B, N) bool, True = hidden
    mode: Literal["keep", "replace"] = "replace"
    keep_idx: Tensor | None = None  # (B, N_keep) long, keep mode only
    restore_idx: Tensor | None = None  # (B, N) long, keep mode only
    host: Tensor | None = None  # (B, N) bool on the CPU: `masked` as drawn on the host, if it was

    def hidden_rows(self, padding: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The hidden tokens that are not padding, worked out once on the host: (M,) long flat
        (row-major) positions on `masked`'s device, the rows `x.flatten(0, 1)[(masked &
        ~padding).flatten()]` selects (so gathering with them equals boolean indexing), and (B,)
        long counts per row on the CPU. With a host copy (span masks) nothing is read from the
        device; otherwise the mask is read back once (a host sync on a GPU)."""
        sel = self.masked.cpu() if self.host is None else self.host
        if padding is not None:
            sel = sel & ~padding.cpu()
        return to_device(sel.flatten().nonzero().flatten(), self.masked.device), sel.sum(1)

    @staticmethod
    def from_host(masked: Tensor, mode: Literal["keep", "replace"], device: torch.device) -> "Mask":
        """A Mask from a boolean matrix drawn on the host: its counts are read there (keep mode
        needs no device read) and it is copied to `device` without waiting for the device."""
        counts = masked.sum(1)
        if mode == "keep" and masked.shape[0] and not bool((counts == counts[0]).all()):
            raise ValueError("keep-mode masks need the same number of visible tokens in every row")
        n_hidden = int(counts[0]) if masked.shape[0] else 0
        mask = Mask.from_masked(to_device(masked, device), mode, n_hidden)
        mask.host = masked
        return mask

    @staticmethod
    def from_masked(masked: Tensor, mode: Literal["keep", "replace"], n_hidden: int | None = None) -> "Mask":
        """Build a Mask from a boolean matrix; keep mode requires equal visible counts per row.
        `n_hidden`: the hidden count of every row when the masker knows it on the host; then keep
        mode needs no check or count read from the device (no host sync on a GPU)."""
        if mode == "replace":
            return Mask(masked=masked, mode=mode)
        if n_hidden is not None:
            k = masked.shape[1] - n_hidden
        else:
            n_keep = (~masked).sum(1)
            if masked.shape[0] and not bool((n_keep == n_keep[0]).all()):
                raise ValueError("keep-mode masks need the same number of visible tokens in every row")
            k = int(n_keep[0]) if masked.shape[0] else 0
        # stable sort puts visible tokens (0) first in their original order, then hidden ones
        order = torch.sort(masked.to(torch.int8), dim=1, stable=True).indices
        restore = torch.argsort(order, dim=1)
        return Mask(masked=masked, mode=mode, keep_idx=order[:, :k], restore_idx=restore)


class Masker:
    """Base class: subclasses implement `__call__(grid, batch, padding, generator) -> Mask`."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self, grid: tuple[int, ...], batch: int, padding: Tensor | None,
                 generator: torch.Generator) -> Mask:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# helpers (all vectorised over the batch)


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a host tensor to `device` without making the host wait for the device: through
    pinned memory on CUDA (a copy from pageable memory can block until the stream drains)."""
    device = torch.device(device)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def host_generator(generator: torch.Generator) -> torch.Generator:
    """A CPU generator for draws whose results the host needs (random counts), made from a device
    generator without reading the device: a CUDA generator's seed and Philox offset live on the
    host. The offset is advanced, so every call in a step gets its own stream, and a resumed run
    (which re-seeds the step's generator) draws the same. A CPU generator is returned as is, so
    CPU runs draw exactly what they drew before the span masker moved to the host."""
    if generator.device.type == "cpu":
        return generator
    try:
        offset = generator.get_offset()
        generator.set_offset(offset + 4)  # Philox offsets advance in multiples of 4
    except (RuntimeError, NotImplementedError, AttributeError):  # a generator without an offset
        offset = 0
    seed = (generator.initial_seed() * 0x9E3779B97F4A7C15 + offset + 1) % (2 ** 63)
    return torch.Generator().manual_seed(seed)


def _prepare(grid: tuple[int, ...], batch: int, padding: Tensor | None,
             generator: torch.Generator) -> tuple[int, torch.device, Tensor]:
    """-> (N tokens, device, padding (B, N) bool on the generator's device, all False if None)."""
    n = math.prod(int(g) for g in grid)
    device = generator.device
    if padding is None:
        return n, device, torch.zeros(batch, n, dtype=torch.bool, device=device)
    if tuple(padding.shape) != (batch, n):
        raise ValueError(f"masker: padding shape {tuple(padding.shape)} does not match (batch, tokens) "
                         f"= ({batch}, {n}) for grid {tuple(grid)}")
    return n, device, padding.to(device=device, dtype=torch.bool)


def _rand(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device)


def _first_k(key: Tensor, k: Tensor | int) -> Tensor:
    """(B, N) bool: True at the k (per row, (B,) or int) positions with the smallest `key`."""
    order = key.argsort(dim=1)
    k = k if isinstance(k, int) else k.reshape(-1, 1)  # a host int stays one (no copy to the device)
    rank_ok = (torch.arange(key.shape[1], device=key.device)[None, :] < k).expand_as(key)
    return torch.zeros_like(key, dtype=torch.bool).scatter(1, order, rank_ok)


def _spans(starts: Tensor, length: int) -> Tensor:
    """(B, W) bool span starts -> (B, W) bool, True within `length` steps after any start."""
    c = F.pad(starts.to(torch.int32).cumsum(1), (length, 0))
    return (c[:, length:] - c[:, :-length]) > 0


def _draw_starts(n_starts: Tensor, n_choices: Tensor, width: int, generator: torch.Generator) -> Tensor:
    """Per row, `n_starts` distinct positions in [0, n_choices) (without replacement) -> (B, width)."""
    B = n_starts.shape[0]
    key = _rand((B, width), generator)
    outside = torch.arange(width, device=key.device)[None, :] >= n_choices[:, None]
    return _first_k(key.masked_fill(outside, 2.0), n_starts)


def _equalise(masked: Tensor, valid: Tensor, generator: torch.Generator, grow: bool = False) -> Tensor:
    """Make every row hide the same number of tokens: randomly reveal hidden tokens down to the
    batch minimum, or (grow) hide extra random valid tokens up to the batch maximum."""
    counts = masked.sum(1)
    if masked.shape[0] == 0:
        return masked
    # no shortcut for rows that already agree: testing that would read the counts on the host
    key = _rand(tuple(masked.shape), generator)
    if grow:  # hidden first, then random valid tokens, padding last
        key = torch.where(masked, key - 2.0, torch.where(valid, key, key + 2.0))
        return _first_k(key, counts.max())
    return _first_k(torch.where(masked, key, key + 2.0), counts.min())


def _time_view(grid: tuple[int, ...]) -> tuple[int, int]:
    """(T,) -> (1, T); (F, T) -> (F, T)."""
    if len(grid) == 1:
        return 1, int(grid[0])
    if len(grid) == 2:
        return int(grid[0]), int(grid[1])
    raise ValueError(f"masker: expected a (T,) or (F, T) grid, found {tuple(grid)}")


def _check_mode(mode: str, path: str) -> None:
    if mode not in ("keep", "replace"):
        raise ConfigError(f"{path}.mode: {mode!r} is not one of ['keep', 'replace']")


# --------------------------------------------------------------------------------------------
# maskers


@MASKERS.register("none")
class NoMasker(Masker):
    """Hides nothing (methods that take a masker but should see every token)."""

    @dataclass
    class Config:
        mode: Literal["keep", "replace"] = "replace"

        def hides_nothing(self) -> str | None:
            return "masker 'none'"

    def __call__(self, grid, batch, padding, generator) -> Mask:
        n, device, _ = _prepare(grid, batch, padding, generator)
        return Mask.from_masked(torch.zeros(batch, n, dtype=torch.bool, device=device), self.cfg.mode, 0)


@MASKERS.register("random")
class RandomMasker(Masker):
    """MAE random patch masking (He et al. 2022), M2D ratio 0.7 (Niizumi et al. 2023): hide exactly
    round(N * ratio) tokens per row, chosen by sorting per-token uniform noise. Padding tokens are
    hidden first, so visible tokens are real ones whenever possible."""

    @dataclass
    class Config:
        ratio: float = 0.7
        mode: Literal["keep", "replace"] = "keep"

        def __post_init__(self):
            if not 0.0 <= self.ratio < 1.0:
                raise ConfigError(f"masker.ratio must be in [0, 1), found {self.ratio}")
            _check_mode(self.mode, "masker")

        def hides_nothing(self) -> str | None:
            return "masker.ratio 0" if self.ratio == 0 else None

    def __call__(self, grid, batch, padding, generator) -> Mask:
        n, _, pad = _prepare(grid, batch, padding, generator)
        n_hide = int(math.floor(n * self.cfg.ratio + 0.5))
        key = _rand((batch, n), generator) - pad.float()  # padding sorts first -> hidden first
        masked = _first_k(key, n_hide)
        return Mask.from_masked(masked, self.cfg.mode, n_hide)


@MASKERS.register("span")
class SpanMasker(Masker):
    """wav2vec 2.0 span masking (Baevski et al. 2020), fairseq `compute_mask_indices` with
    mask_type "static": per row, num_spans = max(min_spans, int(p * valid_len / length + U[0,1)))
    span starts drawn without replacement from [0, valid_len - length), spans of `length` steps
    that may overlap and never reach padding. p 0.65 / length 10 hides about 49 % of the frames.
    `require_same_masks` reveals random hidden steps down to the batch minimum count (fairseq);
    `add_masks` instead hides random extra valid steps up to the maximum (data2vec 2.0 option).
    `min_spans` is 2 in fairseq wav2vec 2.0 / HuBERT / data2vec, 1 in data2vec 2.0."""

    @dataclass
    class Config:
        p: float = 0.65
        length: int = 10
        min_spans: int = 2
        require_same_masks: bool = True
        add_masks: bool = False
        mode: Literal["keep", "replace"] = "replace"

        def __post_init__(self):
            if not 0.0 <= self.p <= 1.0:
                raise ConfigError(f"masker.p must be in [0, 1], found {self.p}")
            if self.length < 1 or self.min_spans < 0:
                raise ConfigError("masker.length must be >= 1 and masker.min_spans >= 0")
            _check_mode(self.mode, "masker")
            if self.mode == "keep" and not self.require_same_masks:
                raise ConfigError("masker.require_same_masks must be true in keep mode "
                                  "(every row needs the same number of visible tokens)")

        def hides_nothing(self) -> str | None:
            return "masker.p 0 with min_spans 0" if self.p == 0 and self.min_spans == 0 else None

    def __call__(self, grid, batch, padding, generator) -> Mask:
        cfg = self.cfg
        target = generator.device
        # drawn on the host (fairseq draws these masks with numpy): the counts are random and the
        # methods need them; padding is read back only for padded batches (training crops have none)
        generator = host_generator(generator)
        n, device, pad = _prepare(grid, batch, None if padding is None else padding.cpu(), generator)
        valid_len = (~pad).sum(1)
        u = _rand((batch,), generator)
        n_spans = (cfg.p * valid_len.double() / cfg.length + u.double()).floor().long()
        n_spans = n_spans.clamp_min(cfg.min_spans)
        # fairseq: starts in [0, sz - length); if that leaves too few choices, widen to n_spans + 1
        n_choices = valid_len - cfg.length
        n_choices = torch.where(n_choices <= n_spans, n_spans + 1, n_choices)
        # candidate starts per row: n_choices <= max(valid_len - length, n_spans + 1), and n_spans
        # <= max(min_spans, floor(p * n / length) + 1) since U < 1: a bound known on the host
        most_spans = max(cfg.min_spans, math.floor(cfg.p * n / cfg.length) + 1)
        width = max(n, most_spans + 1)
        starts = _draw_starts(n_spans, n_choices, width, generator)
        pos = torch.arange(width, device=device)[None, :]
        masked = (_spans(starts, cfg.length) & (pos < valid_len[:, None]))[:, :n]
        if cfg.require_same_masks:
            masked = _equalise(masked, ~pad, generator, grow=cfg.add_masks)
        return Mask.from_host(masked, cfg.mode, target)


@MASKERS.register("block")
class BlockMasker(Masker):
    """Time blocks (and an optional frequency band) on a (T,) or (F, T) grid.

    Time: round(ratio * valid_T / length) blocks of `length` whole time columns. overlap=True
    (TERA, Liu et al. 2021): starts drawn without replacement from [0, valid_T - length), blocks may
    overlap, so fewer than ratio * T columns may be hidden; overlap=False: blocks placed uniformly
    without overlapping, hiding the ratio up to rounding.
    Frequency (2-D grids, TERA): one band of U{0..floor(freq_ratio * F)} consecutive rows hidden at
    every time step. TERA: ratio 0.15, length 7, freq_ratio 0.2. (ATST-Frame's block masks are the
    official code's fairseq spans: the "span" masker, p 0.65, length 5, overlapping.)
    """

    @dataclass
    class Config:
        ratio: float = 0.15
        length: int = 7
        overlap: bool = True
        freq_ratio: float = 0.0
        mode: Literal["keep", "replace"] = "replace"

        def __post_init__(self):
            if not 0.0 <= self.ratio < 1.0 or not 0.0 <= self.freq_ratio < 1.0:
                raise ConfigError("masker.ratio and masker.freq_ratio must be in [0, 1)")
            if self.length < 1:
                raise ConfigError(f"masker.length must be >= 1, found {self.length}")
            _check_mode(self.mode, "masker")

        def hides_nothing(self) -> str | None:
            return "masker.ratio and freq_ratio 0" if self.ratio == 0 and self.freq_ratio == 0 else None

    def __call__(self, grid, batch, padding, generator) -> Mask:
        cfg = self.cfg
        target = generator.device
        if cfg.mode == "keep":
            # keep mode needs the equalised hidden count, which is random: drawn on the host (as the
            # span masker) so that no count is read back from the device. A CPU generator is used as
            # is, so CPU runs draw what they drew before.
            generator = host_generator(generator)
            padding = None if padding is None else padding.cpu()
        n, device, pad = _prepare(grid, batch, padding, generator)
        nf, nt = _time_view(grid)
        if cfg.freq_ratio > 0 and len(grid) == 1:
            raise ValueError("block masker: freq_ratio needs an (F, T) grid, found a 1-D grid")
        col_pad = pad.view(batch, nf, nt).all(1)  # (B, T) padded time columns
        valid_t = (~col_pad).sum(1)
        n_blocks = torch.floor(cfg.ratio * valid_t.double() / cfg.length + 0.5).long()
        pos = torch.arange(nt, device=device)[None, :]
        if cfg.overlap:
            n_choices = (valid_t - cfg.length).clamp_min(1)
            starts = _draw_starts(n_blocks.clamp(max=n_choices), n_choices, nt, generator)
        else:
            # choose n slots among valid_T - n*(length-1), sort, shift the i-th by i*(length-1)
            n_blocks = n_blocks.clamp(max=valid_t // cfg.length)
            n_slots = valid_t - n_blocks * (cfg.length - 1)
            chosen = _draw_starts(n_blocks, n_slots, nt, generator)
            rank = chosen.long().cumsum(1) - 1
            shifted = (pos + rank * (cfg.length - 1)).masked_fill(~chosen, nt)
            starts = torch.zeros(batch, nt + 1, dtype=torch.bool, device=device)
            starts = starts.scatter(1, shifted.clamp(max=nt), True)[:, :nt]
        cols = _spans(starts, cfg.length) & ~col_pad  # (B, T)
        masked = cols[:, None, :].expand(-1, nf, -1)
        if cfg.freq_ratio > 0:
            max_w = int(math.floor(cfg.freq_ratio * nf))
            w = (_rand((batch,), generator) * (max_w + 1)).floor().long()
            f0 = (_rand((batch,), generator) * (nf - w + 1).double()).floor().long()
            rows = torch.arange(nf, device=device)[None, :]
            band = (rows >= f0[:, None]) & (rows < (f0 + w)[:, None])  # (B, F)
            masked = masked | (band[:, :, None] & ~col_pad[:, None, :])
        masked = masked.reshape(batch, n)
        if cfg.mode == "keep":
            return Mask.from_host(_equalise(masked, ~pad, generator), cfg.mode, target)
        return Mask.from_masked(masked, cfg.mode)


@MASKERS.register("inverse_block")
class InverseBlockMasker(Masker):
    """data2vec 2.0 inverse block masking (Baevski et al. 2023, fairseq `compute_block_mask_2d`
    with inverse_mask): the *visible* tokens are blocks of block x block tokens (spans of `block`
    frames on a 1-D grid) around random centres, numbered int(N_valid * (1 - ratio + adjust) /
    block_area); then exactly int(N * (1 - ratio)) tokens per row are kept visible (random ones
    added or removed, padding last) and everything else is hidden. data2vec 2.0 images: ratio 0.8,
    block 3, adjust 0.07."""

    @dataclass
    class Config:
        ratio: float = 0.8  # hidden fraction
        block: int = 3
        adjust: float = 0.07  # mask_prob_adjust: extra centres, compensating block overlap
        mode: Literal["keep", "replace"] = "keep"

        def __post_init__(self):
            if not 0.0 <= self.ratio < 1.0:
                raise ConfigError(f"masker.ratio must be in [0, 1), found {self.ratio}")
            if self.block < 1:
                raise ConfigError(f"masker.block must be >= 1, found {self.block}")
            # a negative count of block centres crashed the first step
            check_range("masker.adjust", self.adjust, low=self.ratio - 1 - 1e-9)  # 1e-9: 0.8 - 1 != -0.2
            _check_mode(self.mode, "masker")

        def hides_nothing(self) -> str | None:
            return "masker.ratio 0" if self.ratio == 0 else None

    def __call__(self, grid, batch, padding, generator) -> Mask:
        cfg = self.cfg
        n, device, pad = _prepare(grid, batch, padding, generator)
        nf, nt = _time_view(grid)
        bf, bt = (1 if len(grid) == 1 else cfg.block), cfg.block
        valid = ~pad
        valid_t = (~pad.view(batch, nf, nt).all(1)).sum(1)  # (B,)
        n_valid = valid.sum(1)
        # at least 0: 1 - ratio + adjust may round to just below 0 at the lowest adjust the config takes
        n_centres = (n_valid.double() * (1.0 - cfg.ratio + cfg.adjust) / (bf * bt)).floor().long().clamp_min(0)
        # the most centres any row can have (all tokens valid): known on the host, no sync
        cmax = max(0, math.floor(n * (1.0 - cfg.ratio + cfg.adjust) / (bf * bt))) if batch else 0
        # centres drawn with replacement inside each row's valid (F, valid_T) region
        cf = (_rand((batch, cmax), generator) * nf).floor().long()
        ct = (_rand((batch, cmax), generator) * valid_t[:, None].double()).floor().long()
        used = torch.arange(cmax, device=device)[None, :] < n_centres[:, None]
        seeds = torch.zeros(batch, nf * nt + 1, device=device)
        flat = torch.where(used, cf * nt + ct, nf * nt)
        seeds = seeds.scatter(1, flat, 1.0)[:, : nf * nt].view(batch, 1, nf, nt)
        # grow every centre into a block covering offsets [-(b//2), b - 1 - b//2] (fairseq)
        ofs_f, ofs_t = bf // 2, bt // 2
        seeds = F.pad(seeds, (bt - 1 - ofs_t, ofs_t, bf - 1 - ofs_f, ofs_f))
        visible = F.max_pool2d(seeds, (bf, bt), stride=1).view(batch, n) > 0
        target = int(n * (1.0 - cfg.ratio) + 1e-9)
        key = _rand((batch, n), generator) + (~visible).float() + 2.0 * pad.float()
        visible = _first_k(key, target)
        return Mask.from_masked(~visible, cfg.mode, n - target)
