import pytest
import torch

from sslaudio.build import load_preset
from sslaudio.config import ConfigError
from sslaudio.encoders.layers import sincos_pos_embed_2d
from sslaudio.inference import EncoderBundle
from sslaudio.methods.ema import momentum
from tests.conftest import build_tiny, first_last, gen, synth_clips

SMALL = ["encoder.dim=32", "encoder.depth=2", "encoder.heads=2", "encoder.eval_blocks=3", "method.pred_dim=16",
         "method.pred_depth=1", "method.pred_heads=2", "train.batch_size=4"]  # every hidden state, as the preset
S = int(1.27 * 16000)  # tiny crop: 128 frames -> 5 x 8 patches


def _method(extra=(), small=True):
    return build_tiny("m2d", *(SMALL if small else []), *extra).train()


def _audio(n=4):
    return synth_clips(n, 1.27, seed=50)


def _blocks(x, blocks):
    for b in blocks:
        x, _ = b(x)
    return x


def test_loss_matches_hand_computation():
    m = _method()
    audio = _audio()
    m.frontend.estimate_stats(audio)
    out = m({"audio": audio[:, None]}, 0, gen(3), 10)

    with torch.no_grad():
        x = m.features(audio)  # (B, 80, 128)
        B = x.shape[0]
        grid = m.encoder.token_grid(x.shape)
        n = grid[0] * grid[1]
        assert grid == (5, 8)
        mask = m.masker(grid, B, None, gen(3))  # the first (only) draw from the generator
        enc, tgt, pr = m.encoder, m.target_encoder, m.predictor
        D = enc.dim
        want, count = 0.0, 0
        for b in range(B):
            hidden = [i for i in range(n) if mask.masked[b, i]]
            visible = [i for i in range(n) if not mask.masked[b, i]]
            assert len(hidden) == round(0.7 * n) and len(visible) == n - len(hidden)
            # online encoder on the visible patches (positions added before dropping tokens)
            pos = sincos_pos_embed_2d(D, grid)
            e = enc.patch_embed(x[b:b + 1])[0] + pos
            h = torch.cat([enc.cls[0], e[visible]])[None]
            h = enc.norm(_blocks(h, enc.blocks.blocks))[0]  # (1 + V, D)
            # predictor: embed, mask tokens at the hidden positions, positions of the whole grid
            z = pr.embed(h)
            seq = []
            for i in range(n):
                seq.append(z[1 + visible.index(i)] if i in visible else pr.mask_token)
            seq = torch.stack(seq) + sincos_pos_embed_2d(pr.dim, grid)
            seq = torch.cat([z[:1], seq])[None]
            p = pr.head(pr.norm(_blocks(seq, pr.blocks)))[0, 1:]  # (N, D)
            # target network on the hidden patches only, then per-token standardisation
            et = tgt.patch_embed(x[b:b + 1])[0] + pos
            t = torch.cat([tgt.cls[0], et[hidden]])[None]
            t = tgt.norm(_blocks(t, tgt.blocks.blocks))[0, 1:]  # (H, D)
            for k, i in enumerate(hidden):
                ti = t[k]
                mu = ti.sum() / D
                var = ((ti - mu) ** 2).sum() / (D - 1)
                ts = (ti - mu) / torch.sqrt(var + 1e-6)
                cos = torch.dot(p[i], ts) / (p[i].norm() * ts.norm())
                want += 2 - 2 * cos
                count += 1
    assert torch.allclose(out["loss"], want / count, atol=1e-5)
    assert float(out["tau"]) == pytest.approx(0.99)


def test_target_sees_only_masked_and_online_only_visible():
    m = _method()
    seen, masks = {}, {}

    def record(name):
        def hook(mod, args):
            seen[name] = args[0].shape[1]
        return hook

    def record_mask(name):
        def hook(mod, args, kwargs):
            masks[name] = kwargs["mask"]
        return hook

    m.encoder.blocks.blocks[0].register_forward_pre_hook(record("online"))
    m.target_encoder.blocks.blocks[0].register_forward_pre_hook(record("target"))
    m.predictor.blocks[0].register_forward_pre_hook(record("predictor"))
    m.encoder.register_forward_pre_hook(record_mask("online"), with_kwargs=True)
    m.target_encoder.register_forward_pre_hook(record_mask("target"), with_kwargs=True)
    m({"audio": torch.randn(4, 1, S) * 0.1}, 0, gen(1), 10)
    n, hidden = 40, 28  # round(0.7 * 40)
    assert seen == {"online": 1 + n - hidden, "target": 1 + hidden, "predictor": 1 + n}  # + CLS
    on, tg = masks["online"], masks["target"]
    assert on.mode == tg.mode == "keep"
    assert torch.equal(on.masked, ~tg.masked)  # complementary
    for b in range(4):
        vis, hid = set(on.keep_idx[b].tolist()), set(tg.keep_idx[b].tolist())
        assert not vis & hid and vis | hid == set(range(n))
        assert hid == set(torch.nonzero(on.masked[b]).flatten().tolist())


