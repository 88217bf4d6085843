"""View augmentations and the view sampler: shapes, determinism from the generator, the sizes and
ranges each augmentation promises, and the segments / multi-crop rules of ViewSampler."""

from __future__ import annotations

import pytest
import torch

from sslaudio.augment import MultiCrop, ViewChain, ViewSampler, random_time_crop
from sslaudio.config import ConfigError, build_component
from sslaudio.registry import AUGMENTS
from tests.conftest import gen

SHAPE = (16, 40)  # (F, T)
NAMES = ["mixup", "rrc", "rlf", "gain", "noise", "tf_mask"]


def spec(B: int = 6, seed: int = 1, shape=SHAPE) -> torch.Tensor:
    return torch.randn(B, *shape, generator=gen(seed))


def build(name: str, **fields):
    return build_component(AUGMENTS, {"name": name, **fields}, "views[0]", shape=SHAPE)


def run_twice(name: str, seed: int) -> torch.Tensor:
    """A fresh augmentation applied twice (mixup needs a filled memory to change anything)."""
    aug, g = build(name), gen(seed)
    aug(spec(seed=10), g)
    return aug(spec(), g)


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_and_determinism(name):
    x = spec()
    y = build(name)(x, gen(0))
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    assert torch.equal(run_twice(name, 0), run_twice(name, 0))
    assert not torch.equal(run_twice(name, 0), run_twice(name, 1))


@pytest.mark.parametrize("name", NAMES)
def test_each_sample_gets_its_own_draw(name):
    x = spec(B=1).expand(6, *SHAPE).contiguous()  # six copies of one clip
    aug, g = build(name), gen(0)
    aug(spec(seed=10), g)  # fill mixup's memory
    y = aug(x, g)
    assert not all(torch.equal(y[0], y[i]) for i in range(1, 6))


def test_gain_is_a_constant_offset_in_range():
    x = spec(B=200)
    y = build("gain", offset=[-0.5, 0.25])(x, gen(0))
    d = y - x
    per_clip = d.flatten(1)
    assert torch.allclose(per_clip, per_clip[:, :1].expand_as(per_clip), atol=1e-6)
    o = per_clip[:, 0]
    assert o.min() >= -0.5 and o.max() <= 0.25
    assert o.min() < -0.4 and o.max() > 0.15  # the draws cover the range
    with pytest.raises(ConfigError):
        build("gain", offset=[1.0, -1.0])


@pytest.mark.parametrize("fields, text", [
    ({"freq_scale": [1.25, 0.8]}, r"^views\.rrc\.freq_scale\[1\] must be >= 1\.25, found 0\.8$"),
    ({"freq_scale": [0.0, 1.25]}, r"^views\.rrc\.freq_scale\[0\] must be > 0, found 0\.0$"),
    ({"time_scale": [0.6, float("inf")]}, r"^views\.rrc\.time_scale\[1\] must be finite and >= 0\.6, found inf$"),
    ({"virtual_crop": [0.5, 1.5]}, r"^views\.rrc\.virtual_crop\[0\] must be >= 1, found 0\.5$"),
])
def test_rrc_refuses_ranges_that_trained_silently(fields, text):
    with pytest.raises(ConfigError, match=text):
        build("rrc", **fields)
    build("rrc", virtual_crop=[1.0, 1.0], freq_scale=[1.0, 1.0], time_scale=[0.8, 1.25])  # the edges pass


@pytest.mark.parametrize("gain, text", [
    (float("nan"), r"^views\.rlf\.gain must be finite and >= 0, found nan$"),
    (float("inf"), r"^views\.rlf\.gain must be finite and >= 0, found inf$"),
    (-0.5, r"^views\.rlf\.gain must be >= 0, found -0\.5$"),
])
def test_rlf_refuses_a_gain_that_is_not_finite_or_negative(gain, text):
    with pytest.raises(ConfigError, match=text):
        build("rlf", gain=gain)
    assert torch.equal(build("rlf", gain=0.0)(spec(), gen(0)), spec())  # 0: no fade, the edge passes


