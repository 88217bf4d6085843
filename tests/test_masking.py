"""Maskers: determinism from the generator, exact ratios, span statistics, padding, keep mode."""

from __future__ import annotations

import pytest
import torch

import sslaudio.masking  # noqa: F401  (registers the maskers)
from sslaudio.config import ConfigError, build_component
from sslaudio.masking import Mask
from sslaudio.registry import MASKERS
from tests.conftest import gen, true_runs

# a 2-D patch grid for patch maskers, a 1-D frame grid for span maskers
GRIDS = {"none": (5, 40), "random": (5, 40), "span": (120,), "block": (8, 60), "inverse_block": (5, 40)}


def build(name: str, **fields):
    return build_component(MASKERS, {"name": name, **fields}, "masker")


def suffix_padding(valid: list[int], grid: tuple[int, ...]) -> torch.Tensor:
    """(B, N) padding for a (T,) or (F, T) grid with `valid` time steps per row."""
    t = grid[-1]
    cols = torch.arange(t)[None, :] >= torch.tensor(valid)[:, None]
    f = grid[0] if len(grid) == 2 else 1
    return cols[:, None, :].expand(-1, f, -1).reshape(len(valid), -1)


@pytest.mark.parametrize("name", MASKERS.names())
def test_same_seed_same_mask_and_keep_mode_is_consistent(name):
    grid = GRIDS.get(name, (5, 40))
    m = build(name, mode="keep")
    pad = suffix_padding([grid[-1], grid[-1] - 7, grid[-1] // 2, grid[-1]], grid)
    a, b = m(grid, 4, pad, gen(1)), m(grid, 4, pad, gen(1))
    assert torch.equal(a.masked, b.masked) and torch.equal(a.keep_idx, b.keep_idx)
    n = pad.shape[1]
    assert a.masked.shape == (4, n) and a.masked.dtype == torch.bool
    n_keep = (~a.masked).sum(1)
    assert bool((n_keep == n_keep[0]).all()) and a.keep_idx.shape == (4, int(n_keep[0]))
    if name != "none":
        c = m(grid, 4, pad, gen(2))
        assert not torch.equal(a.masked, c.masked)


@pytest.mark.parametrize("name", ["random", "span", "block", "inverse_block"])
def test_multi_mask_gives_k_different_masks_per_sample(name):
    grid, B, K = GRIDS[name], 2, 4
    pad = suffix_padding([grid[-1], grid[-1] - 10], grid).repeat_interleave(K, 0)
    m = build(name)(grid, B * K, pad, gen(3)).masked.view(B, K, -1)
    for b in range(B):
        rows = {tuple(r.tolist()) for r in m[b]}
        assert len(rows) == K


def test_random_ratio_is_exact_and_padding_is_hidden_first():
    for n_t, ratio in [(40, 0.7), (37, 0.6), (13, 0.5)]:
        mask = build("random", ratio=ratio)((5, n_t), 6, None, gen())
        assert bool((mask.masked.sum(1) == int(5 * n_t * ratio + 0.5)).all())
    pad = suffix_padding([40, 20], (5, 40))
    mask = build("random", ratio=0.7)((5, 40), 2, pad, gen())
    assert bool(mask.masked[pad].all())  # 100 padded tokens < 140 hidden: every one hidden


def test_keep_mode_restore_idx_unshuffles():
    mask = build("random", ratio=0.6)((4, 10), 3, None, gen(5))
    tokens = torch.arange(40).repeat(3, 1)
    visible = torch.gather(tokens, 1, mask.keep_idx)
    hidden = tokens[mask.masked].view(3, -1)
    assert torch.equal(torch.gather(torch.cat([visible, hidden], 1), 1, mask.restore_idx), tokens)
    assert not bool(torch.gather(mask.masked, 1, mask.keep_idx).any())


def test_span_masks_about_49_percent_for_p065_len10():
    # fairseq semantics: 0.065 * T span starts of 10 frames, overlapping -> 1 - (1 - 0.065)^10 ~ 0.49
    mask = build("span", p=0.65, length=10, require_same_masks=False)((2000,), 32, None, gen(7))
    assert abs(mask.masked.float().mean().item() - 0.49) < 0.015
    same = build("span", p=0.65, length=10)((2000,), 32, None, gen(7)).masked
    counts = same.sum(1)
    assert bool((counts == counts[0]).all()) and 0.42 < counts[0].item() / 2000 < 0.49


def test_span_never_crosses_padding_and_spans_are_whole():
    valid = [300, 171, 90, 12, 5]
    pad = suffix_padding(valid, (300,))
    mask = build("span", p=0.65, length=10, require_same_masks=False)((300,), 5, pad, gen(11)).masked
    assert not bool((mask & pad).any())
    for i, v in enumerate(valid):
        for start, length in true_runs(mask[i]):
            assert start + length <= v
            if v > 20:  # fairseq: starts < valid - length, so spans are never clipped
                assert length >= 10
    # min_spans: even short rows get masked
    assert mask[3].sum() > 0


def test_block_masker_whole_columns_ratio_and_freq_band():
    grid = (8, 100)
    mask = build("block", ratio=0.65, length=5, overlap=False)(grid, 4, None, gen(2)).masked.view(4, 8, 100)
    assert bool((mask == mask[:, :1]).all())  # every frequency row of a column alike
    assert bool((mask[:, 0].sum(1) == 65).all())  # 13 non-overlapping blocks of 5
    for row in mask[:, 0]:
        assert all(length % 5 == 0 for _, length in true_runs(row))
    tera = build("block", ratio=0.15, length=7, freq_ratio=0.25)
    m = tera(grid, 16, suffix_padding([100] * 8 + [60] * 8, grid), gen(4)).masked.view(16, 8, 100)
    assert not bool(m[8:, :, 60:].any())
    cols = m.all(1)  # time blocks
    band = (m & ~cols[:, None, :]).any(2)  # (B, F) rows hidden outside time blocks
    assert int(band.sum(1).max()) <= 2 and int(band.sum(1).max()) >= 1
    for b in range(16):
        assert len(true_runs(band[b])) <= 1
    assert 0.05 < cols[:8].float().mean().item() <= 0.15


def test_inverse_block_keeps_exact_visible_blocks():
    mask = build("inverse_block", ratio=0.8, block=3)((8, 40), 4, None, gen(6))
    assert bool(((~mask.masked).sum(1) == int(320 * 0.2 + 1e-9)).all())
    one_d = build("inverse_block", ratio=0.5, block=5, mode="replace")((400,), 4, None, gen(6)).masked
    visible = ~one_d
    neighbour = visible[:, :-2] & (visible[:, 1:-1]) & visible[:, 2:]
    # blocks of 5: most visible frames sit inside a visible run, unlike i.i.d. choice (~25 %)
    assert neighbour.sum().item() / visible[:, 1:-1].sum().item() > 0.5


def test_mask_from_masked_rejects_unequal_keep_rows():
    with pytest.raises(ValueError, match="same number"):
        Mask.from_masked(torch.tensor([[True, False], [True, True]]), "keep")


@pytest.mark.parametrize("section", [
    {"name": "random", "ratio": 1.0},
    {"name": "span", "mode": "keep", "require_same_masks": False},
    {"name": "block", "length": 0},
    {"name": "random", "mode": "drop"},
    {"name": "span", "prob": 0.5},
])
def test_bad_configs_raise_config_error(section):
    with pytest.raises(ConfigError):
        build_component(MASKERS, section, "masker")


@pytest.mark.parametrize("name", MASKERS.names())
def test_hidden_rows_select_what_boolean_indexing_selects(name):
    """The gather index of the hidden, unpadded tokens (built on the host) picks the rows that
    `x[masked & ~padding]` picks, in the same order; span masks carry their host copy."""
    grid = GRIDS[name]
    n = grid[0] * grid[1] if len(grid) == 2 else grid[0]
    pad = suffix_padding([grid[-1], grid[-1] - 7, grid[-1] // 2], grid)
    mask = build(name)(grid, 3, pad, gen(4))
    assert (mask.host is not None) == (name == "span")
    if mask.host is not None:
        assert mask.host.device.type == "cpu" and torch.equal(mask.host, mask.masked)
    x = torch.randn(3, n, 2, generator=gen(5))
    sel = mask.masked & ~pad
    rows, counts = mask.hidden_rows(pad)
    assert torch.equal(x.flatten(0, 1)[rows], x[sel])
    assert counts.tolist() == sel.sum(1).tolist()


def test_from_host_keep_mode_checks_counts_on_the_host():
    rows = torch.tensor([[True, False, True, False], [False, True, True, False]])
    mask = Mask.from_host(rows, "keep", torch.device("cpu"))
    assert mask.keep_idx.tolist() == [[1, 3], [0, 3]] and mask.host is rows
    with pytest.raises(ValueError, match="same number of visible tokens"):
        Mask.from_host(torch.tensor([[True, False], [False, False]]), "keep", torch.device("cpu"))


HIDES_NOTHING = {"none": {}, "random": {"ratio": 0.0}, "span": {"p": 0.0, "min_spans": 0},
                 "block": {"ratio": 0.0, "freq_ratio": 0.0}, "inverse_block": {"ratio": 0.0}}
HIDES_SOME = {"random": {"ratio": 0.3}, "span": {"p": 0.0, "min_spans": 1}, "block": {"ratio": 0.0, "freq_ratio": 0.2},
              "inverse_block": {"ratio": 0.3}}


@pytest.mark.parametrize("name", MASKERS.names())
def test_hides_nothing_names_exactly_the_settings_that_hide_no_frame(name):
    # the loader refuses a masked-prediction preset whose masker hides nothing on this verdict
    grid = GRIDS.get(name, (5, 40))
    m = build(name, **HIDES_NOTHING[name])
    assert m.cfg.hides_nothing() and not m(grid, 4, None, gen(0)).masked.any()
    if name in HIDES_SOME:
        m = build(name, **HIDES_SOME[name])
        assert m.cfg.hides_nothing() is None and m(grid, 4, None, gen(0)).masked.any()


def test_inverse_block_refuses_an_adjust_that_leaves_a_negative_count_of_blocks():
    with pytest.raises(ConfigError, match=r"^masker\.adjust must be >= -0\.2, found -1\.0$"):
        build("inverse_block", ratio=0.8, adjust=-1.0)
    assert build("inverse_block", ratio=0.8, adjust=-0.2)((5, 40), 2, None, gen(0)).masked.any()  # the edge works
