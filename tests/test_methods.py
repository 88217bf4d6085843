"""Checks every registered method must pass, parametrised over the tiny presets, and the export of
every registered encoder (TorchScript and ONNX, against PyTorch)."""

from pathlib import Path

import pytest
import torch

from sslaudio.build import build_encoder, load_components, load_preset
from sslaudio.config import list_presets
from sslaudio.inference import EncoderBundle, load_encoder
from sslaudio.registry import ENCODERS, METHODS
from tests.conftest import build_tiny, gen

TINY = [n for n in list_presets() if n.startswith("tiny/")]


def small(name):
    return load_preset(name, ["train.batch_size=4"]), build_tiny(name, "train.batch_size=4")


def test_every_method_has_full_and_tiny_presets():
    load_components()
    methods_with_tiny = {load_preset(n).method["name"] for n in TINY}
    assert set(METHODS.names()) <= methods_with_tiny
    for n in TINY:  # tiny/data2vec-wave scales presets/data2vec.yaml down, as tiny/data2vec does on log-mel
        full = n.split("/", 1)[1].removesuffix("-wave")
        assert (Path(__file__).parent.parent / "presets" / f"{full}.yaml").is_file(), n


def audio_batch(p, m) -> torch.Tensor:
    """(4, segments, S) random crops for preset p; runs the method's `prepare` on them as the
    trainer does before a new run (frontend statistics; HuBERT's k-means on 8 more crops)."""
    audio = torch.randn(4, p.data.segments, int(round(p.data.clip_seconds * p.data.sample_rate))) * 0.1
    more = torch.randn(8, audio.shape[-1], generator=gen(1)) * 0.1
    m.prepare(audio[:, 0], lambda count, batch: iter(more[:count].split(batch)))
    return audio


@pytest.mark.parametrize("name", TINY)
def test_one_step_is_finite_and_trains_the_encoder(name):
    p, m = small(name)
    audio = audio_batch(p, m)
    out = m({"audio": audio}, 0, gen(0), 10)
    assert torch.isfinite(out["loss"]) and out["loss"].ndim == 0
    assert all(v.ndim == 0 for v in out.values()), "logged values must be scalars"
    # every method logs both collapse signals of its embeddings (a constant output; one direction)
    dims = [k for k in out if k.endswith("_dims")]
    assert dims and all(0 <= out[k].item() <= 4096 and torch.isfinite(out[k]) for k in dims), name
    out["loss"].backward()
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in m.inference_encoder().parameters())
    for q in m.parameters():
        if not q.requires_grad:
            assert q.grad is None
    m.after_step(0, 10)


@pytest.mark.parametrize("name", TINY)
def test_inference_encoder_embeds_longer_audio(name):
    p, m = small(name)
    bundle = EncoderBundle(m.frontend, m.inference_encoder(), p).eval()
    with torch.no_grad():
        clip, frames, lengths = bundle.embed(torch.randn(2, int(2.5 * p.data.sample_rate)) * 0.1)
    enc = bundle.encoder
    assert clip.shape == (2, enc.frame_dim) and frames.shape[0] == 2 and frames.shape[2] == enc.frame_dim
    assert torch.isfinite(clip).all() and int(lengths[0]) == frames.shape[1]
    times = enc.frame_times(frames.shape[1])
    assert times[-1] <= 2.5 + 1e-6 and torch.all(times[1:] > times[:-1])


# One tiny preset per registered encoder, then the second code paths of two of them: (preset,
# overrides, frame_dim, samples per frame) of what must export.
EXPORTS = [
    ("tiny/byol-a", (), 512, 1280),  # audiontt
    ("tiny/m2d", (), 3200, 2560),  # vit: 5 hidden states (eval_blocks) x 5 patch rows of 128
    ("tiny/data2vec-wave", (), 64, 320),  # conv_transformer
    ("tiny/apc", (), 128, 160),  # rnn
    ("tiny/mockingjay", (), 384, 160),  # frame_transformer: its 3 blocks of 128 side by side (eval_blocks)
    ("tiny/cpc", (), 128, 160),  # cpc
    ("tiny/npc", (), 64, 160),  # npc
    ("tiny/data2vec2-wave", (), 64, 320),  # conv_transformer + ALiBi
    ("tiny/tera", ("encoder.downsample=2",), 512, 320),  # frame_transformer, 2 frames a token, 4 hidden states (eval_blocks)
]


