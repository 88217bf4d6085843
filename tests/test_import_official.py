"""`sslaudio import FILE.pth`: official BYOL-A (AudioNTT2020 / AudioNTT2022), M2D (timm ViT) and
ATST (Clip / Frame Lightning checkpoints) weight files. The official modules are re-declared here as
plain torch modules with the official parameter names and forward passes (nttcslab/byol-a
models.py, v2/byol_a2/models.py; nttcslab/m2d models_mae.py forward_encoder with timm Blocks and
MAE's sin-cos positions; Audio-WestlakeU/audiossl models/atst/audio_transformer.py AST and
methods/atstframe/audio_transformer.py FrameAST with modules/transformer.py Blocks), saved with torch.save,
imported through the CLI and compared with the imported encoder on the same log-mel input.
Refusals are one line with exit code 2. No network."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from torch import nn

from sslaudio.inference import load_encoder
from tests.test_import import invoke, one_line_error

TOL = 1e-5


def jitter_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Move every weight, BatchNorm statistic and LayerNorm off its trivial init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 0.05)
                if name.endswith("running_var"):
                    t.abs_().add_(0.5)
    return module.eval()


# -- official BYOL-A, re-declared ----------------------------------------------------------------

def conv_block(c_in: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, 64, 3, stride=1, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2, stride=2)]


class OfficialNTT(nn.Module):
    """AudioNTT2020Task6 (n_conv 3: fc d, d) / AudioNTT2022Encoder (n_conv 2: fc mlp, d - conv_d, stacked)."""

    def __init__(self, n_mels: int, d: int, n_conv: int, mlp: int = 2048):
        super().__init__()
        self.features = nn.Sequential(*conv_block(1), *[m for _ in range(n_conv - 1) for m in conv_block(64)])
        conv_d = 64 * (n_mels // 2**n_conv)
        self.stack = n_conv == 2
        hidden, out = (mlp, d - conv_d) if self.stack else (d, d)
        self.fc = nn.Sequential(nn.Linear(conv_d, hidden), nn.ReLU(), nn.Dropout(p=0.3), nn.Linear(hidden, out), nn.ReLU())

    def forward(self, x):  # (B, 1, mel, time) -> (B, time', d)
        x = self.features(x).permute(0, 3, 2, 1)
        B, T, D, C = x.shape
        x = x.reshape((B, T, C * D))
        x_fc = self.fc(x)
        return torch.hstack([x.transpose(1, 2), x_fc.transpose(1, 2)]).transpose(1, 2) if self.stack else x_fc


# -- official M2D ViT (timm Block, MAE positions), re-declared ------------------------------------

def mae_pos_embed(dim: int, grid: tuple[int, int]) -> np.ndarray:
    """get_2d_sincos_pos_embed_flexible(dim, grid, cls_token=True) as MAE / M2D write it."""
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid[1], dtype=np.float32), np.arange(grid[0], dtype=np.float32))
    emb = np.concatenate([one(dim // 2, gw), one(dim // 2, gh)], axis=1)  # w (time) first
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


class TimmAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class TimmMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TimmAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TimmMlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class OfficialM2D(nn.Module):
    """The online encoder of M2D's MaskedAutoencoderViT plus the parts the import must skip."""

    def __init__(self, dim=128, depth=2, heads=2, grid=(5, 8), patch=(16, 16), dec_dim=64):
        super().__init__()
        self.grid = grid
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.from_numpy(mae_pos_embed(dim, grid)).float().unsqueeze(0),
                                      requires_grad=False)
        self.blocks = nn.ModuleList([TimmBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        # target encoder and predictor: present in the checkpoint, unused at inference
        self.target_blocks = nn.ModuleList([TimmBlock(dim, heads) for _ in range(depth)])
        self.target_norm = nn.LayerNorm(dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_embed = nn.Linear(dim, dec_dim)

    def forward_encoder(self, x):  # (B, 1, F, T) -> (B, 1 + Fg*Tg, D), M2D with adjust_short
        x = self.patch_embed(x)
        fg, tg = self.grid[0], x.shape[1] // self.grid[0]
        pos = self.pos_embed[:, 1:].reshape(1, fg, self.grid[1], -1)[:, :, :tg].reshape(1, fg * tg, -1)
        x = x + pos
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def m2d_official(**kw) -> OfficialM2D:
    """A jittered M2D with the fixed sin-cos positions left as they are in the released files."""
    torch.manual_seed(0)
    official = jitter_(OfficialM2D(**kw))
    with torch.no_grad():
        official.pos_embed.copy_(torch.from_numpy(mae_pos_embed(official.pos_embed.shape[-1], official.grid))
                                 .float().unsqueeze(0))
    return official


def save_official(module: nn.Module, path, wrap: bool = False):
    state = {k: v.clone() for k, v in module.state_dict().items()}
    if wrap:  # an M2D training checkpoint: {'model': ..., 'args': Namespace}
        state = {"model": state, "args": argparse.Namespace(model="m2d_vit_base", blr=3e-4)}
    torch.save(state, path)
    return path


def imported(run):
    bundle = load_encoder(str(run))
    summary = json.loads((run / "import.json").read_text())
    return bundle, summary


def official_input(bundle, mean, std, n_samples, seed=0):
    """A waveform, sslaudio's normalised log-mel of it, and the same normalisation done by hand."""
    g = torch.Generator().manual_seed(seed)
    wav = torch.randn(2, n_samples, generator=g) * 0.1
    with torch.no_grad():
        ours, _ = bundle.frontend(wav)
        ref = (bundle.frontend.log_mel(wav) - mean) / std
    assert (ours - ref).abs().max().item() < 1e-5
    return ref


# -- BYOL-A --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,n_conv,d", [("byol-a", 3, 512), ("byol-a-v2", 2, 2048)])
def test_byola_parity(tmp_path, kind, n_conv, d):
    torch.manual_seed(0)
    official = jitter_(OfficialNTT(64, d, n_conv))
    src = save_official(official, tmp_path / "AudioNTT.pth")
    mean, std = -5.5, 4.5
    r = invoke("import", src, "--out", tmp_path / "run", "--norm-stats", mean, std)
    assert r.exit_code == 0, r.output
    bundle, summary = imported(tmp_path / "run")
    assert summary["kind"] == kind and summary["kind_detected"] and summary["norm_mean"] == mean
    assert bundle.preset.encoder["version"] == (2020 if n_conv == 3 else 2022) and bundle.preset.encoder["d"] == d
    x = official_input(bundle, mean, std, 16000)  # 1 s: 101 frames -> 12 output frames
    with torch.no_grad():
        ours = bundle.encoder(x).tokens
        ref = official(x.unsqueeze(1))
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    print(f"{kind} max abs diff {diff:.3g} (max |ref| {ref.abs().max().item():.3g})")
    assert diff <= TOL


def test_byola_needs_norm_stats_and_kind_must_fit(tmp_path):
    src = save_official(jitter_(OfficialNTT(64, 512, 3)), tmp_path / "v1.pth")
    assert "--norm-stats" in one_line_error(invoke("import", src, "--out", tmp_path / "run"))
    # v1 weights forced into the v2 preset (and back): the first tensor that does not fit is named
    msg = one_line_error(invoke("import", src, "--out", tmp_path / "run", "--kind", "byol-a-v2", "--norm-stats", 0, 1))
    assert "features.8.weight" in msg
    v2 = save_official(jitter_(OfficialNTT(64, 2048, 2)), tmp_path / "v2.pth")
    msg = one_line_error(invoke("import", v2, "--out", tmp_path / "run", "--kind", "byol-a", "--norm-stats", 0, 1))
    assert "features.8.weight" in msg
    assert not (tmp_path / "run" / "export").exists()


def test_byola_wrong_shape_is_refused(tmp_path):
    """80-bin AudioNTT2020 weights do not fit the byol-a preset's 64-bin frontend."""
    src = save_official(jitter_(OfficialNTT(80, 512, 3)), tmp_path / "mel80.pth")
    msg = one_line_error(invoke("import", src, "--out", tmp_path / "run", "--norm-stats", 0, 1))
    assert "fc.0.weight" in msg and "(512, 640)" in msg
    assert not (tmp_path / "run").exists()


# -- M2D -----------------------------------------------------------------------------------------

def test_m2d_parity(tmp_path):
    official = m2d_official()
    src = save_official(official, tmp_path / "checkpoint-300.pth", wrap=True)
    r = invoke("import", src, "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    bundle, summary = imported(tmp_path / "run")
    assert summary["kind"] == "m2d" and (summary["norm_mean"], summary["norm_std"]) == (-7.1, 4.2)
    assert summary["unused_source_tensors"] > 0  # target encoder, predictor
    enc = bundle.preset.encoder
    assert (enc["dim"], enc["depth"], enc["heads"], list(enc["patch"])) == (128, 2, 2, [16, 16])
    assert enc["pos_order"] == "time_first"  # MAE's channel order: the official tokens as they are
    worst = 0.0
    for n_samples in (16000 * 128 // 100, 16000 * 96 // 100):  # the training crop, and shorter
        x = official_input(bundle, -7.1, 4.2, n_samples)[..., : (n_samples // 160 + 1) // 16 * 16]
        with torch.no_grad():
            out = bundle.encoder(x)
            ref = official.forward_encoder(x.unsqueeze(1))
        assert out.tokens.shape == ref[:, 1:].shape
        worst = max(worst, (out.tokens - ref[:, 1:]).abs().max().item(),
                    (out.cls - ref[:, 0]).abs().max().item())
    # a longer input: runtime_audio's encode_lms, chunks of the training grid (8 columns) one by one
    assert enc["chunk"] == 8
    x = official_input(bundle, -7.1, 4.2, 16000 * 3)[..., : 18 * 16]  # 18 columns: 8 + 8 + 2
    with torch.no_grad():
        out = bundle.encoder(x)
        ref = torch.cat([official.forward_encoder(x[:, None, :, i:i + 128])[:, 1:].reshape(x.shape[0], 5, -1, 128)
                         for i in (0, 128, 256)], 2).reshape(x.shape[0], 90, 128)
    worst = max(worst, (out.tokens - ref).abs().max().item())
    print(f"m2d max abs diff {worst:.3g}")
    assert worst <= TOL


def test_time_first_positions_are_mae():
    """pos_order time_first is MAE's get_2d_sincos_pos_embed; the default is it with the halves swapped."""
    from sslaudio.encoders.layers import sincos_pos_embed_2d, sincos_pos_embed_2d_traced

    dim, grid = 32, (5, 7)
    mae = torch.from_numpy(mae_pos_embed(dim, grid)[1:]).float()
    time_first = sincos_pos_embed_2d(dim, grid, time_first=True)
    assert torch.allclose(time_first, mae, atol=1e-6)
    assert torch.equal(sincos_pos_embed_2d(dim, grid), torch.cat([time_first[:, 16:], time_first[:, :16]], 1))
    tokens = torch.zeros(1, 35, dim)
    assert torch.equal(sincos_pos_embed_2d_traced(dim, 5, tokens, time_first=True), time_first)


def test_m2d_norm_stats_from_file_and_option(tmp_path):
    official = m2d_official(depth=1)
    state = dict(official.state_dict(), norm_stats=torch.tensor([-6.0, 3.5]))
    torch.save(state, tmp_path / "m2d.pth")
    assert invoke("import", tmp_path / "m2d.pth", "--out", tmp_path / "a").exit_code == 0
    assert json.loads((tmp_path / "a" / "import.json").read_text())["norm_mean"] == -6.0
    r = invoke("import", tmp_path / "m2d.pth", "--out", tmp_path / "b", "--norm-stats", -4, 2)
    assert r.exit_code == 0, r.output
    assert float(load_encoder(str(tmp_path / "b")).frontend.norm_std) == 2.0


def test_m2d_learned_positions_are_refused(tmp_path):
    official = m2d_official(depth=1)
    with torch.no_grad():
        official.pos_embed.add_(0.01)
    src = save_official(official, tmp_path / "m2d.pth")
    assert "pos_embed" in one_line_error(invoke("import", src, "--out", tmp_path / "run"))


# -- official ATST (audiossl AST / FrameAST, DINO blocks), re-declared ---------------------------

class DinoBlock(TimmBlock):
    """audiossl modules/transformer.py Block: timm names, no qkv bias, additive key mask from lengths."""

    def __init__(self, dim, heads):
        super().__init__(dim, heads)
        self.attn.qkv = nn.Linear(dim, dim * 3, bias=False)

    def forward(self, x, length=None):
        B, N, C = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).reshape(B, N, 3, self.attn.heads, C // self.attn.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (C // self.attn.heads) ** -0.5
        if length is not None:
            attn = attn + -10000.0 * (torch.arange(N)[None] >= length[:, None])[:, None, None, :]
        y = self.attn.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C))
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchEmbedV2(nn.Module):
    """PatchEmbed_v2: Rearrange('b c (h p1) (w p2) -> b (w h) (p1 p2 c)') then a Linear."""

    def __init__(self, ph, pw, dim):
        super().__init__()
        self.ph, self.pw = ph, pw
        self.patch_embed = nn.Linear(ph * pw, dim)

    def forward(self, mel):
        B, c, H, W = mel.shape
        h, w = H // self.ph, W // self.pw
        x = mel[:, :, : h * self.ph, : w * self.pw].reshape(B, c, h, self.ph, w, self.pw)
        return self.patch_embed(x.permute(0, 4, 2, 3, 5, 1).reshape(B, w * h, self.ph * self.pw * c))


class OfficialATST(nn.Module):
    """AST (ATST-Clip: cls_token, norm) or FrameAST (ATST-Frame: norm_frame, CNN or Linear patches),
    pos_type cut, 1 + (1001 // 4) learned positions."""

    def __init__(self, frame: bool, dim=128, depth=2, heads=2, cnn=False):
        super().__init__()
        self.frame = frame
        self.patch_embed = PatchEmbed(64, dim) if cnn else PatchEmbedV2(64, 4, dim)
        if cnn:
            self.patch_embed.proj = nn.Conv2d(1, dim, kernel_size=(64, 4), stride=(64, 4))
        self.mask_embed = nn.Parameter(torch.zeros(1, 1, dim))
        if not frame:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1001 // 4 + 1, dim))
        self.blocks = nn.ModuleList([DinoBlock(dim, heads) for _ in range(depth)])
        if frame:
            self.norm_frame = nn.LayerNorm(dim, eps=1e-6)
        else:
            self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, length=None, n=1):
        """(B, 1, 64, T) -> (B, [1 +] T / 4, n * D): prepare_tokens, blocks, and the norm of each of
        the last n blocks side by side (get_intermediate_layers(n, scene=False); n 1: forward)."""
        x = self.patch_embed(x)
        T = x.shape[1]
        if self.frame:
            x = x + self.pos_embed[:, 1:T + 1]
        else:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed[:, :T + 1]
        outs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, length)
            if len(self.blocks) - i <= n:
                outs.append(self.norm_frame(x) if self.frame else self.norm(x))
        return torch.cat(outs, -1)


def save_lightning(student: nn.Module, teacher: nn.Module, path):
    """A Lightning checkpoint of FrameATSTLightningModule / ATSTLightningModule: model.student /
    model.teacher MultiCropWrappers (encoder + projector, the student's predictor)."""
    state = {f"model.student.encoder.{k}": v.clone() for k, v in student.state_dict().items()}
    state.update({f"model.teacher.encoder.{k}": v.clone() for k, v in teacher.state_dict().items()})
    for who in ("student", "teacher"):
        state[f"model.{who}.projector.mlp.0.weight"] = torch.randn(256, 128)
    state["model.student.predictor.mlp.0.weight"] = torch.randn(256, 256)
    torch.save({"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.6.5", "state_dict": state,
                "hyper_parameters": {"arch": "small", "learning_rate": 5e-4, "ema": 0.99},
                "optimizer_states": [], "lr_schedulers": []}, path)
    return path


def atst_official(frame: bool, seed: int, **kw) -> OfficialATST:
    torch.manual_seed(seed)
    return jitter_(OfficialATST(frame, **kw), seed)


@pytest.mark.parametrize("kind,cnn", [("atst-clip", False), ("atst-frame", False), ("atst-frame", True)])
def test_atst_parity(tmp_path, kind, cnn):
    frame = kind == "atst-frame"
    student, teacher = atst_official(frame, 1, cnn=cnn), atst_official(frame, 2, cnn=cnn)
    src = save_lightning(student, teacher, tmp_path / "last.ckpt")
    r = invoke("import", src, "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    bundle, summary = imported(tmp_path / "run")
    assert summary["kind"] == kind and summary["kind_detected"]
    assert summary["unused_source_tensors"] > 0  # the student, projectors, predictor
    enc = bundle.preset.encoder
    assert (enc["dim"], enc["depth"], enc["heads"], list(enc["patch"])) == (128, 2, 2, [64, 4])
    assert enc["pos_len"] == (250 if frame else 150) and enc["cls_token"] == (not frame)
    assert enc["eval_blocks"] == 2  # the official evaluation's 12 blocks, here all of the 2
    assert bundle.preset.frontend["name"] == "mel_db"
    worst, g = 0.0, torch.Generator().manual_seed(0)
    for T in ((1000, 403) if frame else (600, 403)):  # the training crop, and shorter (a partial patch)
        x = torch.randn(2, 64, T, generator=g)
        with torch.no_grad():
            out = bundle.encoder(x)
            ref = teacher(x.unsqueeze(1), n=2)  # the embedding: both blocks' norms side by side
        n_cls = 0 if frame else 1
        assert out.tokens.shape == ref[:, n_cls:].shape
        worst = max(worst, (out.tokens - ref[:, n_cls:]).abs().max().item())
        if not frame:
            worst = max(worst, (out.cls - ref[:, 0]).abs().max().item())
        # the student's outputs differ: the teacher was imported
        with torch.no_grad():
            assert (out.tokens - student(x.unsqueeze(1), n=2)[:, n_cls:]).abs().max().item() > 1e-2
    print(f"{kind}{' cnn' if cnn else ''} max abs diff {worst:.3g}")
    assert worst <= TOL


def test_atst_padded_batch_matches_official_lengths(tmp_path):
    """A padded item gives the official output for its length (attention masked beyond it)."""
    teacher = atst_official(True, 2)
    save_lightning(atst_official(True, 1), teacher, tmp_path / "f.ckpt")
    assert invoke("import", tmp_path / "f.ckpt", "--out", tmp_path / "run").exit_code == 0
    bundle = load_encoder(str(tmp_path / "run"))
    x = torch.randn(2, 64, 400, generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([400, 240])
    with torch.no_grad():
        out = bundle.encoder(x, lengths)
        ref = teacher(x.unsqueeze(1), lengths // 4, n=2)
    assert (out.tokens[1, :60] - ref[1, :60]).abs().max().item() <= TOL
    assert (out.tokens[0] - ref[0]).abs().max().item() <= TOL


def test_atst_refusals(tmp_path):
    clip = save_lightning(atst_official(False, 1), atst_official(False, 2), tmp_path / "clip.ckpt")
    msg = one_line_error(invoke("import", clip, "--out", tmp_path / "run", "--kind", "atst-frame"))
    assert "cls_token" in msg or "norm." in msg
    assert "--norm-stats" in one_line_error(invoke("import", clip, "--out", tmp_path / "run", "--norm-stats", 0, 1))
    frame = atst_official(True, 1)
    state = dict(frame.state_dict(), prompt_embed=torch.zeros(1, 2, 128))
    torch.save({"state_dict": state}, tmp_path / "prompt.ckpt")
    assert "prompt_embed" in one_line_error(invoke("import", tmp_path / "prompt.ckpt", "--out", tmp_path / "run"))
    small = OfficialATST(True, dim=128)
    small.pos_embed = nn.Parameter(torch.zeros(1, 1, 128))
    torch.save({"state_dict": small.state_dict()}, tmp_path / "nopos.ckpt")
    assert "pos_embed" in one_line_error(invoke("import", tmp_path / "nopos.ckpt", "--out", tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# -- refusals ------------------------------------------------------------------------------------

def test_unknown_keys_are_refused(tmp_path):
    torch.save({"encoder.layer.0.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    msg = one_line_error(invoke("import", tmp_path / "other.pth", "--out", tmp_path / "run"))
    assert "--kind" in msg
    state = dict(m2d_official(depth=1).state_dict(), **{"blocks.0.ls1.gamma": torch.ones(128)})
    torch.save(state, tmp_path / "ls.pth")
    assert "blocks.0.ls1.gamma" in one_line_error(invoke("import", tmp_path / "ls.pth", "--out", tmp_path / "run"))
    assert not (tmp_path / "run").exists()


class Payload:  # any class: torch.load(weights_only=True) must not rebuild it
    pass


def test_pickled_object_is_refused(tmp_path):
    torch.save({"features.0.weight": Payload()}, tmp_path / "evil.pth")
    msg = one_line_error(invoke("import", tmp_path / "evil.pth", "--out", tmp_path / "run"))
    assert "evil.pth" in msg and "weights-only" in msg


def test_official_options_refused_for_a_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert "--kind" in one_line_error(invoke("import", tmp_path, "--out", tmp_path / "run", "--kind", "m2d"))
