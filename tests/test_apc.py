"""APC and the `rnn` encoder: the L1 loss against explicit loops (shift, valid steps only), the whole
method against a hand-unrolled GRU, causality (no peeking), padded batches, short inputs, config
errors and a short run that lowers the loss without collapse (export: tests/test_methods.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from sslaudio.config import ConfigError
from sslaudio.methods import losses
from tests.conftest import build_tiny, first_last, gen, run_steps, synth_clips

SMALL = ["encoder.hidden=16", "encoder.layers=2", "train.batch_size=4"]
S = 8000  # 0.5 s -> 51 frames


def _method(*over):
    return build_tiny("apc", *SMALL, *over)


# -- the loss ------------------------------------------------------------------------------------
def _hand_l1(pred, frames, shift, lengths):
    """Explicit loops: |pred[b, t, f] - frames[b, t + n, f]| over t + n < length_b, every bin."""
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        for t in range(pred.shape[1]):
            if t + shift >= lengths[b]:
                continue
            for f in range(pred.shape[2]):
                total += abs(float(pred[b, t, f]) - float(frames[b, t + shift, f]))
                count += 1
    return total / count


@pytest.mark.parametrize("shift", [1, 3])
def test_apc_l1_loss_matches_loops_and_excludes_padding(shift):
    pred, frames = torch.randn(3, 7, 4, generator=gen(1)), torch.randn(3, 7, 4, generator=gen(2))
    lengths = [7, 5, 4]
    padding = torch.arange(7)[None] >= torch.tensor(lengths)[:, None]
    want = _hand_l1(pred, frames, shift, lengths)
    assert losses.apc_l1_loss(pred, frames, shift, padding).item() == pytest.approx(want, abs=1e-6)
    # whatever sits in the padded steps (even NaN) leaves the loss unchanged
    pred2, frames2 = pred.clone(), frames.clone()
    pred2[padding], frames2[padding] = float("nan"), 1e6
    assert losses.apc_l1_loss(pred2, frames2, shift, padding).item() == pytest.approx(want, abs=1e-6)
    # no padding: the official nn.L1Loss()(pred[:, :-n], x[:, n:])
    full = F.l1_loss(pred[:, :-shift], frames[:, shift:]).item()
    assert losses.apc_l1_loss(pred, frames, shift).item() == pytest.approx(full, abs=1e-6)
    assert full == pytest.approx(_hand_l1(pred, frames, shift, [7, 7, 7]), abs=1e-6)


def test_apc_l1_loss_errors_and_target_gradient():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="no target"):
        losses.apc_l1_loss(x, x, 3)
    with pytest.raises(ValueError, match="shift"):
        losses.apc_l1_loss(x, x, 0)
    with pytest.raises(ValueError, match="shape"):
        losses.apc_l1_loss(x, x[:, :2], 1)
    p, t = torch.randn(2, 5, 3, requires_grad=True), torch.randn(2, 5, 3, requires_grad=True)
    losses.apc_l1_loss(p, t, 2).backward()
    assert t.grad is None and p.grad is not None


# -- the encoder ---------------------------------------------------------------------------------
def test_padded_batch_equals_each_item_alone_and_padding_is_flagged():
    m = _method("encoder.dropout=0.3", "encoder.layers=3").eval()  # dropout off in eval
    enc = m.encoder
    x = torch.randn(3, 80, 20, generator=gen(3))
    lengths = torch.tensor([20, 13, 1])
    x[1, :, 13:] = 100.0  # padding content must not matter
    x[2, :, 1:] = -7.0
    out = enc(x, lengths, return_layers=True)
    assert out.tokens.shape == (3, 20, 16) and len(out.layers) == 3
    assert torch.equal(out.padding, torch.arange(20)[None] >= lengths[:, None])
    for b, n in enumerate(lengths.tolist()):
        alone = enc(x[b:b + 1, :, :n], return_layers=True)
        assert torch.allclose(alone.tokens[0], out.tokens[b, :n], atol=1e-6)
        for la, lb in zip(alone.layers, out.layers):
            assert torch.allclose(la[0], lb[b, :n], atol=1e-6)
    pooled = enc.pool(out)  # clip embedding: mean over valid frames only
    assert torch.allclose(pooled[1], out.tokens[1, :13].mean(0), atol=1e-6)


def test_causality_no_peeking():
    """Outputs (and so predictions) at steps <= t do not change when frames after t change."""
    m = _method().eval()
    x = torch.randn(2, 80, 30, generator=gen(4))
    t = 11
    y = torch.cat([x[..., :t + 1], torch.randn(2, 80, 30 - t - 1, generator=gen(5))], dim=-1)
    ox, oy = m.encoder(x, return_layers=True), m.encoder(y, return_layers=True)
    assert torch.allclose(ox.tokens[:, :t + 1], oy.tokens[:, :t + 1], atol=1e-6)
    assert not torch.allclose(ox.tokens[:, t + 1:], oy.tokens[:, t + 1:], atol=1e-3)
    for la, lb in zip(ox.layers, oy.layers):
        assert torch.allclose(la[:, :t + 1], lb[:, :t + 1], atol=1e-6)
    assert torch.allclose(m.postnet(ox.tokens[:, :t + 1]), m.postnet(oy.tokens[:, :t + 1]), atol=1e-6)


def test_residual_dropout_and_prenet_structure():
    m = _method("encoder.layers=3").eval()
    enc = m.encoder
    x = torch.randn(2, 80, 9, generator=gen(6))
    out = enc(x, return_layers=True)
    h = x.transpose(1, 2)
    y0, _ = enc.grus[0](h)  # 80 -> 16: no residual (widths differ), as the official code
    assert torch.allclose(out.layers[0], y0, atol=1e-6)
    y1, _ = enc.grus[1](y0)
    assert torch.allclose(out.layers[1], y1 + y0, atol=1e-6)  # equal widths: residual
    m2 = _method("encoder.residual=false").eval()
    o2 = m2.encoder(x, return_layers=True)
    assert torch.allclose(o2.layers[1], m2.encoder.grus[1](o2.layers[0])[0], atol=1e-6)
    m3 = _method("encoder.prenet_layers=2").eval()
    o3 = m3.encoder(x, return_layers=True)
    assert len(o3.layers) == 3 and o3.layers[0].shape == (2, 9, 16)  # prenet output first, as official
    assert torch.allclose(o3.layers[1], m3.encoder.grus[0](o3.layers[0])[0] + o3.layers[0], atol=1e-6)


def test_token_masks_and_too_short_clips_are_clear_errors():
    # shapes and lengths: tests/test_encoder_contract.py, for every encoder
    enc = _method().encoder
    with pytest.raises(ValueError, match="not supported"):
        enc(torch.zeros(1, 80, 5), mask=object())
    m = _method()
    with pytest.raises(ValueError, match="no target"):  # 3 frames cannot hold a target 3 steps on
        m({"audio": torch.zeros(2, 1, 320)}, 0, gen(), 10)


# -- the method ----------------------------------------------------------------------------------
def _gru_by_hand(gru, x):
    """PyTorch's GRU equations unrolled over time for one layer. x (T, I) -> (T, H), float64."""
    w_ih, w_hh = gru.weight_ih_l0.double(), gru.weight_hh_l0.double()
    b_ih, b_hh = gru.bias_ih_l0.double(), gru.bias_hh_l0.double()
    H = gru.hidden_size
    h = torch.zeros(H, dtype=torch.float64)
    outs = []
    for t in range(x.shape[0]):
        gi, gh = w_ih @ x[t] + b_ih, w_hh @ h + b_hh
        r = torch.sigmoid(gi[:H] + gh[:H])
        z = torch.sigmoid(gi[H:2 * H] + gh[H:2 * H])
        n = torch.tanh(gi[2 * H:] + r * gh[2 * H:])
        h = (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs)


