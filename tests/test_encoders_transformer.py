"""ViT and conv-transformer encoders, and the shared transformer layers (tiny sizes, CPU)."""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F

import sslaudio.encoders  # noqa: F401  (registers the encoders)
import sslaudio.masking  # noqa: F401
from sslaudio.config import ConfigError, build_component
from sslaudio.encoders.layers import Attention, Block, sincos_pos_embed_2d
from sslaudio.masking import Mask
from sslaudio.registry import ENCODERS, MASKERS
from tests.conftest import gen

LOGMEL = types.SimpleNamespace(out_channels=32, hop=160, sample_rate=16000)
WAVE = types.SimpleNamespace(out_channels=1, hop=1, sample_rate=16000)
TINY_CONV = [[16, 10, 5], [16, 3, 2], [16, 3, 2], [16, 3, 2], [16, 3, 2], [16, 2, 2], [16, 2, 2]]
VIT = {"name": "vit", "patch": [8, 4], "dim": 32, "depth": 2, "heads": 4}
W2V = {"name": "conv_transformer", "conv_layers": TINY_CONV, "dim": 32, "depth": 2, "heads": 4,
       "ffn_dim": 64, "pos_conv_kernel": 16, "pos_conv_groups": 4}
D2V = {**W2V, "extractor_mode": "layer", "pos_conv_depth": 5, "pos_conv_kernel": 15, "layer_norm_first": True}
D2V2 = {**D2V, "layer_norm_first": False, "alibi": True}  # data2vec 2.0: ALiBi on top of conv positions
VIT_POST = {**VIT, "norm_first": False, "cls_token": True}  # EAT / data2vec 2.0: post-LN + input LayerNorm


def build(section: dict, seed: int = 0):
    torch.manual_seed(seed)
    frontend = WAVE if section["name"] == "conv_transformer" else LOGMEL
    return build_component(ENCODERS, section, "encoder", frontend=frontend).eval()


def batch(section: dict):
    """A padded batch: (x, lengths) with the second and third items shorter."""
    g = gen(0)
    if section["name"] == "vit":
        return torch.randn(3, 32, 40, generator=g), torch.tensor([40, 26, 9])
    return torch.randn(3, 6400, generator=g), torch.tensor([6400, 3330, 1000])


def crop(x, n):
    return x[..., :n]


ENCS = pytest.mark.parametrize("section", [VIT, VIT_POST, W2V, D2V, D2V2],
                               ids=["vit", "vit-post-ln", "wav2vec2", "data2vec", "data2vec2"])


@ENCS
def test_shapes_and_rates(section):
    enc = build(section)
    x, lengths = batch(section)
    out = enc(x, lengths)
    grid = enc.token_grid(x.shape)
    assert out.tokens.shape == (3, math.prod(grid), 32)
    assert torch.equal(out.padding, enc.token_padding(lengths, x.shape))
    if section["name"] == "vit":
        assert grid == (4, 10) and enc.downsample == 160 * 4 and enc.frame_dim == 4 * 32
    else:
        assert grid == (19,) and enc.downsample == 320 and enc.frame_dim == 32
        assert torch.equal(out.lengths, torch.tensor([19, 10, 2]))


@ENCS
def test_padded_batch_matches_each_item_alone(section):
    enc = build(section)
    x, lengths = batch(section)
    out = enc(x, lengths, return_layers=True)
    frames, frame_lengths = enc.to_frames(out)
    for i, n in enumerate(lengths.tolist()):
        alone = enc(crop(x[i : i + 1], n), lengths[i : i + 1], return_layers=True)
        f1, l1 = enc.to_frames(alone)
        assert l1.item() == frame_lengths[i].item() == f1.shape[1]
        torch.testing.assert_close(frames[i, : f1.shape[1]], f1[0], atol=1e-5, rtol=0)
        if section["name"] != "vit":  # every layer too (the ViT's token order interleaves padding)
            for a, b in zip(out.layers, alone.layers):
                torch.testing.assert_close(a[i, : b.shape[1]], b[0], atol=1e-5, rtol=0)