@pytest.mark.parametrize("name, fields, text", [
    ("gain", {"offset": [float("nan"), 0.3]}, r"^views\.gain\.offset\[0\] must be a finite number, found nan$"),
    ("gain", {"offset": [-0.3, float("nan")]}, r"^views\.gain\.offset\[1\] must be finite and >= -0\.3, found nan$"),
    ("gain", {"offset": [0.3, -0.3]}, r"^views\.gain\.offset\[1\] must be >= 0\.3, found -0\.3$"),
    ("noise", {"snr_db": [float("nan"), 40.0]}, r"^views\.noise\.snr_db\[0\] must be a finite number, found nan$"),
    ("noise", {"snr_db": [10.0, float("inf")]}, r"^views\.noise\.snr_db\[1\] must be finite and >= 10, found inf$"),
])
def test_gain_and_noise_refuse_a_range_that_is_not_finite_or_reversed(name, fields, text):
    # a NaN end passed the old low <= high test (every comparison with NaN is false) and trained on NaN
    with pytest.raises(ConfigError, match=text):
        build(name, **fields)
    x = spec()
    assert torch.equal(build("gain", offset=[0.1, 0.1])(x, gen(0)), x + 0.1)  # an empty range is a fixed level
    assert torch.isfinite(build("noise", snr_db=[-5.0, -5.0])(x, gen(0))).all()  # noise above the signal is allowed


def test_noise_snr_range_and_monotone():
    x = spec(B=64, shape=(64, 96))
    aug = build_component(AUGMENTS, {"name": "noise", "snr_db": [5.0, 15.0]}, "views[0]", shape=(64, 96))
    y = aug(x, gen(0))
    assert (y >= x - 1e-5).all()  # adding power never lowers a bin
    added = (y.exp() - x.exp()).mean(dim=(1, 2))
    snr = 10 * torch.log10(x.exp().mean(dim=(1, 2)) / added)
    assert snr.min() > 4.7 and snr.max() < 15.3  # the noise's sample mean is within ~3 % of 1
    assert snr.max() - snr.min() > 6  # and the SNR varies per clip
    quiet = build_component(AUGMENTS, {"name": "noise", "snr_db": [80.0, 80.0]}, "views[0]", shape=(64, 96))
    assert torch.allclose(quiet(x, gen(0)), x, atol=1e-4)
    big = quiet(x + 200.0, gen(0))  # exp(200) overflows float32; the shifted form does not
    assert torch.isfinite(big).all()


def runs(row: torch.Tensor) -> list[int]:
    """Lengths of the maximal runs of True in a 1-D bool tensor."""
    out, n = [], 0
    for v in row.tolist() + [False]:
        if v:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


def test_tf_mask_band_sizes():
    x = torch.ones(400, *SHAPE)
    y = build("tf_mask", freq_masks=1, freq_width=5, time_masks=0)(x, gen(0))
    rows = (y == 0).all(dim=2)  # (B, F) masked mel bins
    widths = [sum(runs(r)) for r in rows]
    assert all(len(runs(r)) <= 1 for r in rows)  # one contiguous band
    assert (y[~rows[:, :, None].expand_as(y)] == 1).all()  # nothing else touched
    assert set(widths) == set(range(6))  # f ~ U{0..F}: every width 0..5 occurs, none larger

    y = build("tf_mask", freq_masks=0, time_masks=2, time_width=30, time_ratio=0.25)(x, gen(1))
    cols = (y == 0).all(dim=1)  # (B, T)
    assert max(max(runs(c), default=0) for c in cols) <= 2 * 10  # p * T = 10 frames per mask
    assert max(cols.sum(1)) <= 20 and max(cols.sum(1)) >= 15


def test_tf_mask_fill_mean():
    x = spec(B=8)
    y = build("tf_mask", freq_masks=2, freq_width=4, time_masks=2, time_width=6, fill="mean")(x, gen(0))
    changed = y != x
    mean = x.mean(dim=(1, 2), keepdim=True).expand_as(x)
    assert changed.any() and torch.allclose(y[changed], mean[changed])


def test_random_time_crop_takes_a_window():
    x = spec(B=5)
    y = random_time_crop(x, 12, gen(0))
    assert y.shape == (5, SHAPE[0], 12)
    for b in range(5):
        starts = [s for s in range(SHAPE[1] - 11) if torch.equal(x[b, :, s:s + 12], y[b])]
        assert starts
    with pytest.raises(ValueError):
        random_time_crop(x, SHAPE[1] + 1, gen(0))


