"""wav2vec 2.0: contrastive loss, distractors, quantizer terms, gradients, training, resume, export."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sslaudio.build import load_preset
from sslaudio.config import ConfigError
from sslaudio.methods import losses
from sslaudio.methods.wav2vec2 import sample_negatives
from tests.conftest import build_tiny, gen, run_steps, synth_batch

SR = 16000


def method(name: str, *overrides: str, clip: float = 0.5, batch: int = 4):
    return build_tiny(name, f"data.clip_seconds={clip}", f"train.batch_size={batch}", *overrides)


def cosine(a, b) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / max(math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)), 1e-8)


def contrastive_by_hand(pred: torch.Tensor, y: torch.Tensor, neg_idx: torch.Tensor, kappa: float):
    """fairseq compute_preds + wav2vec criterion, one frame at a time: logits [cos(p, y_i),
    cos(p, y_neg)...] / kappa, a distractor equal to the target at -inf; CE summed / M; correct =
    argmax 0 and not argmin 0 (first index wins ties, as torch)."""
    P, Y, idx = pred.tolist(), y.tolist(), neg_idx.tolist()
    total, correct = 0.0, 0
    for i in range(len(P)):
        logits = [cosine(P[i], Y[i]) / kappa]
        for j in idx[i]:
            logits.append(-math.inf if Y[j] == Y[i] else cosine(P[i], Y[j]) / kappa)
        top = max(logits)
        total += -(logits[0] - top - math.log(sum(math.exp(v - top) for v in logits)))
        first_max = logits.index(max(logits))
        first_min = logits.index(min(logits))
        correct += first_max == 0 and first_min != 0
    return total / len(P), correct / len(P)


# ---------------------------------------------------------------------------------------------
# the loss and the distractors


def test_contrastive_loss_matches_plain_python():
    g = gen(0)
    pred = torch.randn(6, 4, generator=g)
    y = torch.randn(6, 4, generator=g)
    y[4] = y[1]  # the same code at two frames: each is a -inf distractor of the other
    y[5] = pred[5] * 3.0  # cosine 1 with its prediction: ranked first
    neg_idx = torch.tensor([[1, 2, 3], [4, 0, 4], [0, 1, 5], [2, 2, 2], [1, 3, 0], [0, 1, 2]])
    loss, terms = losses.wav2vec2_contrastive(pred, y, neg_idx, temperature=0.1)
    want_loss, want_acc = contrastive_by_hand(pred, y, neg_idx, 0.1)
    assert loss.item() == pytest.approx(want_loss, rel=1e-5)
    assert terms["acc"].item() == pytest.approx(want_acc)
    # every distractor equal to the target: the loss of that frame is 0 and it counts as correct
    lone, t = losses.wav2vec2_contrastive(pred[:1], y[:1], torch.zeros(1, 5, dtype=torch.long))
    assert lone.item() == 0.0 and t["acc"].item() == 1.0
    # all candidates equal but not flagged (argmax == argmin == 0): wrong, as fairseq's count
    same = torch.ones(2, 3)
    _, t = losses.wav2vec2_contrastive(same, torch.tensor([[1.0, 1, 1], [2, 2, 2]]), torch.tensor([[1], [0]]))
    assert t["acc"].item() == 0.0


def negatives_by_hand(counts: list[int], n: int, seed: int) -> list[list[int]]:
    """The same uniform draws, mapped frame by frame: u * (c - 1) floored in [0, c - 2], +1 at or
    above the frame's own position, offset by its utterance's first row; a lone frame -> itself."""
    u = torch.rand((sum(counts), n), generator=gen(seed), dtype=torch.float64).tolist()
    out, row = [], 0
    for c in counts:
        for j in range(c):
            draws = []
            for v in u[row + j]:
                if c == 1:
                    draws.append(row + j)
                    continue
                k = min(int(v * (c - 1)), c - 2)
                draws.append(row + (k + 1 if k >= j else k))
            out.append(draws)
        row += c
    return out


def test_distractors_same_utterance_never_the_target_by_hand():
    counts = [5, 3, 1, 0, 2]
    idx = sample_negatives(torch.tensor(counts), 200, gen(3))
    assert idx.shape == (11, 200) and idx.dtype == torch.long
    assert idx.tolist() == negatives_by_hand(counts, 200, 3)
    row = 0
    for c in counts:
        for j in range(c):
            drawn = set(idx[row + j].tolist())
            others = set(range(row, row + c)) - {row + j}
            # only other masked frames of the same utterance, each of them (200 uniform draws)
            assert drawn == (others or {row + j})
        row += c


def test_distractors_equal_counts_reproduce_fairseq_mapping():
    """require_same_masks (every row T masked frames): fairseq's randint(0, T-1), `+= 1 where >=
    own index`, `+ b * T`; the same mapping applied to our uniform draws."""
    B, T, K = 3, 7, 50
    idx = sample_negatives(torch.full((B,), T), K, gen(5))
    u = torch.rand((B * T, K), generator=gen(5), dtype=torch.float64)
    raw = (u * (T - 1)).long().view(B, T, K)
    own = torch.arange(T).view(1, T, 1)
    want = raw + (raw >= own).long() + torch.arange(B).view(B, 1, 1) * T
    assert torch.equal(idx, want.view(B * T, K))


# ---------------------------------------------------------------------------------------------
# the method's loss, by hand


class Recorder:
    """Wraps a masker and keeps the last mask it drew."""

    def __init__(self, masker):
        self.masker, self.mask, self.cfg = masker, None, masker.cfg

    def __call__(self, *args):
        self.mask = self.masker(*args)
        return self.mask


def perplexity_by_hand(logits: torch.Tensor) -> float:
    """(M, G, V) logits: sum over groups of exp(entropy of the frame-averaged softmax)."""
    M, G, V = logits.shape
    total = 0.0
    for grp in range(G):
        avg = [0.0] * V
        for i in range(M):
            row = logits[i, grp].tolist()
            z = sum(math.exp(v - max(row)) for v in row)
            for v in range(V):
                avg[v] += math.exp(row[v] - max(row)) / z / M
        total += math.exp(-sum(p * math.log(p + 1e-7) for p in avg))
    return total


@pytest.mark.parametrize("name", ["wav2vec2-wave", "wav2vec2"])
def test_method_loss_matches_hand_computation(name):
    """Eval mode (no dropout, argmax codes): the targets are the quantized features of exactly the
    masked valid frames; distractors from the generator after the mask; total = contrastive + 0.1
    diversity + 10 feature penalty, the diversity from the softmax perplexity."""
    m = method(name, "masker.require_same_masks=false").eval()
    m.masker = Recorder(m.masker)
    audio = synth_batch(1, 0.5)[:3]
    lengths = torch.tensor([8000, 6000, 8000])  # the second clip is padded
    out = m({"audio": audio, "lengths": lengths}, 0, gen(7), 10)
    x, xl = m.frontend(audio[:, 0], lengths)
    padding = m.encoder.token_padding(xl, x.shape)
    assert padding[1].any() and not padding[0].any()
    rng = gen(7)
    mask = m.masker.masker(m.encoder.token_grid(x.shape), 3, padding, rng)
    assert torch.equal(mask.masked, m.masker.mask.masked) and not (mask.masked & padding).any()
    enc = m.encoder(x, xl, mask=mask)
    counts = mask.masked.sum(1).tolist()
    assert len(set(counts)) > 1  # rows with different masked counts
    feats = torch.cat([enc.features[b, mask.masked[b]] for b in range(3)])  # utterance by utterance
    tokens = torch.cat([enc.tokens[b, mask.masked[b]] for b in range(3)])
    q = m.quantizer(feats, m.temperature(0))
    y, pred = m.project_q(q.codes), m.final_proj(tokens)
    neg_idx = sample_negatives(torch.tensor(counts), m.cfg.num_negatives, rng)
    contrastive, acc = contrastive_by_hand(pred, y, neg_idx, m.cfg.logit_temp)
    assert out["contrastive"].item() == pytest.approx(contrastive, rel=1e-5)
    assert out["acc"].item() == pytest.approx(acc)
    G, V = m.cfg.latent_groups, m.cfg.latent_vars
    ppl = perplexity_by_hand(m.quantizer.logits(feats).float())
    assert out["prob_ppl"].item() == pytest.approx(ppl, rel=1e-4)
    assert out["diversity"].item() == pytest.approx((G * V - ppl) / (G * V), rel=1e-4)
    pen = out["feature_pen"].item()
    assert (pen > 0) == (name == "wav2vec2-wave")  # no learned extractor on log-mel frames
    want = contrastive + 0.1 * (G * V - ppl) / (G * V) + 10.0 * pen
    assert m.cfg.diversity_weight == 0.1 and m.cfg.feature_pen_weight == 10.0
    assert out["loss"].item() == pytest.approx(want, rel=1e-5)


def test_feature_penalty_is_mean_square_of_valid_conv_features():
    m = method("wav2vec2-wave").eval()
    audio = synth_batch(1, 0.5)[:2, 0]
    with torch.no_grad():
        raw = m.encoder.extractor(audio, torch.full((2,), audio.shape[1]))[0]  # (B, C, T)
        out = m.encoder(audio)
    want = sum(v * v for v in raw.flatten().tolist()) / raw.numel()
    assert out.features_pen.item() == pytest.approx(want, rel=1e-4)


def test_temperature_schedule():
    cfg = load_preset("wav2vec2").method
    assert cfg["latent_temp"] == [2.0, 0.5, 0.999995]
    m = method("wav2vec2", "method.latent_temp=[2.0, 0.5, 0.999995]")
    assert m.temperature(0) == 2.0
    assert m.temperature(1000) == pytest.approx(2.0 * 0.999995 ** 1000, rel=1e-12)
    assert m.temperature(300_000) == 0.5  # 2 * 0.999995^300000 = 0.446 < 0.5
    out = m({"audio": synth_batch(1, 0.5)[:2]}, 1000, gen(0), 10)
    assert out["temp"].item() == pytest.approx(2.0 * 0.999995 ** 1000, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# gradients


def test_gradients_reach_every_part_and_feature_grad_mult_scales_the_extractor():
    grads = {}
    for mult in (1.0, 0.1):
        m = method("wav2vec2-wave", f"encoder.feature_grad_mult={mult}").train()
        assert all(p.requires_grad for p in m.parameters())  # nothing is frozen
        torch.manual_seed(0)
        m({"audio": synth_batch(1, 0.5)[:3]}, 0, gen(1), 10)["loss"].backward()
        grads[mult] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, missing
        for n in ("quantizer.weight", "quantizer.bias", "quantizer.codebook", "project_q.weight",
                  "final_proj.weight", "encoder.mask_emb", "encoder.extractor.convs.0.weight"):
            assert n in grads[mult] or any(k.startswith(n) for k in grads[mult]), n
    for n, g in grads[1.0].items():
        if n.startswith("encoder.extractor."):  # the conv extractor: gradient x 0.1, nothing else
            assert torch.allclose(grads[0.1][n], 0.1 * g, rtol=1e-4, atol=1e-6), n
        else:
            assert torch.equal(grads[0.1][n], g), n


def test_quantizer_bias_is_not_decayed():
    m = method("wav2vec2")
    decay, no_decay = m.param_groups(0.01)
    assert any(p is m.quantizer.bias for p in no_decay["params"])
    assert not any(p is m.quantizer.bias for p in decay["params"])
    assert any(p is m.quantizer.weight for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_codebook_collapse_is_counted_and_resets():
    m = method("wav2vec2").train()
    audio = synth_batch(1, 0.5)[:2]
    with torch.no_grad():
        w = m.quantizer.weight.clone()
        m.quantizer.weight.zero_()
        m.quantizer.bias[:, 0] = 100.0  # every frame picks codeword 0 of each group: code_ppl = G
    seen = [m({"audio": audio}, s, gen(s), 10) for s in range(3)]
    assert [o["codebook_collapse"].item() for o in seen] == [1.0, 2.0, 3.0]
    assert seen[-1]["code_ppl"].item() == pytest.approx(m.cfg.latent_groups)
    with torch.no_grad():
        m.quantizer.weight.copy_(w)
        m.quantizer.bias.zero_()
    assert m({"audio": audio}, 3, gen(3), 10)["codebook_collapse"].item() == 0.0
    # the trainer prints (and logs) a warning once the counter passes collapse_warn_steps
    row = {"step": 150, "codebook_collapse": 120.0, "code_ppl": 2.0}
    (note,) = m.log_warnings(row)
    assert "collapsed" in note and "120 steps" in note
    assert m.log_warnings({**row, "codebook_collapse": 99.0}) == []


def test_config_checks():
    with pytest.raises(ConfigError, match="mask_token"):
        method("wav2vec2", "encoder.mask_token=false")
    with pytest.raises(ConfigError, match="latent_groups"):
        method("wav2vec2", "method.latent_groups=3")
    with pytest.raises(ConfigError, match=r"latent_temp\[0\]"):
        method("wav2vec2", "method.latent_temp=[0.4, 0.5, 0.9]")
    with pytest.raises(ConfigError, match="mode: replace"):
        method("wav2vec2", "masker.mode=keep")


# ---------------------------------------------------------------------------------------------
# training, resume, export


def varied(B: int, seconds: float, seed: int = 0) -> torch.Tensor:
    """(B, 1, S) clips of tones and noise bursts switching on and off: frames that differ within a
    clip, so the distractors are not all one code."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    out = []
    for _ in range(B):
        x = 0.01 * rng.standard_normal(t.size)
        for _ in range(6):
            on, dur = rng.uniform(0, seconds), rng.uniform(0.05, 0.4)
            env = (t > on) & (t < on + dur)
            if rng.random() < 0.5:
                x += rng.uniform(0.1, 0.5) * np.sin(2 * np.pi * rng.uniform(100, 4000) * t) * env
            else:
                x += rng.uniform(0.05, 0.3) * rng.standard_normal(t.size) * env
        out.append(x)
    return torch.tensor(np.stack(out), dtype=torch.float32).unsqueeze(1)


def evaluate(m, audio: torch.Tensor) -> tuple[float, float]:
    """Eval-mode contrastive loss and accuracy (argmax codes, no dropout) on fixed masks."""
    m.eval()
    with torch.no_grad():
        outs = [m({"audio": audio}, 0, gen(1000 + i), 30) for i in range(3)]
    m.train()
    return (float(np.mean([o["contrastive"].item() for o in outs])),
            float(np.mean([o["acc"].item() for o in outs])))


def test_short_run_learns_without_collapse():
    m = method("wav2vec2", clip=0.75, batch=8).train()
    audio = varied(8, 0.75, seed=1)
    m.frontend.estimate_stats(audio[:, 0])
    loss0, acc0 = evaluate(m, audio)
    hist = run_steps(m, audio, 25, lr=1e-3, weight_decay=0.01)
    loss1, acc1 = evaluate(m, audio)
    assert loss1 < loss0 - 0.3 and acc1 > acc0 + 0.1, (loss0, acc0, loss1, acc1)
    # the codebook stays in use: far above one codeword per group, never flagged
    assert min(h["code_ppl"] for h in hist) > 10 * m.cfg.latent_groups, [h["code_ppl"] for h in hist]
    assert all(h["codebook_collapse"] == 0 for h in hist)


def test_resume_is_bit_identical_and_export_has_no_quantizer(audio_dir, tmp_path):
    from sslaudio.inference import load_encoder
    from sslaudio.train import fit

    preset = load_preset("tiny/wav2vec2", ["train.steps=4", "train.ckpt_every=2", "train.batch_size=4",
                                           "train.log_every=1", "data.num_workers=0", "data.clip_seconds=1.0"])
    fit(preset, [str(audio_dir)], tmp_path / "a", device="cpu")
    fit(preset, [str(audio_dir)], tmp_path / "b", device="cpu")
    shutil.rmtree(tmp_path / "b" / "ckpt" / "step-000000004")
    assert fit(preset, [str(audio_dir)], tmp_path / "b", device="cpu")["start_step"] == 2
    a = load_file(str(tmp_path / "a" / "ckpt" / "step-000000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "ckpt" / "step-000000004" / "model.safetensors"))
    assert a.keys() == b.keys() and {"quantizer.codebook", "project_q.weight", "collapse_steps"} <= a.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [[json.loads(r) for r in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in "ab"]
    assert len(rows[0]) == 4
    for ra, rb in zip(*rows):
        assert all(ra[k] == rb[k] for k in ("loss", "contrastive", "acc", "code_ppl", "temp")), (ra, rb)

    exported = load_file(str(tmp_path / "a" / "export" / "encoder.safetensors"))
    assert all(k.startswith(("frontend.", "encoder.")) for k in exported)
    assert not any(part in k for k in exported for part in ("quantizer", "project_q", "final_proj", "collapse"))
    assert {k[len("encoder."):] for k in exported if k.startswith("encoder.")} == \
        {k[len("encoder."):] for k in a if k.startswith("encoder.")}
    bundle = load_encoder(str(tmp_path / "a"))
    assert not any("quantizer" in n for n, _ in bundle.named_parameters())
    with torch.no_grad():
        clip, frames, _ = bundle.eval().embed(torch.randn(1, 16000) * 0.1)
    assert clip.shape == (1, bundle.encoder.frame_dim) and torch.isfinite(frames).all()


@pytest.mark.parametrize("name", ["wav2vec2", "hubert"])
def test_feature_norm_normalises_each_stacked_frame_as_fairseq(name):
    """encoder.feature_norm on log-mel frames: fairseq's `layer_norm` on the conv features before
    post_extract_proj (and, in wav2vec 2.0, the quantizer): each stacked frame standardised over its
    F * r values (eps 1e-5), so a frame's level and scale no longer reach the model; off, they do."""
    m = method(name, "encoder.feature_norm=true").eval()
    enc = m.encoder
    assert enc.feature_norm is not None and enc.feature_norm.eps == 1e-5
    audio = synth_batch(1, 0.5)[:2, 0]
    with torch.no_grad():
        x, _ = m.frontend(audio)
        out = enc(x)
        frames = enc.stack_frames(x)
        mu, var = frames.mean(-1, keepdim=True), frames.var(-1, unbiased=False, keepdim=True)
        torch.testing.assert_close(out.features, (frames - mu) / torch.sqrt(var + 1e-5), atol=1e-5, rtol=0)
        # per-frame gain and offset: x -> a_t x + b_t on every bin of frame t (stacked pairs share them)
        t = x.shape[-1] // enc.stack * enc.stack
        a = torch.rand(1, 1, t // enc.stack, generator=gen(2)).repeat_interleave(enc.stack, -1) + 0.5
        b = torch.randn(1, 1, t // enc.stack, generator=gen(3)).repeat_interleave(enc.stack, -1)
        y = x[..., :t] * a + b
        torch.testing.assert_close(enc(y).tokens, enc(x[..., :t]).tokens, atol=1e-4, rtol=0)
        plain = method(name, "encoder.feature_norm=false").eval().encoder
        assert plain.feature_norm is None
        assert (plain(y).tokens - plain(x[..., :t]).tokens).abs().max() > 1e-2