@ENCS
def test_keep_mask_encodes_only_visible_tokens(section):
    enc = build(section)
    x, lengths = batch(section)
    grid, pad = enc.token_grid(x.shape), enc.token_padding(lengths, x.shape)
    mask = build_component(MASKERS, {"name": "random", "ratio": 0.5}, "masker")(grid, 3, pad, gen(1))
    out = enc(x, lengths, mask)
    n_keep = mask.keep_idx.shape[1]
    assert out.tokens.shape == (3, n_keep, 32) and out.keep
    assert torch.equal(out.padding, torch.gather(pad, 1, mask.keep_idx))
    with pytest.raises(ValueError, match="keep mask"):
        enc.to_frames(out)


@ENCS
def test_replace_mask_uses_the_mask_token(section):
    enc = build(section)
    x, lengths = batch(section)
    grid = enc.token_grid(x.shape)
    everything = Mask.from_masked(torch.ones(3, math.prod(grid), dtype=torch.bool), "replace")
    a = enc(x, lengths, everything)
    b = enc(torch.randn_like(x), lengths, everything)
    # with every token hidden, the input content no longer matters
    torch.testing.assert_close(a.tokens, b.tokens)
    token = enc.mask_token if section["name"] == "vit" else enc.mask_emb
    a.tokens[~a.padding].sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0
    assert not torch.allclose(enc(x, lengths).tokens, a.tokens)


@ENCS
def test_multi_mask_batch_matches_per_clone_masks(section):
    enc = build(section)
    x, lengths = batch(section)
    x, lengths = x[:2], lengths[:2]
    K, grid = 3, enc.token_grid(x.shape)
    pad = enc.token_padding(lengths, x.shape).repeat_interleave(K, 0)
    mask = build_component(MASKERS, {"name": "random", "ratio": 0.5}, "masker")(grid, 2 * K, pad, gen(2))
    out = enc(x, lengths, mask)
    assert out.tokens.shape[0] == 2 * K and out.clone == K
    one = Mask.from_masked(mask.masked[K + 1 : K + 2], "keep")  # sample 1, clone 1
    alone = enc(x[1:2], lengths[1:2], one)
    torch.testing.assert_close(out.tokens[K + 1], alone.tokens[0], atol=1e-5, rtol=0)


@ENCS
def test_return_layers_and_ffn_outputs(section):
    enc = build(section)
    x, lengths = batch(section)
    out = enc(x, lengths, return_layers=True)
    assert len(out.layers) == 3 and len(out.ffn) == 2  # hidden states: the blocks' input, then each block
    assert all(h.shape == out.tokens.shape for h in out.layers + out.ffn)
    if section["name"] == "vit" and not section.get("cls_token"):  # the first is what block 1 reads (no padding)
        with torch.no_grad():
            whole = enc.eval()(x, return_layers=True)
            torch.testing.assert_close(enc.blocks.blocks[0](whole.layers[0], None, None)[0], whole.layers[1])
    pre_ln = section.get("norm_first", True) if section["name"] == "vit" else section.get("layer_norm_first", False)
    if pre_ln:
        torch.testing.assert_close(out.tokens, enc.norm(out.layers[-1]))
    else:
        torch.testing.assert_close(out.tokens, out.layers[-1])
    assert enc(x, lengths).layers is None


def test_vit_cls_token_is_kept_out_of_tokens():
    enc = build({**VIT, "cls_token": True})
    x, lengths = batch(VIT)
    out = enc(x, lengths, return_layers=True)
    assert out.tokens.shape == (3, 40, 32) and out.cls.shape == (3, 32)
    assert all(h.shape == (3, 40, 32) for h in out.layers)
    alone = enc(x[1:2, :, :26], lengths[1:2])
    torch.testing.assert_close(out.cls[1], alone.cls[0], atol=1e-5, rtol=0)


def test_frames_and_frame_times():
    vit, w2v = build(VIT), build(W2V)
    x, lengths = batch(VIT)
    frames, fl = vit.to_frames(vit(x, lengths))
    assert frames.shape == (3, 10, 4 * 32) and fl.tolist() == [10, 6, 2]
    assert vit.pool(vit(x, lengths)).shape == (3, 128)
    # column j holds STFT frames 4j .. 4j + 3 of a centred STFT (frame i centred at 10 i ms): 15 + 40 j ms
    torch.testing.assert_close(vit.frame_times(3), torch.tensor([0.015, 0.055, 0.095], dtype=torch.float64))
    wav, wl = batch(W2V)
    frames, fl = w2v.to_frames(w2v(wav, wl))
    assert frames.shape == (3, 19, 32) and fl.tolist() == [19, 10, 2]  # (L - 400) // 320 + 1
    # frame t sees samples [320 t, 320 t + 400): centre 320 t + 200
    torch.testing.assert_close(w2v.frame_times(2), torch.tensor([200 / 16000, 520 / 16000], dtype=torch.float64))