def test_loss_matches_hand_computation():
    m = _method()
    audio = synth_clips(2, S / 16000)
    m.frontend.estimate_stats(audio)
    out = m({"audio": audio[:, None]}, 0, gen(), 10)
    x = m.features(audio).double()  # (B, 80, T)
    n, total, count = m.cfg.time_shift, 0.0, 0
    with torch.no_grad():
        for b in range(x.shape[0]):
            h0 = x[b].T  # (T, 80)
            h1 = _gru_by_hand(m.encoder.grus[0], h0)  # widths differ: no residual
            h2 = _gru_by_hand(m.encoder.grus[1], h1) + h1  # residual
            pred = h2 @ m.postnet.weight.double().T + m.postnet.bias.double()  # (T, 80)
            for t in range(h0.shape[0] - n):
                total += float((pred[t] - h0[t + n]).abs().sum())
                count += h0.shape[1]
    assert out["loss"].item() == pytest.approx(total / count, abs=1e-5)
    assert {"frame_std", "pred_std"} <= out.keys() and all(v.ndim == 0 for v in out.values())


def test_padded_batch_loss_counts_valid_pairs_only():
    """With lengths in the batch, the loss is the pooled L1 over each item's own valid pairs."""
    m = _method().eval()
    audio = synth_clips(2, S / 16000)
    m.frontend.estimate_stats(audio)
    lengths = torch.tensor([S, 4800])
    out = m({"audio": audio[:, None], "lengths": lengths}, 0, gen(), 10)
    x, fl = m.frontend(audio, lengths)
    n = m.cfg.time_shift
    with torch.no_grad():
        total, count = 0.0, 0
        for b in range(2):
            xb = x[b:b + 1, :, :int(fl[b])]
            pred = m.postnet(m.encoder(xb).tokens)[0]  # the item alone
            err = (pred[:-n] - xb[0].T[n:]).abs()
            total, count = total + float(err.sum()), count + err.numel()
    assert int(fl[1]) == 31 and out["loss"].item() == pytest.approx(total / count, abs=1e-5)


def test_config_errors():
    with pytest.raises(ConfigError, match="time_shift"):
        _method("method.time_shift=0")
    with pytest.raises(ConfigError, match="frontend.name"):
        _method("frontend={name: waveform}")
    with pytest.raises(ConfigError, match="rnn"):
        _method("encoder={name: audiontt, d: 64, base_d: 8}")
    with pytest.raises(ConfigError, match="clip_seconds"):
        _method("data.clip_seconds=0.02", "method.time_shift=5")
    with pytest.raises(ConfigError, match="encoder.dropout"):
        _method("encoder.dropout=1.0")
    with pytest.raises(ConfigError, match="encoder.layers"):
        _method("encoder.layers=0")


def test_short_run_lowers_the_loss_without_collapse():
    m = _method("encoder.hidden=32")
    audio = synth_clips(8, 0.5, seed=10)[:, None]  # one clip per class
    m.frontend.estimate_stats(audio[:, 0])
    hist = run_steps(m, audio, 40, lr=3e-3)
    first, last = first_last(hist)
    assert last < 0.8 * first, (first, last)
    assert hist[-1]["frame_std"] > 0.05 and hist[-1]["pred_std"] > 0.1  # not a constant output
    assert all(math.isfinite(h["loss"]) for h in hist)