def test_export_cases_cover_every_encoder():
    load_components()
    assert {load_preset(name, list(over)).encoder["name"] for name, over, _, _ in EXPORTS} == set(ENCODERS.names())


@pytest.mark.parametrize("name,overrides,dim,hop", EXPORTS, ids=["+".join([n, *o]) for n, o, _, _ in EXPORTS])
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_every_encoder_exports(name, overrides, dim, hop, fmt, tmp_path):
    from sslaudio.export import export

    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    if overrides:  # what `random:NAME` builds, with the overrides
        p = load_preset(name, list(overrides))
        torch.manual_seed(p.seed)
        bundle = EncoderBundle(*build_encoder(p), p).eval()
    else:
        bundle = load_encoder(f"random:{name}")
    bundle.needs_stats = False
    r = export(bundle, fmt, tmp_path / f"m.{fmt}")  # raises if it disagrees with PyTorch
    assert r["dim"] == bundle.encoder.frame_dim == dim and r["max_abs_diff"] < 1e-3
    assert bundle.encoder.downsample == hop


@pytest.mark.parametrize("name", TINY)
def test_bf16_autocast_step_is_finite(name):
    """The CUDA path trains under bf16 autocast; the CPU autocast exercises the same dtype rules."""
    p, m = small(name)
    audio = audio_batch(p, m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m({"audio": audio}, 0, gen(0), 10)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [q.grad for q in m.inference_encoder().parameters() if q.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_effective_dimension_is_the_participation_ratio():
    from sslaudio.methods.base import effective_dimension

    # centred rows on two axes with variances 2 a^2 / 4 and 2 b^2 / 4: (a^2 + b^2)^2 / (a^4 + b^4)
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    assert effective_dimension(z).item() == pytest.approx(25 / 17, rel=1e-6)
    # an offset shared by every row does not count, nor does the scale
    assert effective_dimension(1e3 * z + 7.0).item() == pytest.approx(25 / 17, rel=1e-5)
    # rows along one direction (plus an offset): 1; rows that do not vary: 0
    line = torch.linspace(-1, 1, 9)[:, None] * torch.tensor([[3.0, -1.0, 2.0]]) + 5.0
    assert effective_dimension(line).item() == pytest.approx(1.0, rel=1e-5)
    assert effective_dimension(torch.full((4, 3), 2.5)).item() == 0.0
    assert effective_dimension(torch.zeros(0, 3)).item() == 0.0  # no rows: 0, not an error
    # against the covariance spectrum, with more rows than columns and with fewer
    g = torch.Generator().manual_seed(0)
    for n, d in ((50, 6), (5, 40)):
        x = torch.randn(n, d, generator=g) * torch.linspace(0.1, 2.0, d)
        lam = torch.linalg.eigvalsh(torch.cov(x.T.double()))
        assert effective_dimension(x).item() == pytest.approx((lam.sum() ** 2 / (lam ** 2).sum()).item(), rel=1e-4)
    # `valid` leaves rows out: a wild extra row changes nothing when it is marked invalid
    wild = torch.cat([z, torch.tensor([[40.0, -90.0]])])
    keep = torch.tensor([True, True, True, True, False])
    assert effective_dimension(wild, keep).item() == pytest.approx(25 / 17, rel=1e-6)
    assert effective_dimension(wild).item() < 1.1  # counted, the wild row dominates
    # more rows than max_rows: the evenly spaced subset
    many = torch.randn(300, 4, generator=g)
    assert effective_dimension(many, max_rows=100).item() == pytest.approx(
        effective_dimension(many[torch.linspace(0, 299, 100).round().long()]).item(), rel=1e-6)