def test_empty_and_too_short_inputs_raise_clear_errors():
    vit, w2v = build(VIT), build(W2V)
    with pytest.raises(ValueError, match=r"at least 400 samples \(one frame's receptive field\), "
                                         r"found lengths \[1000, 0\]"):
        w2v(torch.zeros(2, 1000), torch.tensor([1000, 0]))
    with pytest.raises(ValueError, match="at least 400 samples"):
        w2v(torch.zeros(1, 399), torch.tensor([399]))
    with pytest.raises(ValueError, match="at least 4 frames"):
        vit(torch.zeros(2, 32, 10), torch.tensor([10, 3]))
    with pytest.raises(ValueError, match=r"expected a spectrogram \(B, 32, T\)"):
        vit(torch.zeros(1, 64, 10), torch.tensor([10]))


def test_vit_handles_inputs_longer_than_training_crops():
    vit = build(VIT)
    long = torch.randn(1, 32, 400)
    out = vit(long, torch.tensor([400]))
    assert out.grid == (4, 100) and torch.isfinite(out.tokens).all()
    small = sincos_pos_embed_2d(32, (4, 10)).view(4, 10, 32)
    big = sincos_pos_embed_2d(32, (4, 100)).view(4, 100, 32)
    torch.testing.assert_close(big[:, :10], small)  # a position's code does not depend on grid size


@ENCS
def test_gradients_reach_every_parameter(section):
    enc = build(section).train()
    x, lengths = batch(section)
    grid = enc.token_grid(x.shape)
    mask = build_component(MASKERS, {"name": "random", "ratio": 0.3, "mode": "replace"}, "masker")(
        grid, 3, enc.token_padding(lengths, x.shape), gen(0))
    if "layerdrop" in ENCODERS.get(section["name"]).Config.__dataclass_fields__:
        enc.blocks.layerdrop = 0.0
    out = enc(x, lengths, mask)
    out.tokens[~out.padding].pow(2).mean().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_feature_grad_mult_scales_extractor_gradients():
    grads = []
    for mult in (1.0, 0.1):
        enc = build({**W2V, "feature_grad_mult": mult, "dropout": 0.0, "attention_dropout": 0.0,
                     "input_dropout": 0.0, "layerdrop": 0.0}, seed=3)
        x, lengths = batch(W2V)
        weights = torch.randn(3, 19, 32, generator=gen(0))
        (enc(x, lengths).tokens * weights).sum().backward()  # a plain sum is flat after LayerNorm
        grads.append((enc.extractor.convs[0].weight.grad, enc.project.weight.grad))
    torch.testing.assert_close(grads[1][0], 0.1 * grads[0][0], rtol=1e-3, atol=1e-6 * grads[0][0].abs().max().item())
    torch.testing.assert_close(grads[1][1], grads[0][1])


def test_layerdrop_keeps_one_entry_per_layer_and_deepcopy_works():
    enc = build({**W2V, "layerdrop": 0.5}).train()
    x, lengths = batch(W2V)
    out = enc(x, lengths, return_layers=True)
    assert len(out.layers) == 3
    teacher = copy.deepcopy(enc).eval()
    torch.testing.assert_close(teacher(x, lengths).tokens, enc.eval()(x, lengths).tokens)


def test_attention_matches_hand_computation_with_key_padding():
    torch.manual_seed(0)
    attn = Attention(16, 2).eval()
    x = torch.randn(2, 5, 16)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    q, k, v = attn.qkv(x).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    expected = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x, padding), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [True, False])
def test_block_returns_ffn_output_before_residual(norm_first):
    torch.manual_seed(0)
    block = Block(16, 2, 32, norm_first=norm_first).eval()
    x = torch.randn(2, 5, 16)
    out, ffn = block(x)
    if norm_first:
        h = x + block.attn(block.norm1(x))
        expected_ffn = block.fc2(F.gelu(block.fc1(block.norm2(h))))
        expected = h + expected_ffn
    else:
        h = block.norm1(x + block.attn(x))
        expected_ffn = block.fc2(F.gelu(block.fc1(h)))
        expected = block.norm2(h + expected_ffn)
    torch.testing.assert_close(ffn, expected_ffn)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("norm_first", [True, False])