def test_no_gradient_reaches_target_and_ema_is_exact():
    m = _method()
    out = m({"audio": torch.randn(4, 1, S) * 0.1}, 0, gen(), 10)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in m.target_encoder.parameters())
    assert all(p.grad is not None for p in m.encoder.blocks.parameters())
    assert all(p.grad is not None for p in m.predictor.parameters())
    assert m.encoder.patch_embed.proj.weight.grad is not None and m.encoder.cls.grad is not None
    assert m.inference_encoder() is m.encoder
    # official: the target blocks start from their own random weights
    t_fc1, s_fc1 = m.target_encoder.blocks.blocks[0].fc1.weight, m.encoder.blocks.blocks[0].fc1.weight
    assert not torch.equal(t_fc1, s_fc1)

    before = {k: v.clone() for k, v in m.target_encoder.named_parameters()}
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(0.1)
    m.after_step(5, 100)
    tau = 0.99 + (0.999 - 0.99) * 5 / 99  # linear, official step / (total_steps - 1)
    assert tau == pytest.approx(momentum(m.cfg.ema, 5, 99))
    online = dict(m.encoder.named_parameters())
    for k, t in m.target_encoder.named_parameters():
        if k.startswith(("blocks.", "norm.")):
            assert torch.allclose(t, tau * before[k] + (1 - tau) * online[k], atol=1e-6), k
        elif k.startswith(("patch_embed.", "cls")):
            assert torch.equal(t, online[k]), k  # shared with the online network in the official code
        else:
            assert torch.equal(t, before[k]), k  # unused mask token


def test_config_checks():
    with pytest.raises(ConfigError, match="keep"):
        _method(["masker.mode=replace"])
    with pytest.raises(ConfigError, match="pred_dim"):
        _method(["method.pred_dim=18"])
    with pytest.raises(ConfigError, match="chunk"):
        _method(["encoder.chunk=-1"])
    with pytest.raises(ConfigError, match="chunk"):
        _method(["encoder.chunk=8", "encoder.pos=learned"])


def test_short_run_lowers_loss_without_collapse():
    m = _method(small=False)  # the tiny preset as it is
    audio = _audio(16)
    m.frontend.estimate_stats(audio)
    opt = torch.optim.AdamW(m.param_groups(0.05), lr=1e-3, betas=(0.9, 0.95))
    outs = []
    for step in range(30):
        out = m({"audio": audio[:, None]}, step, gen(step), 10)
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 3.0)
        opt.step()
        m.after_step(step, 300)
        outs.append({k: float(v.detach()) for k, v in out.items()})
    first, last = first_last(outs)
    assert last < 0.8 * first, (first, last)
    assert outs[-1]["emb_std"] > 0.02 and outs[-1]["pred_std"] > 0.02 and outs[-1]["target_std"] > 0.1


def test_extraction_on_longer_audio():
    preset = load_preset("tiny/m2d", SMALL)
    m = _method()
    m.frontend.estimate_stats(_audio(2))
    bundle = EncoderBundle(m.frontend, m.inference_encoder(), preset).eval()
    audio = torch.randn(2, 3 * 16000) * 0.1  # 3 s > the 1.27 s training crop
    with torch.no_grad():
        clip_emb, frames, lengths = bundle.embed(audio)
    t_cols = (3 * 16000 // 160 + 1) // 16  # 301 frames -> 18 patch columns
    assert frames.shape == (2, t_cols, 3 * 5 * 32) and clip_emb.shape == (2, 3 * 5 * 32)  # 3 hidden states
    assert lengths.tolist() == [t_cols, t_cols]
    assert torch.allclose(clip_emb, frames.mean(1), atol=1e-5)
    assert torch.isfinite(frames).all()


def test_long_inputs_are_encoded_in_chunks_of_the_training_grid():
    """encoder.chunk (the tiny preset: 8 columns, its 1.27 s crop): a longer input is encoded as
    runtime_audio's encode_lms does, each chunk of 8 patch columns alone with positions from 0;
    the last, shorter chunk's padding is left out of attention; without chunks one pass differs."""
    m = _method()
    enc = m.encoder.eval()
    assert enc.cfg.chunk == 8
    x = torch.randn(1, 80, 16 * 19, generator=gen(3))  # 19 columns: chunks of 8, 8 and 3

    def alone(xc):  # by hand: one chunk, positions of its own grid, CLS first, final norm
        e = enc.patch_embed(xc) + sincos_pos_embed_2d(enc.dim, (5, xc.shape[-1] // 16))
        h = torch.cat([enc.cls.expand(1, -1, -1), e], 1)
        return enc.norm(_blocks(h, enc.blocks.blocks))[0, 1:].reshape(5, -1, enc.dim)

    with torch.no_grad():
        out = enc(x)
        ref = torch.cat([alone(x[..., :128]), alone(x[..., 128:256]), alone(x[..., 256:])], 1)
        torch.testing.assert_close(out.tokens[0], ref.reshape(-1, enc.dim), atol=1e-5, rtol=0)
        enc._chunk_cols = 0  # one pass over all 19 columns: not what the model was trained on
        assert (enc(x).tokens - out.tokens).abs().max() > 1e-2
    with pytest.raises(ConfigError, match="encoder.chunk"):  # a training crop longer than a chunk
        _method(["data.clip_seconds=2.0"])
