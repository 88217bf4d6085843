"""data2vec and data2vec 2.0: targets, loss, teacher isolation, EMA, clone batches, resume."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sslaudio.build import load_preset
from sslaudio.config import ConfigError
from sslaudio.encoders.base import EncoderOut
from sslaudio.methods.data2vec import Data2Vec2
from tests.conftest import build_tiny, first_last, gen, run_steps

SR = 16000


def method(name: str, *overrides: str, clip: float = 0.5, batch: int = 4):
    return build_tiny(name, f"data.clip_seconds={clip}", f"train.batch_size={batch}", *overrides)


def tones(B: int, seconds: float, seed: int = 0) -> torch.Tensor:
    """(B, 1, S) clips of a few random tones plus noise, varied enough to need contextual features."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    out = []
    for _ in range(B):
        x = 0.05 * rng.standard_normal(t.size)
        for _ in range(3):
            f, on = rng.uniform(100, 4000), rng.uniform(0, seconds)
            x += rng.uniform(0.1, 0.5) * np.sin(2 * np.pi * f * t) * (t > on)
        out.append(x)
    return torch.tensor(np.stack(out), dtype=torch.float32).unsqueeze(1)


def hand_instance_norm(x: torch.Tensor) -> torch.Tensor:
    """Explicit loops: standardise every (sample, channel) over time, biased var, eps 1e-5."""
    y = torch.empty_like(x)
    for b in range(x.shape[0]):
        for d in range(x.shape[2]):
            v = x[b, :, d]
            y[b, :, d] = (v - v.mean()) / torch.sqrt(((v - v.mean()) ** 2).mean() + 1e-5)
    return y


def hand_targets(ffns: list[torch.Tensor], k: int) -> torch.Tensor:
    top = [hand_instance_norm(f.float()) for f in ffns[-k:]]
    return sum(top) / k


def teacher_ffns_by_hand(m, projected: torch.Tensor) -> list[torch.Tensor]:
    """The teacher's transformer written out block by block on the unmasked projected features."""
    pos_conv = m.teacher["pos_conv"] if isinstance(m, Data2Vec2) else m.encoder.pos_conv
    h = m.teacher["norm"](projected + pos_conv(projected))
    bias = None
    if m.encoder.cfg.alibi:  # ALiBi: -slope_h * scale_h * |i - j|, slope_h = 2^(-8 (h + 1) / H)
        B, T, H = h.shape[0], h.shape[1], m.encoder.cfg.heads
        bias = torch.zeros(B, H, T, T)
        for head in range(H):
            slope = 2 ** (-8 * (head + 1) / H) * float(m.encoder.alibi_scale[head].clamp_min(0))
            for i in range(T):
                for j in range(T):
                    bias[:, head, i, j] = -slope * abs(i - j)
    ffns = []
    for block in m.teacher["blocks"].blocks:
        h, f = block(h, None, bias)
        ffns.append(f)
    return ffns


