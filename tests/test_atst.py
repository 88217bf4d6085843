"""ATST-Clip, ATST-Frame and ATST-C2F: the dB mel frontend against the official transform, the ViT's
learned positions and chunks, each loss against a hand computation, frozen teachers and exact EMA,
a short run, exact resume through the trainer (C2F reading both teachers as sources), export and
extraction with 40 ms frames, and C2F's one-line errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio
from safetensors.torch import load_file

from sslaudio.build import build_method, load_preset
from sslaudio.config import ConfigError, component_config
from sslaudio.frontends import build_frontend
from sslaudio.inference import load_encoder
from sslaudio.masking import Mask
from sslaudio.methods.ema import momentum
from sslaudio.registry import METHODS
from tests.conftest import (
    build_tiny,
    first_last,
    gen,
    random_views,
    run_steps,
    synth_batch,
    use_views,
)

SR = 16000
SMALL = ["encoder.dim=32", "encoder.depth=2", "encoder.heads=2", "encoder.eval_blocks=2", "train.batch_size=4"]
HEADS = ["method.proj_hidden=64", "method.proj_dim=16"]


def tiny(name: str, *extra: str):
    """tiny/atst-NAME at 32 wide x 2 blocks (C2F: its own encoder, tiny/atst-frame's, unless overridden)."""
    small = [] if name == "c2f" else SMALL + HEADS
    return build_tiny(f"atst-{name}", *small, *extra).train()


def cos_loss(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (2 - 2 * F.cosine_similarity(p, t, dim=-1)).mean()


# -- frontend and encoder -----------------------------------------------------------------------

def test_mel_db_is_the_official_transform_per_clip():
    fe = build_frontend({"name": "mel_db"}, SR)
    g = gen(0)
    audio = torch.randn(3, 12345, generator=g) * torch.tensor([[0.1], [1e-3], [1.0]])
    audio[1, 5000:] = 0  # silence: the 80 dB floor below the clip's own maximum matters
    x, fl = fe(audio)
    # official transform.py: MelSpectrogram -> AmplitudeToDB(power, top_db 80) -> MinMax, per clip
    mel = torchaudio.transforms.MelSpectrogram(SR, f_min=60, f_max=7800, hop_length=160, win_length=1024,
                                               n_fft=1024, n_mels=64)
    to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=80)
    for b in range(3):
        ref = (to_db(mel(audio[b:b + 1]))[0] + 79.6482) / (50.6842 + 79.6482) * 2 - 1
        torch.testing.assert_close(x[b], ref, atol=1e-5, rtol=0)
    assert x.shape == (3, 64, 12345 // 160 + 1) and fl.tolist() == [78] * 3
    assert float(x[1].min()) == pytest.approx(float(x[1].max()) - 80 / 65.1662, abs=1e-5)
    # in a padded batch each item is floored below the maximum of its own valid frames (torchaudio's
    # batched AmplitudeToDB would use the loud first item's); frames away from the end as alone
    xp, flp = fe(torch.stack([audio[2], F.pad(audio[1, :8000], (0, 4345))]), torch.tensor([12345, 8000]))
    alone, _ = fe(audio[1:2, :8000])
    assert flp.tolist() == [78, 51]
    torch.testing.assert_close(xp[1, :, :46], alone[0, :, :46], atol=1e-5, rtol=0)
    assert float(alone.min()) < float(xp[0].min()) - 1
    fe.estimate_stats(audio * 100)  # fixed scaling: nothing is estimated
    torch.testing.assert_close(fe(audio)[0], x)


def test_vit_learned_positions_are_cut_and_long_inputs_chunked():
    m = tiny("clip")
    enc = m.target_encoder.eval()
    assert enc.pos_embed.shape == (1, 25, 32) and enc.frame_dim == 64 and enc.downsample == 640
    x = torch.randn(2, 64, 120, generator=gen(1))  # 30 columns: chunks of 25 and 5
    with torch.no_grad():
        out = enc(x, torch.tensor([120, 90]))
        # by hand: column t gets position t; each chunk is its own sequence with its own CLS
        def alone(xc):
            e = enc.patch_embed(xc)[0] + enc.pos_embed[0, : xc.shape[-1] // 4]
            h = torch.cat([enc.cls[0], e])[None]
            for blk in enc.blocks.blocks:
                h, _ = blk(h)
            return enc.norm(h)[0]
        a, b = alone(x[:1, :, :100]), alone(x[:1, :, 100:120])
        torch.testing.assert_close(out.tokens[0], torch.cat([a[1:], b[1:]]), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.cls[0], (25 * a[0] + 5 * b[0]) / 30, atol=1e-5, rtol=0)
        c = alone(x[1:, :, :88])[0]  # item 2: 22 valid columns, all in the first chunk
        torch.testing.assert_close(out.cls[1], c, atol=1e-5, rtol=0)
        frames, lengths = enc.to_frames(out)  # cls_frames: [CLS, token] per frame
        assert frames.shape == (2, 30, 64) and lengths.tolist() == [30, 22]
        torch.testing.assert_close(enc.pool(out)[0], torch.cat([out.cls[0], out.tokens[0].mean(0)]))


def test_embeddings_concatenate_the_last_blocks_as_the_official_evaluation():
    """encoder.eval_blocks n: what extraction reads is the final norm of each of the last n blocks,
    CLS included, side by side (audiossl get_intermediate_layers(n)); training sees the last block."""
    from sslaudio.inference import EncoderBundle

    with pytest.raises(ConfigError, match="eval_blocks"):
        tiny("frame", "encoder.eval_blocks=4")  # depth 2: at most its 3 hidden states
    m = tiny("clip", "encoder.eval_blocks=2")
    enc = m.target_encoder.eval()
    x = torch.randn(2, 64, 80, generator=gen(2))  # 20 columns: one chunk
    with torch.no_grad():
        trained = enc(x).tokens
        assert trained.shape == (2, 20, 32) and enc.frame_dim == 64
        e = enc.patch_embed(x) + enc.pos_embed[0, :20]
        h = torch.cat([enc.cls.expand(2, -1, -1), e], 1)
        per_block = []
        for blk in enc.blocks.blocks:
            h, _ = blk(h)
            per_block.append(enc.norm(h))
        want = torch.cat(per_block, -1)  # (2, 21, 64): block 1 then block 2
        bundle = EncoderBundle(m.frontend, enc, preset=None).eval()  # the preset only gives the sample rate
        assert enc.frame_dim == 128
        out = enc(x)
        torch.testing.assert_close(out.tokens, want[:, 1:], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.cls, want[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.tokens[..., 32:], trained, atol=1e-5, rtol=0)  # the last block's part
        frames, _ = enc.to_frames(out)
        assert frames.shape == (2, 20, 128)  # [CLS of both blocks, tokens of both blocks] per frame
        torch.testing.assert_close(enc.pool(out), torch.cat([want[:, 0], want[:, 1:].mean(1)], -1), atol=1e-5, rtol=0)
        bundle.set_layer(0)  # one chosen block: its raw output, one block wide
        assert enc.frame_dim == 64 and bundle(torch.zeros(1, 16000)).tokens.shape[-1] == 32
        bundle.set_layer(None)
        assert enc.frame_dim == 128
    every = tiny("clip", "encoder.eval_blocks=3").target_encoder.eval()  # depth + 1: the blocks' input too
    EncoderBundle(m.frontend, every, preset=None).eval()
    with torch.no_grad():
        hidden = every(x, return_layers=True).layers
        assert len(hidden) == 3 and every.frame_dim == 3 * 64
        out = every(x)
        torch.testing.assert_close(out.tokens, torch.cat([every.norm(h) for h in hidden], -1), atol=1e-5, rtol=0)


# -- losses against hand computations -----------------------------------------------------------

def test_clip_loss_is_the_averaged_symmetric_byol_on_cls(monkeypatch):
    m = tiny("clip")
    assert len(m.views.global_chains) == 2  # one mixup memory per crop
    views = random_views(m, B=6)
    use_views(monkeypatch, views)
    out = m({"audio": torch.zeros(6, 2, 10)}, 0, gen(0), 10)
    x = torch.cat(views)
    with torch.no_grad():
        p = m.predictor(m.projector(m.encoder(x).cls))
        t = m.target_projector(m.target_encoder(x).cls)
    want = 0.5 * (cos_loss(p[:6], t[6:]) + cos_loss(p[6:], t[:6]))
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    assert float(out["ema_tau"]) == pytest.approx(0.99)


def test_frame_loss_pairs_masked_frames_across_views(monkeypatch):
    m = tiny("frame")
    B = 3
    views = random_views(m, B=B)
    use_views(monkeypatch, views)
    out = m({"audio": torch.zeros(B, 1, 10)}, 0, gen(4), 10)
    x = torch.cat(views)  # (2B, 64, 201): 50 columns
    grid = m.encoder.token_grid(x.shape)
    mask = m.masker(grid, B, None, gen(4))  # the method's only draw (views are given)
    hidden = mask.masked.repeat(2, 1)
    with torch.no_grad():
        s = m.encoder(x, mask=Mask.from_masked(hidden, "replace")).tokens
        t = m.target_encoder(x).tokens  # the teacher sees the views unmasked
        rows_s = [[s[v * B + b, i] for b in range(B) for i in range(50) if mask.masked[b, i]] for v in (0, 1)]
        rows_t = [[t[v * B + b, i] for b in range(B) for i in range(50) if mask.masked[b, i]] for v in (0, 1)]
        p = m.predictor(m.projector(torch.stack(rows_s[0] + rows_s[1])))  # BN over both views' frames
        z = m.target_projector(torch.stack(rows_t[0] + rows_t[1]))
    n = len(rows_s[0])
    assert 0.3 * B * 50 < n < 0.75 * B * 50
    want = 0.5 * (cos_loss(p[:n], z[n:]) + cos_loss(p[n:], z[:n]))
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    assert float(out["masked_pct"]) == pytest.approx(n / (B * 50))
    # the mask is replaced spans: a masked frame of the student differs from the unmasked teacher's
    assert not torch.allclose(s[0][mask.masked[0]], t[0][mask.masked[0]])


def test_c2f_targets_are_the_teachers_outputs_and_the_student_starts_as_the_frame_teacher():
    m = tiny("c2f", "views=[]")
    audio = synth_batch(1, 2.0, seed=3)[:4]
    m.prepare(audio[:, 0])
    st, ft = m.encoder.state_dict(), m.frame_teacher["encoder"].state_dict()
    assert all(torch.equal(st[k], ft[k]) for k in st)
    out = m({"audio": audio}, 0, gen(0), 10)
    with torch.no_grad():
        x = m.features(audio[:, 0])
        ce = m.clip_teacher["encoder"]
        co = ce(x)
        target = torch.cat([co.cls, co.tokens.mean(1)], -1)  # ATST-Clip's [CLS, mean]
        s = m.encoder(x).tokens
        clip = cos_loss(m.head(s.mean(1)), target)
        frame = cos_loss(s.flatten(0, 1), m.frame_teacher["encoder"](x).tokens.flatten(0, 1))
    assert co.tokens.shape[1] == 50 and ce.cfg.pos_len == 25  # the 1 s clip teacher reads 2 s in two chunks
    assert out["clip_loss"].item() == pytest.approx(clip.item(), rel=1e-5)
    assert out["frame_loss"].item() == pytest.approx(frame.item(), abs=1e-5) and frame.item() < 1e-4
    assert out["loss"].item() == pytest.approx(clip.item() + frame.item(), rel=1e-5)


# -- teachers: no gradient, exact EMA -----------------------------------------------------------

@pytest.mark.parametrize("name,segments", [("clip", 2), ("frame", 1)])
def test_no_gradient_reaches_the_teacher_and_ema_is_exact(name, segments):
    m = tiny(name)
    opt = torch.optim.AdamW(m.param_groups(0.04), lr=1e-2)
    clip_s = 1.0 if name == "clip" else 2.0
    audio = synth_batch(1, clip_s, seed=7)[:4].expand(-1, segments, -1).contiguous()
    out = m({"audio": audio}, 0, gen(0), 10)
    out["loss"].backward()
    teacher = [*m.target_encoder.parameters(), *m.target_projector.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in teacher)
    assert all(p.grad is not None for p in m.encoder.parameters() if p is not m.encoder.mask_token or name == "frame")
    assert not any(p is q for p in teacher for q in (g for grp in opt.param_groups for g in grp["params"]))
    opt.step()
    before = [p.detach().clone() for p in teacher]
    student = [p.detach().clone() for p in [*m.encoder.parameters(), *m.projector.parameters()]]
    k, K = 3, 10
    m.after_step(k, K)
    tau = momentum(m.cfg.ema, k, K)
    assert tau == pytest.approx(1 - (1 - 0.99) * (np.cos(np.pi * k / K) + 1) / 2)
    for t0, s, t1 in zip(before, student, teacher):
        assert torch.equal(t1, t0.lerp(s, 1 - tau))  # tau t + (1 - tau) s, as ema_update
        torch.testing.assert_close(t1, tau * t0 + (1 - tau) * s, atol=1e-7, rtol=1e-6)
    assert m.inference_encoder() is m.encoder  # tiny: eval_teacher false
    full = tiny(name, "method.eval_teacher=true")  # the full presets evaluate the teacher, as the official code
    assert full.inference_encoder() is full.target_encoder


def test_c2f_teachers_are_frozen():
    m = tiny("c2f")
    audio = synth_batch(1, 2.0, seed=3)[:4]
    m.prepare(audio[:, 0])
    frozen = {k: v.clone() for k, v in [*m.clip_teacher.state_dict().items(), *m.frame_teacher.state_dict().items()]}
    opt = torch.optim.AdamW(m.param_groups(0.0), lr=1e-2)
    out = m({"audio": audio}, 0, gen(0), 10)
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad
               for p in [*m.clip_teacher.parameters(), *m.frame_teacher.parameters()])
    opt.step()
    m.after_step(0, 10)
    now = {**m.clip_teacher.state_dict(), **m.frame_teacher.state_dict()}
    assert all(torch.equal(frozen[k], now[k]) for k in frozen)
    assert not m.clip_teacher.training and m.training and m.inference_encoder() is m.encoder


# -- training -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,steps", [("clip", 25), ("frame", 25)])
def test_short_run_lowers_the_loss_without_collapse(name, steps):
    m = tiny(name, "method.ema.start=0.9")
    seconds = 1.0 if name == "clip" else 2.0
    audio = synth_batch(1, seconds, seed=11)
    audio = audio.expand(-1, 2, -1).contiguous() if name == "clip" else audio
    hist = run_steps(m, audio, steps, lr=2e-3, weight_decay=0.04)
    first, last = first_last(hist)
    assert last < first - 0.1, (first, last)
    assert hist[-1]["std_student"] > 0.02 and hist[-1]["std_teacher"] > 0.02  # ~1/sqrt(16) if healthy


def _write_data(root):
    rng = np.random.default_rng(0)
    t = np.arange(int(2.2 * SR)) / SR
    for i in range(6):
        x = 0.3 * np.sin(2 * np.pi * (150 + 90 * i) * t * (1 + 0.2 * np.sin(2 * np.pi * 3 * t))) \
            + 0.05 * rng.standard_normal(t.size)
        sf.write(str(root / f"{i}.wav"), x.astype(np.float32), SR)


RUN = ["train.steps=4", "train.ckpt_every=2", "train.log_every=1", "data.num_workers=0"]


def _same(a, b) -> dict:
    ta = load_file(str(a / "ckpt/step-000000004/model.safetensors"))
    tb = load_file(str(b / "ckpt/step-000000004/model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    return ta


def test_resume_is_bit_identical_and_c2f_carries_its_teachers(tmp_path):
    from sslaudio.train import fit

    data = tmp_path / "wavs"
    data.mkdir()
    _write_data(data)
    fit(load_preset("tiny/atst-clip", SMALL + HEADS + RUN[1:] + ["train.steps=2"]), [str(data)], tmp_path / "clip",
        device="cpu")
    frame = load_preset("tiny/atst-frame", SMALL + HEADS + RUN)
    fit(frame, [str(data)], tmp_path / "frame", device="cpu")
    fit(frame, [str(data)], tmp_path / "frame-b", device="cpu")
    shutil.rmtree(tmp_path / "frame-b/ckpt/step-000000004")
    assert fit(frame, [str(data)], tmp_path / "frame-b", device="cpu")["start_step"] == 2
    w = _same(tmp_path / "frame", tmp_path / "frame-b")
    assert any(k.startswith("target_encoder.") for k in w)

    srcs = {k: tmp_path / f"src-{k}" for k in ("clip", "frame")}
    for k, d in srcs.items():
        shutil.copytree(tmp_path / k, d)
    c2f = load_preset("tiny/atst-c2f", SMALL + RUN + [f"method.clip_teacher={srcs['clip']}",
                                                      f"method.frame_teacher={srcs['frame']}"])
    fit(c2f, [str(data)], tmp_path / "a", device="cpu")
    fit(c2f, [str(data)], tmp_path / "b", device="cpu")
    shutil.rmtree(tmp_path / "b/ckpt/step-000000004")
    for d in srcs.values():
        shutil.rmtree(d)  # the sources are gone: the run holds their presets and weights
    assert fit(c2f, [str(data)], tmp_path / "b", device="cpu")["start_step"] == 2
    w = _same(tmp_path / "a", tmp_path / "b")
    clip_w = load_file(str(tmp_path / "clip/export/encoder.safetensors"))
    assert clip_w and all(torch.equal(w[f"clip_teacher.{k}"], v) for k, v in clip_w.items())
    frame_w = load_file(str(tmp_path / "frame/export/encoder.safetensors"))  # the frame run's teacher
    assert all(torch.equal(w[f"frame_teacher.{k}"], v) for k, v in frame_w.items())
    exported = load_file(str(tmp_path / "a/export/encoder.safetensors"))
    assert not any("teacher" in k or "head" in k for k in exported)


# -- export and extraction ------------------------------------------------------------------------

@pytest.mark.parametrize("name,dim", [("atst-clip", 4 * 256), ("atst-frame", 4 * 128)])  # all 4 blocks
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_and_extraction_give_40ms_frames(name, dim, fmt, tmp_path):
    from sslaudio.export import export
    from sslaudio.features import embed_files
    from tests.conftest import write_wav

    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    bundle = load_encoder(f"random:tiny/{name}")
    bundle.needs_stats = False
    enc = bundle.encoder
    assert enc.frame_dim == dim and enc.downsample == 640 and enc.frame_rate == 25.0
    # checked at 1.37 s: the 1 s tiny ATST-Clip model encodes it in two chunks, traced or not
    r = export(bundle, fmt, tmp_path / f"m.{fmt}", seconds=1.0)
    assert r["dim"] == dim and r["max_abs_diff"] < 1e-3
    if fmt == "onnx":
        return
    wav = write_wav(tmp_path / "a.wav", (0.1 * np.random.default_rng(0).standard_normal(int(3.3 * SR))).astype(np.float32))
    (e,) = embed_files(bundle, [(str(wav), "a")], torch.device("cpu"), True)
    assert e.frames.shape == ((int(3.3 * SR) // 160 + 1) // 4, dim)
    np.testing.assert_allclose(e.times, 0.015 + 0.04 * np.arange(len(e.times)), atol=1e-9)
    np.testing.assert_allclose(e.clip, e.frames.mean(0), atol=1e-5)


# -- C2F's checks -------------------------------------------------------------------------------

def test_c2f_refuses_missing_or_wrong_teachers_in_one_line(tmp_path):
    from sslaudio.train import fit

    cases = [
        (["method.clip_teacher="], r"^method\.clip_teacher: ATST-C2F distils a trained ATST-Clip model; give its run"),
        (["method.frame_teacher=random:tiny/atst-clip"],
         r"^method\.frame_teacher: random:tiny/atst-clip is a 'atst-clip' model, not an ATST-Frame one"),
        (["method.clip_teacher=random:tiny/byol"], r"is a 'byol' model, not an ATST-Clip one"),
        (["encoder.dim=64"], r"^encoder: the student starts from the weights of random:tiny/atst-frame"),
    ]
    for overrides, match in cases:
        with pytest.raises(ConfigError, match=match) as info:
            build_method(load_preset("tiny/atst-c2f", overrides))
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"method: cannot read the checkpoint .*nope"):
        fit(load_preset("tiny/atst-c2f", [f"method.clip_teacher={tmp_path / 'nope'}"]), [str(tmp_path)],
            tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()
    # the full preset names no teacher: it loads, and refuses to build or train until given both
    cls, cfg = component_config(METHODS, load_preset("atst-c2f", ["method.clip_teacher=runs/clip"]).method, "method")
    with pytest.raises(ConfigError, match=r"^method\.frame_teacher: ATST-C2F distils a trained ATST-Frame model"):
        cls.sources(cfg)


def test_a_training_crop_longer_than_the_position_table_is_refused():
    """Learned positions (tiny ATST-Frame: 50 columns = 2 s) cover the whole training crop, as the
    official crop is the table's length: a longer crop is one config error naming the key."""
    with pytest.raises(ConfigError, match=r"3 s crop is 75 patch columns, more than the 50 of encoder.pos_len"):
        tiny("frame", "data.clip_seconds=3.0")