GAIN = [{"name": "gain", "offset": [-1.0, 1.0]}]


def offset_from(view: torch.Tensor, crop: torch.Tensor) -> bool:
    """True when view = crop + a per-clip constant (what the gain chain does)."""
    d = (view - crop).flatten(1)
    return torch.allclose(d, d[:, :1].expand_as(d), atol=1e-5)


def test_view_sampler_same_segment_twice():
    x = spec(B=4)[:, None]  # (B, 1, F, T)
    v1, v2 = ViewSampler(GAIN, SHAPE, segments=1)(x, gen(0))
    assert offset_from(v1, x[:, 0]) and offset_from(v2, x[:, 0]) and not torch.equal(v1, v2)


def test_view_sampler_one_crop_per_view():
    x = torch.stack([spec(B=4, seed=1), spec(B=4, seed=2)], dim=1)  # (B, 2, F, T)
    sampler = ViewSampler(GAIN, SHAPE, segments=2)
    v1, v2 = sampler(x, gen(0))
    assert offset_from(v1, x[:, 0]) and offset_from(v2, x[:, 1])
    a, b = sampler(x, gen(3)), sampler(x, gen(3))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    unaugmented = ViewSampler([], SHAPE, segments=2)(x, gen(0))  # different crops need no chain
    assert torch.equal(unaugmented[0], x[:, 0]) and torch.equal(unaugmented[1], x[:, 1])


def test_view_sampler_rejects_bad_segments():
    with pytest.raises(ConfigError, match="data.segments"):
        ViewSampler(GAIN, SHAPE, segments=3)
    with pytest.raises(ConfigError, match="augmentation chain"):
        ViewSampler([], SHAPE, segments=1)
    with pytest.raises(ValueError):
        ViewSampler(GAIN, SHAPE, segments=2)(spec(B=2)[:, None].expand(2, 3, *SHAPE), gen(0))


def test_multicrop_global_and_local_views():
    x = torch.stack([spec(B=3, seed=1), spec(B=3, seed=2)], dim=1)
    crops = MultiCrop(global_crops=2, local_crops=4, local_frames=10, global_augment=[GAIN, []],
                      local_augment=[])
    views = ViewSampler([{"name": "mixup"}], SHAPE, segments=2, crops=crops)(x, gen(0))
    assert [tuple(v.shape) for v in views] == [(3, *SHAPE)] * 2 + [(3, SHAPE[0], 10)] * 4
    assert offset_from(views[0], x[:, 0]) and torch.equal(views[1], x[:, 1])  # per-view chains
    for j, v in enumerate(views[2:]):  # local view j is a window of crop j % V
        src = x[:, j % 2]
        assert all(any(torch.equal(src[b, :, s:s + 10], v[b]) for s in range(SHAPE[1] - 9)) for b in range(3))


def test_multicrop_local_chain_has_its_own_shape_and_memory():
    sampler = ViewSampler([{"name": "mixup", "memory": 8}], SHAPE, segments=1,
                          crops=MultiCrop(local_crops=2, local_frames=12))
    state = sampler.state_dict()
    assert state["global_chains.0.augs.0.bank"].shape == (8, *SHAPE)
    assert state["local_chain.augs.0.bank"].shape == (8, SHAPE[0], 12)
    views = sampler(spec(B=2)[:, None], gen(0))
    assert len(views) == 4


def test_multicrop_config_errors():
    with pytest.raises(ConfigError):
        MultiCrop(local_crops=2)  # no local_frames
    with pytest.raises(ConfigError):
        MultiCrop(global_crops=2, global_augment=[GAIN])
    with pytest.raises(ConfigError, match="local_frames"):
        ViewSampler(GAIN, SHAPE, segments=1, crops=MultiCrop(local_crops=1, local_frames=SHAPE[1] + 1))


def test_view_chain_api_unchanged():
    chain = ViewChain([{"name": "gain"}, {"name": "tf_mask"}], SHAPE)
    assert len(chain.augs) == 2 and chain(spec(), gen(0)).shape == (6, *SHAPE)