def test_block_stochastic_depth_drops_whole_samples_and_rescales(norm_first):
    """Training mode, drop_path 0.5: each sample's residual branches are either dropped (the block
    is the identity on the residual stream) or scaled by 1 / (1 - p), one draw per sample and
    branch, in the order the branches run; gradients follow the same scale."""
    torch.manual_seed(0)
    p = 0.5
    block = Block(16, 2, 32, norm_first=norm_first, drop_path=p).train()
    x = torch.randn(64, 5, 16, requires_grad=True)
    torch.manual_seed(1)
    out, _ = block(x)
    torch.manual_seed(1)  # the same draws: one (B, 1, 1) Bernoulli mask per branch
    keep_attn = torch.empty(64, 1, 1).bernoulli_(1 - p)
    keep_ffn = torch.empty(64, 1, 1).bernoulli_(1 - p)
    assert 0 < keep_attn.sum() < 64 and 0 < keep_ffn.sum() < 64  # both cases occur
    x2 = x.detach().clone().requires_grad_()
    if norm_first:
        h = x2 + block.attn(block.norm1(x2)) * keep_attn / (1 - p)
        expected = h + block.fc2(F.gelu(block.fc1(block.norm2(h)))) * keep_ffn / (1 - p)
    else:
        h = block.norm1(x2 + block.attn(x2) * keep_attn / (1 - p))
        expected = block.norm2(h + block.fc2(F.gelu(block.fc1(h))) * keep_ffn / (1 - p))
    torch.testing.assert_close(out, expected)
    if norm_first:  # a sample with both branches dropped passes through unchanged
        both = (keep_attn + keep_ffn).flatten() == 0
        assert both.any()
        torch.testing.assert_close(out[both], x[both])
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    # no stochastic depth at evaluation: the same weights without drop_path (whose output
    # test_block_returns_ffn_output_before_residual checks by hand)
    plain = Block(16, 2, 32, norm_first=norm_first).eval()
    plain.load_state_dict(block.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(block.eval()(x)[0], plain(x)[0])


@pytest.mark.parametrize("section,frontend,match", [
    ({**VIT, "patch": [12, 4]}, LOGMEL, "not divisible by the patch height 12"),
    ({**VIT, "dim": 30, "heads": 3}, LOGMEL, "multiple of 4"),
    (W2V, LOGMEL, "waveform"),
    ({**W2V, "pos_conv_groups": 5}, WAVE, "pos_conv_groups"),
    ({**W2V, "extractor_mode": "batch"}, WAVE, "extractor_mode"),
    ({**VIT, "depht": 3}, LOGMEL, "did you mean 'depth'"),
])
def test_bad_configs_raise_config_error(section, frontend, match):
    with pytest.raises(ConfigError, match=match):
        build_component(ENCODERS, section, "encoder", frontend=frontend)


def test_alibi_slopes_and_bias_by_hand():
    from sslaudio.encoders.layers import alibi_slopes

    assert alibi_slopes(4) == pytest.approx([2**-2, 2**-4, 2**-6, 2**-8])
    # not a power of two: the 4-head slopes, then every other one of the 8-head slopes
    assert alibi_slopes(6) == pytest.approx([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])
    enc = build(D2V2)
    with torch.no_grad():
        enc.alibi_scale.copy_(torch.tensor([1.0, 0.5, -1.0, 2.0]))  # a negative scale is clamped to 0
    pos = torch.tensor([[0, 2, 5]])
    bias = enc.attention_bias(pos)
    for h, (slope, scale) in enumerate(zip([2**-2, 2**-4, 2**-6, 2**-8], [1.0, 0.5, 0.0, 2.0])):
        for i in range(3):
            for j in range(3):
                assert float(bias[0, h, i, j]) == pytest.approx(-slope * scale * abs(int(pos[0, i]) - int(pos[0, j])))


def test_alibi_keep_mode_uses_original_positions():
    """fairseq masked_alibi: the bias of kept tokens is the full bias gathered at their positions."""
    enc = build(D2V2)
    T = 19
    full = enc.attention_bias(torch.arange(T)[None])
    keep = torch.tensor([[1, 4, 5, 11, 18]])
    want = full[:, :, keep[0]][:, :, :, keep[0]]
    assert torch.allclose(enc.attention_bias(keep), want)


def test_alibi_scale_is_learned():
    enc = build(D2V2).train()
    x, lengths = batch(D2V2)
    enc(x, lengths).tokens.sum().backward()
    assert enc.alibi_scale.grad is not None and float(enc.alibi_scale.grad.abs().sum()) > 0


# ---------------------------------------------------------------------------------------------
# post-LN ViT (EAT / data2vec 2.0, layer_norm_first false) and the always-built feature projection


def hand_layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def test_post_ln_vit_matches_hand_computation():
    """fairseq AltBlock with layer_norm_first false: x = LN1(x + attn(x)); t = mlp(x) (the FFN
    target, before the residual and LN2); x = LN2(x + t). The modality encoder's BlockEncoder
    layer-norms the tokens (CLS included) before the blocks, and no final norm follows."""
    enc = build(VIT_POST)
    with torch.no_grad():  # non-trivial LayerNorm affines, so a swapped norm would show
        for m in enc.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    assert enc.input_norm is not None and isinstance(enc.norm, torch.nn.Identity)
    x = torch.randn(2, 32, 12, generator=gen(4))
    out = enc(x, return_layers=True)
    D, H = 32, 4
    tokens = enc.patch_embed(x) + sincos_pos_embed_2d(D, enc.token_grid(x.shape))
    h = torch.cat([enc.cls.expand(2, -1, -1), tokens], 1)
    h = hand_layer_norm(h, enc.input_norm)
    ffns = []
    for blk in enc.blocks.blocks:
        B, N, _ = h.shape
        q, k, v = blk.attn.qkv(h).view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-1, -2)) / math.sqrt(D // H)).softmax(-1) @ v
        a = blk.attn.proj(a.transpose(1, 2).reshape(B, N, D))
        r = hand_layer_norm(h + a, blk.norm1)
        t = blk.fc2(F.gelu(blk.fc1(r)))
        ffns.append(t)
        h = hand_layer_norm(r + t, blk.norm2)
    torch.testing.assert_close(out.tokens, h[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cls, h[:, 0], atol=1e-5, rtol=1e-5)
    for got, want in zip(out.ffn, ffns):
        torch.testing.assert_close(got, want[:, 1:], atol=1e-5, rtol=1e-5)


def test_vit_norm_first_default_is_pre_ln():
    enc = build(VIT)
    assert enc.cfg.norm_first and enc.input_norm is None and isinstance(enc.norm, torch.nn.LayerNorm)
    assert all(b.norm_first for b in enc.blocks.blocks)
    assert not any(b.norm_first for b in build(VIT_POST).blocks.blocks)


def test_post_ln_vit_exports_to_torchscript(tmp_path):
    from sslaudio.build import build_encoder, load_preset
    from sslaudio.export import export
    from sslaudio.inference import EncoderBundle

    p = load_preset("tiny/data2vec2", ["encoder.norm_first=false"])
    torch.manual_seed(p.seed)
    bundle = EncoderBundle(*build_encoder(p), p).eval()
    assert not bundle.encoder.cfg.norm_first
    bundle.needs_stats = False
    r = export(bundle, "torchscript", tmp_path / "m.torchscript")  # raises if it disagrees with PyTorch
    assert r["dim"] == bundle.encoder.frame_dim and r["max_abs_diff"] < 1e-3


@pytest.mark.parametrize("always", [False, True])
def test_always_project_builds_the_projection_at_equal_widths(always):
    same = [[32, k, st] for _, k, st in TINY_CONV]  # conv width 32 == dim 32
    enc = build({**W2V, "conv_layers": same, "always_project": always})
    assert isinstance(enc.project, torch.nn.Linear) == always
    if always:
        assert enc.project.weight.shape == (32, 32)
        x, lengths = batch(W2V)
        out = enc(x, lengths)
        torch.testing.assert_close(out.local, enc.project(out.features))
    wider = build({**W2V, "always_project": always})  # 16 -> 32: projected either way
    assert isinstance(wider.project, torch.nn.Linear)


@pytest.mark.parametrize("name", ["data2vec-wave", "data2vec2-wave"])
def test_data2vec_wave_presets_project_equal_widths(name):
    from sslaudio.build import build_encoder, load_preset

    p = load_preset(f"tiny/{name}")
    enc = build_encoder(p)[1]
    assert p.encoder["always_project"] and enc.extractor.out_channels == enc.dim
    assert isinstance(enc.project, torch.nn.Linear)


@pytest.mark.parametrize("c_in,k,s,bias", [(1, 10, 5, False), (6, 3, 2, True), (6, 2, 2, False), (4, 4, 1, True)])
def test_strided_conv_last_is_conv1d_on_channels_last_input(c_in, k, s, bias):
    from sslaudio.encoders.layers import strided_conv_last

    torch.manual_seed(0)
    x = torch.randn(3, 37, c_in, requires_grad=True)
    w = torch.randn(5, c_in, k, requires_grad=True)
    b = torch.randn(5, requires_grad=True) if bias else None
    ours = strided_conv_last(x, w, s, b)
    ref = F.conv1d(x.transpose(1, 2), w, b, stride=s).transpose(1, 2)
    assert ours.shape == ref.shape == (3, (37 - k) // s + 1, 5)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(ours, [x, w], g)
    want = torch.autograd.grad(ref, [x, w], g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_same_values_and_gradients_less_saved_memory():
    from sslaudio.encoders.layers import Block, TransformerStack

    def run(flag: bool):
        torch.manual_seed(0)
        stack = TransformerStack([Block(16, 2, 32, dropout=0.1, attention_dropout=0.1) for _ in range(4)]).train()
        stack.activation_checkpointing = flag
        x = torch.randn(2, 9, 16, requires_grad=True)
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        torch.manual_seed(1)  # the dropout masks
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y, _, ffns = stack(x, return_layers=True)
            loss = (y ** 2).sum() + sum(f.sum() for f in ffns)
        loss.backward()
        return y.detach(), x.grad, [p.grad for p in stack.parameters()], sum(saved)

    y0, gx0, gp0, mem0 = run(False)
    y1, gx1, gp1, mem1 = run(True)
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(gx1, gx0)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b)
    assert mem1 < mem0 / 3  # the blocks' inputs only, not every intermediate of every block


@pytest.mark.parametrize("lengths", [[40, 40, 40], [40, 17, 40]])
def test_masked_instance_norm_is_group_norm_of_each_valid_item(lengths):
    from sslaudio.encoders.layers import MaskedInstanceNorm

    torch.manual_seed(0)
    norm = MaskedInstanceNorm(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = (torch.randn(3, 40, 6) * 3 + 1).requires_grad_()  # channels last (B, T, C)
    y = norm(x, torch.tensor(lengths))
    assert y.shape == x.shape and y.is_contiguous()
    g = torch.randn_like(y)
    for b, n in enumerate(lengths):
        xb = x.detach()[b:b + 1, :n].clone().requires_grad_()
        ref = F.group_norm(xb.transpose(1, 2), 6, norm.weight, norm.bias, 1e-5).transpose(1, 2)
        torch.testing.assert_close(y[b:b + 1, :n], ref, rtol=1e-5, atol=1e-5)
        gx_ref, = torch.autograd.grad(ref, xb, g[b:b + 1, :n])
        gx, = torch.autograd.grad(y, x, g * (torch.arange(40)[None, :, None] < n) * (torch.arange(3)[:, None, None] == b),
                                  retain_graph=True)
        torch.testing.assert_close(gx[b:b + 1, :n], gx_ref, rtol=1e-4, atol=1e-5)


def test_conv_instance_norm_folds_the_first_layer_norm_into_one_gemm():
    from sslaudio.encoders.layers import MaskedInstanceNorm, conv_instance_norm, strided_conv_last

    torch.manual_seed(0)
    norm = MaskedInstanceNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    w = (torch.randn(16, 1, 10) * 0.3).requires_grad_()
    x = (torch.randn(3, 997) * 0.1 + 0.05).unsqueeze(-1)  # an offset: the windows' mean matters
    n = (997 - 10) // 5 + 1
    # (a conv bias would cancel in the normalisation; the two-step form then loses precision to the
    # large mean, the folded one does not, so the comparison is made without one)
    two = norm(strided_conv_last(x, w, 5), torch.full((3,), n))
    one = conv_instance_norm(x, w, 5, norm)
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(two)
    params = [w, norm.weight, norm.bias]
    for a, b in zip(torch.autograd.grad(one, params, g), torch.autograd.grad(two, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