def regression_by_hand(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    per_token = [((pred[i] - y[i]) ** 2).sum() / math.sqrt(pred.shape[1]) for i in range(pred.shape[0])]
    return sum(per_token) / len(per_token)


# ---------------------------------------------------------------------------------------------
# targets


@pytest.mark.parametrize("name", ["data2vec-wave", "data2vec2-wave"])
def test_targets_from_known_layers_match_loops(name, monkeypatch):
    m = method(name)
    B, T, D, L = 3, 11, m.encoder.dim, m.encoder.cfg.depth
    known = [torch.randn(B, T, D) * (i + 1) + i for i in range(L)]
    monkeypatch.setattr(m, "teacher_layers", lambda x, lengths, out: known)
    frame_padding = torch.zeros(B, T, dtype=torch.bool)
    y = m.targets(None, None, EncoderOut(tokens=None, frame_padding=frame_padding))
    assert torch.allclose(y, hand_targets(known, m.cfg.top_k), atol=1e-5)


@pytest.mark.parametrize("name", ["data2vec-wave", "data2vec2-wave"])
def test_teacher_targets_equal_unmasked_student_at_init(name):
    """At init teacher == student, so the targets must be the student's own eval-mode FFN outputs on
    the unmasked input: the teacher sees unmasked frames through the encoder's transformer."""
    m = method(name)
    wav = m.features(tones(2, 0.5)[:, 0])
    lengths = torch.full((2,), wav.shape[1])
    m.eval()
    with torch.no_grad():
        out = m.encoder(wav, lengths, return_layers=True)
        y = m.targets(wav, lengths, out)
        by_hand = hand_targets(teacher_ffns_by_hand(m, out.local), m.cfg.top_k)
    assert torch.allclose(y, hand_targets(out.ffn, m.cfg.top_k), atol=1e-4)
    assert torch.allclose(y, by_hand, atol=1e-4)


def test_data2vec_loss_matches_hand_computation():
    m = method("data2vec-wave").eval()  # no dropout, so the hand computation replays the same graph
    audio = tones(4, 0.5)
    out = m({"audio": audio}, 0, gen(7), 10)
    wav = m.features(audio[:, 0])
    lengths = torch.full((4,), wav.shape[1])
    mask = m.masker(m.encoder.token_grid(wav.shape), 4, None, gen(7))
    assert mask.mode == "replace" and 0 < int(mask.masked.sum()) < mask.masked.numel()
    st = m.encoder(wav, lengths, mask=mask)
    with torch.no_grad():
        y = hand_targets(teacher_ffns_by_hand(m, st.local), m.cfg.top_k)
    pred = m.final_proj(st.tokens[mask.masked])
    assert torch.allclose(out["loss"], regression_by_hand(pred, y[mask.masked]), atol=1e-5)


def test_data2vec2_loss_matches_hand_computation():
    m = method("data2vec2-wave").eval()
    K = m.cfg.clone_batch
    audio = tones(2, 0.5)
    out = m({"audio": audio}, 0, gen(7), 10)
    wav = m.features(audio[:, 0])
    lengths = torch.full((2,), wav.shape[1])
    rng = gen(7)
    mask = m.masker(m.encoder.token_grid(wav.shape), 2 * K, None, rng)
    st = m.encoder(wav, lengths, mask=mask)
    T, D = mask.masked.shape[1], m.encoder.dim
    # decoder input by hand: visible tokens at their frames, N(0, 0.01^2) noise at hidden frames
    noise = torch.randn((2 * K, T - st.tokens.shape[1], D), generator=rng) * m.cfg.mask_noise_std
    full = torch.zeros(2 * K, T, D)
    for r in range(2 * K):
        vis = (~mask.masked[r]).nonzero().flatten()
        hid = mask.masked[r].nonzero().flatten()
        full[r, vis] = st.tokens[r]
        full[r, hid] = noise[r]
    pred = m.decoder(full)
    with torch.no_grad():
        y = hand_targets(teacher_ffns_by_hand(m, st.local), m.cfg.top_k)
    y = torch.stack([y[r // K] for r in range(2 * K)])  # one teacher pass per clip, rows b*K+k
    want = regression_by_hand(pred[mask.masked], y[mask.masked])
    assert torch.allclose(out["loss"], want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# loss locality


class Recorder:
    """Wraps a masker and keeps the last mask it drew."""

    def __init__(self, masker):
        self.masker, self.mask = masker, None
        self.cfg = masker.cfg

    def __call__(self, *args):
        self.mask = self.masker(*args)
        return self.mask


@pytest.mark.parametrize("name", ["data2vec-wave", "data2vec2-wave"])
def test_loss_ignores_predictions_at_visible_frames(name):
    """Offsetting the student's per-frame output (data2vec: encoder tokens before final_proj;
    2.0: decoder predictions) at visible frames leaves the loss bit-identical; at hidden ones not."""
    m = method(name)
    m.masker = Recorder(m.masker)
    audio = tones(2, 0.5)

    def loss_with(offset_at: str | None) -> torch.Tensor:
        def offset(x: torch.Tensor) -> torch.Tensor:
            hidden = m.masker.mask.masked.unsqueeze(-1)
            return x + 100.0 * (~hidden if offset_at == "visible" else hidden)

        def hook(module, args, output):
            if offset_at is None:
                return output
            if name == "data2vec-wave":
                output.tokens = offset(output.tokens)
                return output
            return offset(output)

        handle = (m.encoder if name == "data2vec-wave" else m.decoder).register_forward_hook(hook)
        torch.manual_seed(3)  # same dropout draws in every call
        loss = m({"audio": audio}, 0, gen(5), 10)["loss"]
        handle.remove()
        return loss

    base = loss_with(None)
    assert torch.equal(loss_with("visible"), base)
    assert not torch.allclose(loss_with("hidden"), base)


# ---------------------------------------------------------------------------------------------
# teacher isolation, EMA


@pytest.mark.parametrize("name", ["data2vec-wave", "data2vec2-wave"])
def test_gradients_reach_student_only_and_ema_is_exact(name):
    m = method(name).train()
    opt = torch.optim.AdamW(m.param_groups(0.01), lr=1e-3)
    out = m({"audio": tones(2, 0.5)}, 0, gen(1), 10)
    assert torch.isfinite(out["loss"]) and set(out) >= {"loss", "target_var", "pred_var", "emb_std",
                                                                 "frame_std", "ema_tau"}
    out["loss"].backward()
    for p in m.teacher.parameters():
        assert p.grad is None and not p.requires_grad
    head = m.final_proj.weight if name == "data2vec-wave" else m.decoder.proj.weight
    for p in (m.encoder.extractor.convs[0].weight, m.encoder.blocks.blocks[0].fc1.weight,
              m.encoder.pos_conv.convs[0].weight, head):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0
    opt.step()
    before = [p.clone() for p in m.teacher.parameters()]
    step, max_steps = 20, 300
    span = m.cfg.ema.steps or max_steps  # 0: the whole run
    tau = m.cfg.ema.start + (m.cfg.ema.end - m.cfg.ema.start) * min(step / span, 1.0)
    m.after_step(step, max_steps)
    student = dict(m.encoder.named_parameters())
    names = [n for n, _ in m.teacher.named_parameters()]
    # data2vec EMAs the transformer (norm + blocks) only; 2.0 also the positional conv
    assert any(n.startswith("pos_conv") for n in names) == (name == "data2vec2-wave")
    for n, old, new in zip(names, before, m.teacher.parameters()):
        want = old * tau + student[n].detach() * (1 - tau)
        assert torch.allclose(new, want, atol=1e-7, rtol=0), n
    assert m.tau(0, 300) == pytest.approx(m.cfg.ema.start) and m.tau(10**6, 300) == pytest.approx(m.cfg.ema.end)


def test_teacher_stays_in_eval_mode():
    m = method("data2vec-wave")
    m.train()
    assert m.encoder.training and not any(x.training for x in m.teacher.modules())


def test_config_checks():
    with pytest.raises(ConfigError, match="top_k"):
        method("data2vec-wave", "method.top_k=9")
    with pytest.raises(ConfigError, match="mode: keep"):
        method("data2vec2-wave", "masker.mode=replace", "masker.require_same_masks=true")
    with pytest.raises(ConfigError, match="decoder_groups"):
        method("data2vec2-wave", "method.decoder_groups=5")


# ---------------------------------------------------------------------------------------------
# data2vec 2.0: one teacher pass per clip, K masked copies


def test_data2vec2_teacher_once_per_clip_student_on_clones():
    m = method("data2vec2-wave").train()
    K, B = m.cfg.clone_batch, 3
    seen = {"teacher": [], "student": []}
    m.teacher["blocks"].blocks[0].register_forward_hook(lambda mod, a, o: seen["teacher"].append(a[0].shape))
    m.encoder.blocks.blocks[0].register_forward_hook(lambda mod, a, o: seen["student"].append(a[0].shape))
    m.masker = Recorder(m.masker)
    m({"audio": tones(B, 0.5)}, 0, gen(2), 10)
    T = m.masker.mask.masked.shape[1]
    assert seen["teacher"] == [torch.Size([B, T, m.encoder.dim])]  # once, full length, B rows
    (shape,) = seen["student"]
    n_vis = int((~m.masker.mask.masked[0]).sum())
    assert shape == torch.Size([B * K, n_vis, m.encoder.dim]) and n_vis < T  # visible frames only
    masks = m.masker.mask.masked.view(B, K, T)
    for b in range(B):
        distinct = {tuple(masks[b, k].tolist()) for k in range(K)}
        assert len(distinct) == K  # every copy of a clip is masked differently


# ---------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("name,steps", [("data2vec-wave", 30), ("data2vec2-wave", 60)])
def test_short_run_lowers_loss_without_collapse(name, steps):
    m = method(name, "method.ema.steps=1000", batch=8).train()
    audio = tones(8, 0.5, seed=1)
    hist = run_steps(m, audio, steps, lr=2e-3, weight_decay=0.01)
    first, last = first_last(hist, n=3)
    # the loss of predicting 0 (the targets' per-clip mean) for the final teacher's targets
    with torch.no_grad():
        wav = m.features(audio[:, 0])
        lengths = torch.full((8,), wav.shape[-1])
        y = m.targets(wav, lengths, m.encoder(wav, lengths))
    trivial = float(y.pow(2).sum(-1).mean() / math.sqrt(y.shape[-1]))
    assert last < 0.7 * first and last < 0.9 * trivial, ([h["loss"] for h in hist], trivial)
    # fairseq's own collapse guards (min_target_var 0.1, min_pred_var 0.01), and the spread of
    # student frames; mean-pooled clip embeddings (emb_std) shrink by design with IN targets
    end = hist[-1]
    assert end["target_var"] > 0.1 and end["pred_var"] > 0.05, end
    assert end["frame_std"] > 0.005 and end["emb_std"] > 1e-4, end


def test_data2vec_resume_is_bit_identical(tmp_path):
    from sslaudio.train import fit

    rng = np.random.default_rng(0)
    data = tmp_path / "wavs"
    data.mkdir()
    t = np.arange(int(1.5 * SR)) / SR
    for i in range(6):
        x = 0.05 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t)
        sf.write(str(data / f"{i}.wav"), x.astype(np.float32), SR)
    preset = load_preset("tiny/data2vec-wave", ["train.steps=4", "train.ckpt_every=2", "train.batch_size=4",
                                           "train.log_every=1", "data.num_workers=0"])
    fit(preset, [str(data)], tmp_path / "a", device="cpu")
    fit(preset, [str(data)], tmp_path / "b", device="cpu")
    shutil.rmtree(tmp_path / "b" / "ckpt" / "step-000000004")
    summary = fit(preset, [str(data)], tmp_path / "b", resume=True, device="cpu")
    assert summary["start_step"] == 2
    a = load_file(str(tmp_path / "a" / "ckpt" / "step-000000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "ckpt" / "step-000000004" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("teacher.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------
# on log-mel patches (ViT, the tiny presets): the EAT form


def hand_layer_norm(y: torch.Tensor) -> torch.Tensor:
    mean = y.mean(-1, keepdim=True)
    return (y - mean) / torch.sqrt(((y - mean) ** 2).mean(-1, keepdim=True) + 1e-5)


def mel_targets_by_hand(m, spec: torch.Tensor) -> torch.Tensor:
    """At init the EMA teacher is a copy of the student ViT: the targets must be the student's own
    eval-mode FFN outputs on the unmasked spectrogram, top-K instance-normed, then layer-normed
    when the preset asks for it."""
    with torch.no_grad():
        ffns = m.encoder(spec, torch.full((spec.shape[0],), spec.shape[-1]), return_layers=True).ffn
    y = hand_targets(ffns, m.cfg.top_k)
    return hand_layer_norm(y) if m.cfg.final_norm == "layer_norm" else y


def grid_of(tokens: torch.Tensor, fg: int, tg: int) -> torch.Tensor:
    """(N, Fg*Tg, D) row-major tokens -> (N, D, Fg, Tg) by explicit loops."""
    out = torch.zeros(tokens.shape[0], tokens.shape[2], fg, tg)
    for f in range(fg):
        for t in range(tg):
            out[:, :, f, t] = tokens[:, f * tg + t]
    return out


def decoder2d_by_hand(dec, x: torch.Tensor, fg: int, tg: int) -> torch.Tensor:
    for conv, _ in zip(dec.convs, dec.norms):
        h = F.conv2d(grid_of(x, fg, tg), conv.weight, conv.bias, padding=conv.kernel_size[0] // 2,
                     groups=conv.groups)
        h = torch.stack([h[:, :, f, t] for f in range(fg) for t in range(tg)], dim=1)  # back to tokens
        h = F.gelu(hand_layer_norm(h))
        x = h + x if h.shape[-1] == x.shape[-1] else h
    return dec.proj(x)


def test_mel_data2vec_loss_matches_hand_computation():
    m = method("data2vec").eval()
    audio = tones(4, 0.5)
    out = m({"audio": audio}, 0, gen(7), 10)
    spec = m.features(audio[:, 0])
    mask = m.masker(m.encoder.token_grid(spec.shape), 4, None, gen(7))
    assert mask.mode == "replace" and 0 < int(mask.masked.sum()) < mask.masked.numel()
    st = m.encoder(spec, torch.full((4,), spec.shape[-1]), mask=mask)
    pred = m.final_proj(st.tokens[mask.masked])
    y = mel_targets_by_hand(m, spec)
    assert torch.allclose(out["loss"], regression_by_hand(pred, y[mask.masked]), atol=1e-5)


@pytest.mark.parametrize("cls_weight", [None, 1.0], ids=["preset-0.01", "eat-1"])
def test_mel_data2vec2_loss_matches_hand_computation(cls_weight):
    """The image recipe on patches: 2-D conv decoder over the patch grid, layer-normed targets, and
    the CLS loss at the tiny preset's weight (data2vec 2.0's 0.01) and at EAT's 1."""
    m = method("data2vec2", *([f"method.cls_loss={cls_weight}"] if cls_weight else [])).eval()
    K, B = m.cfg.clone_batch, 2
    assert m.cfg.cls_loss == (cls_weight or 0.01) and m.cfg.final_norm == "layer_norm"
    audio = tones(B, 0.5)
    out = m({"audio": audio}, 0, gen(7), 10)
    spec = m.features(audio[:, 0])
    rng = gen(7)
    fg, tg = m.encoder.token_grid(spec.shape)
    mask = m.masker((fg, tg), B * K, None, rng)
    st = m.encoder(spec, torch.full((B,), spec.shape[-1]), mask=mask)
    N, D = fg * tg, m.encoder.dim
    noise = torch.randn((B * K, N - st.tokens.shape[1], D), generator=rng) * m.cfg.mask_noise_std
    full = torch.zeros(B * K, N, D)
    for r in range(B * K):
        full[r, (~mask.masked[r]).nonzero().flatten()] = st.tokens[r]
        full[r, mask.masked[r].nonzero().flatten()] = noise[r]
    pred = decoder2d_by_hand(m.decoder, full, fg, tg)
    assert torch.allclose(pred, m.decoder(full, None, (fg, tg)), atol=1e-5)
    y = mel_targets_by_hand(m, spec)
    y_k = torch.stack([y[r // K] for r in range(B * K)])
    patch_loss = regression_by_hand(pred[mask.masked], y_k[mask.masked])
    cls_target = torch.stack([y[r // K].mean(0) for r in range(B * K)])  # clip mean of the targets
    cls_loss = regression_by_hand(st.cls, cls_target)
    assert torch.allclose(out["cls_loss"], cls_loss, atol=1e-5)  # logged: the per-clip mean
    # the official formula (fairseq data2vec2.py / EAT_pretraining.py + ModelCriterion): per-element
    # losses (pred - y)^2 / sqrt(D); losses["regression"] over the masked tokens (weight d2v_loss 1),
    # losses["cls"] over the B*K clips times cls_loss * sample_size; the summed loss divided by
    # sample_size = the number of masked tokens
    sample_size = int(mask.masked.sum())
    reg_sum = ((pred[mask.masked] - y_k[mask.masked]) ** 2 / math.sqrt(D)).sum()
    cls_sum = ((st.cls - cls_target) ** 2 / math.sqrt(D)).sum() * (m.cfg.cls_loss * sample_size)
    official = (reg_sum + cls_sum) / sample_size
    assert torch.allclose(out["loss"], official, atol=1e-5, rtol=1e-5)
    # i.e. the CLS term is B*K times the clip mean (EAT: 12 x 16 = 192 per GPU), not the clip mean
    assert torch.allclose(out["loss"], patch_loss + m.cfg.cls_loss * B * K * cls_loss, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out["loss"], patch_loss + m.cfg.cls_loss * cls_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["data2vec", "data2vec2"])
def test_mel_gradients_reach_student_only_and_teacher_is_whole_vit_ema(name):
    m = method(name).train()
    out = m({"audio": tones(2, 0.5)}, 0, gen(1), 10)
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    head = m.final_proj.weight if name == "data2vec" else m.decoder.proj.weight
    for p in (m.encoder.patch_embed.proj.weight, m.encoder.blocks.blocks[0].fc1.weight, head):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0
    if name == "data2vec2":  # the CLS loss trains the CLS token
        assert float(m.encoder.cls.grad.abs().sum()) > 0
    torch.optim.SGD(m.parameters(), lr=0.1).step()
    before = {n: p.clone() for n, p in m.teacher.named_parameters()}
    student = dict(m.encoder.named_parameters())
    assert before.keys() == student.keys()  # EAT: every encoder weight has an EMA copy
    m.after_step(10, 300)
    tau = m.tau(10, 300)
    for n, p in m.teacher.named_parameters():
        assert torch.allclose(p, before[n] * tau + student[n].detach() * (1 - tau), atol=1e-6, rtol=0), n


@pytest.mark.parametrize("name", ["data2vec", "data2vec2"])
def test_mel_short_run_lowers_loss_without_collapse(name):
    m = method(name, "method.ema.steps=1000", batch=8).train()
    hist = run_steps(m, tones(8, 0.5, seed=1), 40, lr=2e-3, weight_decay=0.01)
    first, last = first_last(hist, n=3)
    assert last < 0.7 * first, [h["loss"] for h in hist]
    end = hist[-1]
    assert end["target_var"] > 0.1 and end["pred_var"] > 0.05, end
    assert end["frame_std"] > 0.005, end


def test_mel_config_checks():
    with pytest.raises(ConfigError, match="cls_loss needs a CLS token"):
        method("data2vec2", "encoder.cls_token=false")


def test_eat_preset_uses_post_ln_blocks():
    """EAT (layer_norm_first false): post-LN blocks after an input LayerNorm, no final norm."""
    p = load_preset("data2vec2-mel")
    assert p.encoder["norm_first"] is False and p.method["cls_loss"] == 1.0
    m = method("data2vec2", "encoder.norm_first=false").eval()
    assert m.encoder.input_norm is not None and not any(b.norm_first for b in m.encoder.blocks.blocks)
    assert m.teacher.input_norm is not None  # the teacher is an EMA of the whole ViT, input norm included
    out = m({"audio": tones(2, 0.5)}, 0, gen(7), 10)
    assert torch.isfinite(out["loss"]) and out["cls_loss"] > 0
