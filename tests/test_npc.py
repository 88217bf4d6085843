"""NPC (sslaudio/methods/npc.py) and the `npc` encoder (sslaudio/encoders/npc.py): the receptive
field and its masked hole, mask sizes per block, the encoder and the loss against a hand computation
of the s3prl formulas, padded batches, gradients, a short run, resume through `fit`, and an export
that holds the encoder only."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sslaudio.build import load_preset
from sslaudio.config import ConfigError
from tests.conftest import build_tiny, first_last, gen, run_steps, synth_clips

SMALL = ["encoder.hidden=16", "train.batch_size=4"]


def _method(*over):
    return build_tiny("npc", *SMALL, *over)


# -- the masks ------------------------------------------------------------------------------------
def test_mask_sizes_grow_by_two_per_block_and_zero_the_centre_taps():
    m = _method()
    enc = m.encoder
    assert enc.mask_sizes == [7, 9, 11, 13] and enc.receptive_field == 23  # mask 5, kernel 15, 4 blocks
    for mc, size in zip(enc.masked_convs, enc.mask_sizes):
        taps = mc.taps.flatten().tolist()
        head = (15 - size) // 2
        assert taps == [1.0] * head + [0.0] * size + [1.0] * head, (size, taps)
        assert "taps" not in mc.state_dict()  # rebuilt from the config, not stored
    p = load_preset("npc")  # the paper-scale preset: s3prl config_model.yaml
    assert {k: p.encoder[k] for k in ("blocks", "hidden", "kernel", "mask")} == \
        {"blocks": 4, "hidden": 512, "kernel": 15, "mask": 5}
    assert (p.method["groups"], p.method["entries"], p.method["tau"]) == (4, 64, 1.0)
    assert _method("encoder.mask=3", "encoder.blocks=2", "encoder.kernel=9").encoder.mask_sizes == [5, 7]


@pytest.mark.parametrize("s", [30, 2])  # mid-sequence, and near the start (the zero padding of the convs)
def test_output_at_t_ignores_the_masked_neighbourhood_and_sees_the_rest(s):
    """Perturb input frame s only: the output changes exactly at the frames t with
    mask // 2 < |t - s| <= kernel // 2 + blocks, i.e. never where s lies in t's masked centre."""
    m = _method().eval()
    enc = m.encoder
    x = torch.randn(1, 80, 60, generator=gen(1))
    y = x.clone()
    y[:, :, s] += 3.0 * torch.randn(80, generator=gen(2))
    with torch.no_grad():
        ox, oy = enc(x, return_layers=True), enc(y, return_layers=True)
        px, _ = m.predict(ox.tokens, None, None)
        py, _ = m.predict(oy.tokens, None, None)
    dist = (torch.arange(60) - s).abs()
    changed = (ox.tokens - oy.tokens)[0].abs().amax(-1) > 1e-6  # (T,)
    assert changed.tolist() == ((dist > 2) & (dist <= 11)).tolist()
    # the method's prediction of frame t (eval: argmax codes) never saw frame t or its 2 neighbours
    near = dist <= 2
    assert torch.equal(px[0, near], py[0, near])
    # each unmasked ConvBlock output i sees i + 1 frames either side (3-tap convolutions)
    for i, (lx, ly) in enumerate(zip(ox.layers[:-1], oy.layers[:-1])):
        moved = (lx - ly)[0].abs().amax(-1) > 1e-6
        assert moved.tolist() == (dist <= i + 1).tolist(), i
    assert ox.layers[-1] is ox.tokens


def test_perturbing_the_whole_masked_window_leaves_the_output_at_t_unchanged():
    m = _method().eval()
    x = torch.randn(2, 80, 40, generator=gen(3))
    t = 17
    inside, outside = x.clone(), x.clone()
    inside[:, :, t - 2:t + 3] = torch.randn(2, 80, 5, generator=gen(4)) * 5
    outside[:, :, t + 3] += 1.0
    with torch.no_grad():
        o, oi, oo = (m.encoder(v).tokens for v in (x, inside, outside))
    assert torch.equal(o[:, t], oi[:, t])
    assert not torch.allclose(o[:, t], oo[:, t], atol=1e-4)


# -- the encoder ----------------------------------------------------------------------------------
def _bn(bn, h):
    """Eval-mode BatchNorm1d by hand on (B, C, T)."""
    return ((h - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps)
            * bn.weight[:, None] + bn.bias[:, None])


def test_encoder_matches_the_s3prl_blocks_by_hand():
    m = _method()
    enc = m.encoder
    for mod in enc.modules():  # non-trivial running statistics for the eval-mode check
        if isinstance(mod, torch.nn.BatchNorm1d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    enc.eval()
    x = torch.randn(2, 80, 25, generator=gen(5))
    with torch.no_grad():
        out = enc(x, return_layers=True)
        h, feat = x, 0
        for i, (blk, mc) in enumerate(zip(enc.blocks, enc.masked_convs)):
            z = F.relu(_bn(blk.bn1, F.conv1d(h, blk.conv.weight, blk.conv.bias, padding=1)))
            z = _bn(blk.bn2, F.conv1d(z, blk.linear.weight, blk.linear.bias))
            h = F.relu(z + h if i > 0 else z)  # no residual into the first block (80 -> hidden)
            assert torch.allclose(out.layers[i], h.transpose(1, 2), atol=1e-5), i
            w = mc.conv.weight.clone()
            c, r = 7, (enc.mask_sizes[i] - 1) // 2
            w[:, :, c - r:c + r + 1] = 0.0  # the centre mask_sizes[i] taps
            feat = feat + torch.tanh(F.conv1d(h, w, mc.conv.bias, padding=7)).transpose(1, 2)
    assert torch.allclose(out.tokens, feat, atol=1e-5)
    assert out.tokens.shape == (2, 25, 16) and len(out.layers) == 5


def test_padded_batch_equals_each_item_alone_and_padding_is_flagged():
    m = _method().eval()
    enc = m.encoder
    x = torch.randn(3, 80, 30, generator=gen(6))
    lengths = torch.tensor([30, 13, 1])
    x[1, :, 13:] = 100.0  # padding content must not matter
    x[2, :, 1:] = -7.0
    with torch.no_grad():
        out = enc(x, lengths, return_layers=True)
        assert torch.equal(out.padding, torch.arange(30)[None] >= lengths[:, None])
        for b, n in enumerate(lengths.tolist()):
            alone = enc(x[b:b + 1, :, :n], return_layers=True)
            assert torch.allclose(alone.tokens[0], out.tokens[b, :n], atol=1e-5)
            for la, lb in zip(alone.layers, out.layers):
                assert torch.allclose(la[0], lb[b, :n], atol=1e-5)
    assert torch.allclose(enc.pool(out)[1], out.tokens[1, :13].mean(0), atol=1e-6)
    assert enc.to_frames(out)[1].tolist() == [30, 13, 1]


def test_training_batch_norm_uses_valid_frames_only():
    m = _method("encoder.dropout=0.0")
    enc = m.encoder.train()
    x = torch.randn(2, 80, 20, generator=gen(7))
    lengths = torch.tensor([20, 11])
    y = x.clone()
    y[1, :, 11:] = 50.0
    a, b = enc(x, lengths), enc(y, lengths)
    valid = ~a.padding
    assert torch.allclose(a.tokens[valid], b.tokens[valid], atol=1e-5)
    # bn1's statistics are those of the 31 valid frames (momentum 0.1, two forwards: 0.19 x mean)
    with torch.no_grad():
        rows = enc.blocks[0].conv(x * valid[:, None]).transpose(1, 2)[valid]  # (31, H): what bn1 saw
    assert rows.shape == (31, 16)
    assert torch.allclose(enc.blocks[0].bn1.running_mean, 0.19 * rows.mean(0), atol=1e-5)


def test_token_masks_are_a_clear_error():
    # shapes and lengths: tests/test_encoder_contract.py, for every encoder
    enc = _method().encoder
    with pytest.raises(ValueError, match="not supported"):
        enc(torch.zeros(1, 80, 5), mask=object())


def test_config_errors():
    with pytest.raises(ConfigError, match="encoder.kernel"):
        _method("encoder.kernel=14")
    with pytest.raises(ConfigError, match="encoder.mask"):
        _method("encoder.mask=4")
    with pytest.raises(ConfigError, match="masked span"):
        _method("encoder.kernel=13")  # 5 + 2 * 4 = 13 taps would mask the whole kernel
    with pytest.raises(ConfigError, match="encoder.activation"):
        _method("encoder.activation=gelu")
    with pytest.raises(ConfigError, match="method.groups 3 must divide encoder.hidden 16"):
        _method("method.groups=3")
    with pytest.raises(ConfigError, match="method.tau"):
        _method("method.tau=0")
    with pytest.raises(ConfigError, match="frontend.name"):
        _method("frontend={name: waveform}")
    with pytest.raises(ConfigError, match="npc"):
        _method("encoder={name: rnn}")


# -- the method -----------------------------------------------------------------------------------
def _quantize_by_hand(vq, feat, noise=None, tau=1.0):
    """s3prl: one VQLayer per group on its slice; argmax (eval) or hard Gumbel-softmax (train).
    feat (N, H) -> codes (N, H)."""
    G = vq.groups
    out = []
    for g, part in enumerate(feat.chunk(G, dim=-1)):
        logits = part @ vq.weight[g].T + vq.bias[g]  # (N, V)
        if noise is not None:
            logits = (logits + noise[:, g]) / tau
        out.append(vq.codebook[g][logits.argmax(-1)])
    return torch.cat(out, dim=-1)


def _s3prl_l1(pred, frames, lengths):
    """s3prl / official: L1Loss(reduction='none'), then sum_b loss[b, :len].mean(-1).sum() / sum(len)."""
    loss = (pred - frames).abs()
    total = sum(loss[b, :n].mean(dim=-1).sum() for b, n in enumerate(lengths))
    return total / sum(lengths)


def test_loss_matches_hand_computation_on_a_padded_batch():
    m = _method().eval()  # evaluation: argmax codes, BN running statistics
    audio = synth_clips(2, 0.3)
    m.frontend.estimate_stats(audio)
    lengths = torch.tensor([4800, 3200])
    out = m({"audio": audio[:, None], "lengths": lengths}, 0, gen(), 10)
    x, fl = m.frontend(audio, lengths)
    assert fl.tolist() == [31, 21]
    with torch.no_grad():
        preds = []
        for b, n in enumerate(fl.tolist()):
            feat = m.encoder(x[b:b + 1, :, :n]).tokens[0]  # the item alone
            pred = m.postnet(_quantize_by_hand(m.vq, feat))  # (n, 80)
            preds.append(F.pad(pred, (0, 0, 0, x.shape[-1] - n)))
        want = _s3prl_l1(torch.stack(preds), x.transpose(1, 2), fl.tolist())
    assert out["loss"].item() == pytest.approx(float(want), abs=1e-5)
    assert {"code_perplexity", "prob_perplexity", "emb_std"} <= out.keys() and all(v.ndim == 0 for v in out.values())


def test_without_vq_the_postnet_reads_the_masked_features():
    """method.groups 0: the official `vq: null` model, postnet(masked features), L1 as before."""
    m = _method("method.groups=0").eval()
    assert m.vq is None and not any(n.startswith("vq.") for n, _ in m.named_parameters())
    audio = synth_clips(2, 0.3)
    m.frontend.estimate_stats(audio)
    lengths = torch.tensor([4800, 3200])
    out = m({"audio": audio[:, None], "lengths": lengths}, 0, gen(), 10)
    x, fl = m.frontend(audio, lengths)
    with torch.no_grad():
        preds = [F.pad(m.postnet(m.encoder(x[b:b + 1, :, :n]).tokens[0]), (0, 0, 0, x.shape[-1] - n))
                 for b, n in enumerate(fl.tolist())]
        want = _s3prl_l1(torch.stack(preds), x.transpose(1, 2), fl.tolist())
    assert out["loss"].item() == pytest.approx(float(want), abs=1e-5)
    assert "code_perplexity" not in out and {"emb_std", "emb_dims"} <= out.keys()
    with pytest.raises(ConfigError, match="method.groups must be >= 0"):
        _method("method.groups=-1")


def test_training_loss_uses_gumbel_noise_from_the_generator():
    m = _method("encoder.dropout=0.0")
    audio = synth_clips(2, 0.2)
    m.frontend.estimate_stats(audio)
    out = m({"audio": audio[:, None]}, 0, gen(9), 10)
    x = m.features(audio)
    with torch.no_grad():
        feat = m.encoder(x).tokens  # train mode: batch statistics, as the method's pass
        B, T, H = feat.shape
        u = torch.rand((B * T, 4, 64), generator=gen(9))
        noise = -torch.log((-torch.log(u.clamp_min(1e-10))).clamp_min(1e-10))
        pred = m.postnet(_quantize_by_hand(m.vq, feat.reshape(B * T, H), noise)).reshape(B, T, -1)
        want = _s3prl_l1(pred, x.transpose(1, 2), [T] * B)
    assert out["loss"].item() == pytest.approx(float(want), abs=1e-5)
    again = m({"audio": audio[:, None]}, 0, gen(9), 10)  # the same generator: the same codes
    assert again["loss"].item() == out["loss"].item()


def test_gradients_reach_every_trainable_part_but_never_the_masked_taps():
    m = _method()
    audio = synth_clips(4, 0.3)
    m.frontend.estimate_stats(audio)
    torch.manual_seed(0)
    m({"audio": audio[:, None]}, 0, gen(0), 10)["loss"].backward()
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert any(n.startswith("vq.") for n, _ in m.named_parameters())
    for mc in m.encoder.masked_convs:
        hole = mc.taps.flatten() == 0
        assert mc.conv.weight.grad[:, :, hole].abs().max() == 0
        assert mc.conv.weight.grad[:, :, ~hole].abs().sum() > 0


def test_short_run_lowers_the_loss_without_collapse():
    m = _method("encoder.hidden=32")
    audio = synth_clips(8, 0.5, seed=10)[:, None]
    m.frontend.estimate_stats(audio[:, 0])
    hist = run_steps(m, audio, 40, lr=3e-3)
    first, last = first_last(hist)
    # per-utterance CMVN gives every bin unit variance over the clip, so a guess of the clip's mean
    # costs ~0.8 (E|x| of a unit normal), where the loss starts; measured 0.79 -> 0.68 in 40 steps
    assert last < 0.9 * first, (first, last)
    assert all(math.isfinite(h["loss"]) for h in hist)
    end = hist[-1]
    # summed over the 4 groups of 64 codes: 4 is one code per group, a collapsed codebook
    assert end["code_perplexity"] > 6 and end["prob_perplexity"] > 6, end
    assert end["emb_std"] > 0.02, end


# -- training, resume and export through the trainer -------------------------------------------------
RUN = SMALL + ["train.steps=4", "train.ckpt_every=2", "train.log_every=1", "data.num_workers=0",
               "data.norm_samples=8", "data.clip_seconds=1.0", "train.keep_last=5"]


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")
def test_resume_is_bit_identical_and_export_holds_the_encoder_only(audio_dir, tmp_path):
    from sslaudio.export import export
    from sslaudio.inference import load_encoder
    from sslaudio.train import fit

    preset = load_preset("tiny/npc", RUN)
    a, b = tmp_path / "a", tmp_path / "b"
    fit(preset, [str(audio_dir)], a, device="cpu")
    fit(preset, [str(audio_dir)], b, device="cpu")
    shutil.rmtree(b / "ckpt" / "step-000000004")  # as if stopped after step 2
    summary = fit(preset, [str(audio_dir)], b, device="cpu")
    assert summary["start_step"] == 2
    wa = load_file(str(a / "ckpt" / "step-000000004" / "model.safetensors"))
    wb = load_file(str(b / "ckpt" / "step-000000004" / "model.safetensors"))
    assert wa.keys() == wb.keys() and "vq.codebook" in wa and "postnet.weight" in wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    rows = [[json.loads(r) for r in (d / "log.jsonl").read_text().splitlines()] for d in (a, b)]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]] and len(rows[0]) == 4
    assert {"code_perplexity", "prob_perplexity", "emb_std"} <= rows[0][-1].keys()

    exported = load_file(str(a / "export" / "encoder.safetensors"))
    assert all(k.startswith(("frontend.", "encoder.")) for k in exported)
    assert not any("vq" in k or "postnet" in k for k in exported)
    assert {k for k in exported if k.startswith("encoder.")} == {k for k in wa if k.startswith("encoder.")}
    bundle = load_encoder(str(a / "export" / "encoder.safetensors"))
    with torch.no_grad():
        clip, frames, lengths = bundle.embed(synth_clips(2, 1.0))
    assert clip.shape == (2, 16) and frames.shape == (2, 101, 16) and lengths.tolist() == [101, 101]
    r = export(bundle, "torchscript", tmp_path / "m.pt")
    assert r["dim"] == 16 and r["max_abs_diff"] < 1e-3
    names = {n for n, _ in torch.jit.load(str(tmp_path / "m.pt")).named_parameters()}
    assert names and not any("vq" in n or "postnet" in n for n in names)
    if __import__("importlib").util.find_spec("onnxruntime") is not None:
        assert export(bundle, "onnx", tmp_path / "m.onnx")["max_abs_diff"] < 1e-3
