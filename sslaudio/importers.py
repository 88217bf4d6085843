"""`sslaudio import`: Hugging Face transformers wav2vec 2.0 / HuBERT / data2vec-audio folders ->
an sslaudio encoder file (RUN/export/encoder.safetensors) that extract, probe and export load.

The folder's config.json is mapped to a `conv_transformer` preset (waveform frontend; conv layers,
widths, pre-/post-LN, positional conv; `official_padding: true` so padded batches give the
official outputs), its weights (model.safetensors, or pytorch_model.bin read with
torch.load(weights_only=True), sharded or not) are renamed into that encoder (q/k/v concatenated,
the positional conv's weight norm kept as sslaudio's own g / v pair). When transformers is
installed the conversion checks itself: the source model and the converted encoder run on the
same audio, alone and in a padded batch (with attention_mask), and nothing is written when they
differ beyond float tolerance. Anything else (another architecture, an adapter, a non-GELU
activation ...) is refused with one line.

`import_official` does the same for the official BYOL-A (v1 / v2), M2D and ATST (Clip / Frame)
weight files (see the section below).
"""

from __future__ import annotations

import json
import math
import re
import types
from pathlib import Path

import torch
from torch import Tensor

from sslaudio.atomic import atomic_text
from sslaudio.build import build_encoder, preset_from_dict
from sslaudio.checkpoint import CheckpointError, export_encoder, read_tensors
from sslaudio.config import ConfigError, load_preset_dict
from sslaudio.encoders.layers import sincos_pos_embed_2d

# transformers model_type -> the sslaudio preset the imported one is based on
ARCHITECTURES = {"wav2vec2": "wav2vec2", "hubert": "hubert", "data2vec-audio": "data2vec"}
MODEL_CLASSES = {"wav2vec2": "Wav2Vec2Model", "hubert": "HubertModel", "data2vec-audio": "Data2VecAudioModel"}
CONFIG_CLASSES = {"wav2vec2": "Wav2Vec2Config", "hubert": "HubertConfig", "data2vec-audio": "Data2VecAudioConfig"}
PREFIXES = ("wav2vec2.", "hubert.", "data2vec_audio.")  # ForCTC / ForPreTraining / ... heads
MAX_REL_DIFF = 1e-4  # max |sslaudio - transformers| / max |transformers| accepted


class ImportMismatch(CheckpointError):
    """The converted encoder does not reproduce the source model."""


# -- reading the source -------------------------------------------------------------------------

def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _load_bin(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:  # noqa: BLE001 - any unreadable or unsafe pickle is one line
        raise CheckpointError(f"{path}: not a readable weights-only PyTorch file "
                              f"({str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors")
    return state


def read_weights(src: Path) -> dict[str, Tensor]:
    """The source folder's tensors, float32, with a task head's prefix (`wav2vec2.` ...) removed."""
    files: list[Path] = []
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index).is_file():
            wmap = _json(src / index).get("weight_map")
            if not isinstance(wmap, dict):
                raise ConfigError(f"{src / index}: no weight_map")
            files = [src / name for name in sorted(set(map(str, wmap.values())))]
            break
    else:
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (src / name).is_file():
                files = [src / name]
                break
    if not files:
        raise ConfigError(f"{src}: no model.safetensors or pytorch_model.bin")
    tensors: dict[str, Tensor] = {}
    for f in files:
        tensors.update(read_tensors(f)[0] if f.suffix == ".safetensors" else _load_bin(f))
    out = {}
    for k, v in tensors.items():
        for p in PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v.float() if v.is_floating_point() else v
    return out


# -- config -> preset ---------------------------------------------------------------------------

def _need(cfg: dict, key: str, where: Path):
    if key not in cfg:
        raise ConfigError(f"{where}: no '{key}'")
    return cfg[key]


def preset_dict(cfg: dict, preproc: dict | None, where: Path) -> dict:
    """transformers config (+ preprocessor config) -> an sslaudio preset dict."""
    arch = cfg.get("model_type")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{where}: model_type {arch!r} is not supported (one of {', '.join(ARCHITECTURES)})")
    for key in ("hidden_act", "feat_extract_activation"):
        if cfg.get(key, "gelu") != "gelu":
            raise ConfigError(f"{where}: {key} {cfg[key]!r} is not supported (only 'gelu')")
    for key in ("add_adapter", "conv_pos_batch_norm"):
        if cfg.get(key):
            raise ConfigError(f"{where}: {key}: true is not supported")
    if cfg.get("adapter_attn_dim") is not None:
        raise ConfigError(f"{where}: adapter_attn_dim is not supported")
    if not cfg.get("feat_proj_layer_norm", True):
        raise ConfigError(f"{where}: feat_proj_layer_norm: false is not supported")
    if not math.isclose(float(cfg.get("layer_norm_eps", 1e-5)), 1e-5, rel_tol=1e-6):
        raise ConfigError(f"{where}: layer_norm_eps {cfg['layer_norm_eps']} is not supported (only 1e-5)")
    # data2vec-audio has LayerNorm after every conv (its config has no feat_extract_norm)
    norm = "layer" if arch == "data2vec-audio" else cfg.get("feat_extract_norm", "group")
    if norm not in ("group", "layer"):
        raise ConfigError(f"{where}: feat_extract_norm {norm!r} must be 'group' or 'layer'")
    dims, kernels, strides = (_need(cfg, k, where) for k in ("conv_dim", "conv_kernel", "conv_stride"))
    try:
        conv = [[int(c), int(k), int(s)] for c, k, s in zip(dims, kernels, strides, strict=True)]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: conv_dim, conv_kernel and conv_stride must be lists of integers "
                          f"of the same length") from None
    dim, depth, heads, ffn = (int(_need(cfg, k, where)) for k in
                              ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"))
    encoder = {
        "name": "conv_transformer", "conv_layers": conv, "extractor_mode": norm,
        "conv_bias": bool(cfg.get("conv_bias", False)), "dim": dim, "depth": depth, "heads": heads,
        "ffn_dim": ffn, "always_project": True, "official_padding": True,
        "dropout": float(cfg.get("hidden_dropout", 0.1)), "attention_dropout": float(cfg.get("attention_dropout", 0.1)),
        "activation_dropout": float(cfg.get("activation_dropout", 0.0)),
        "input_dropout": float(cfg.get("feat_proj_dropout", 0.0)), "layerdrop": float(cfg.get("layerdrop", 0.0)),
        "pos_conv_groups": int(_need(cfg, "num_conv_pos_embedding_groups", where)),
    }
    if arch == "data2vec-audio":  # a stack of plain convs with LayerNorm, post-LN transformer
        n, k = int(_need(cfg, "num_conv_pos_embeddings", where)), int(_need(cfg, "conv_pos_kernel_size", where))
        if k < 3 or n < 2:
            raise ConfigError(f"{where}: conv_pos_kernel_size {k} with {n} layer(s) is not supported "
                              f"(needs a kernel >= 3 and >= 2 layers)")
        encoder.update(pos_conv_kernel=k * n, pos_conv_depth=n, layer_norm_first=False)
    else:
        encoder.update(pos_conv_kernel=int(_need(cfg, "num_conv_pos_embeddings", where)), pos_conv_depth=1,
                       layer_norm_first=bool(cfg.get("do_stable_layer_norm", False)))
    preproc = preproc or {}
    # do_normalize from the feature extractor; else the official default (the layer-norm models normalise)
    normalize = bool(preproc.get("do_normalize", norm == "layer"))
    rate = int(preproc.get("sampling_rate", 16000))
    data = load_preset_dict(ARCHITECTURES[arch])
    data["frontend"] = {"name": "waveform", "normalize": normalize}
    data["encoder"] = encoder
    data["data"] = {**data.get("data", {}), "sample_rate": rate}
    data["description"] = f"imported from transformers ({arch}, {cfg.get('_name_or_path') or where.parent.name})"
    return data


# -- weights ------------------------------------------------------------------------------------

_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_BLOCK = {"attention.out_proj": "attn.proj", "layer_norm": "norm1", "final_layer_norm": "norm2",
          "feed_forward.intermediate_dense": "fc1", "feed_forward.output_dense": "fc2"}


def _pos_conv_gv(src: dict[str, Tensor], prefix: str) -> tuple[Tensor, Tensor] | None:
    """The wav2vec 2.0 / HuBERT positional conv's weight norm (g, v), whichever way it was saved
    (old weight_g / weight_v, parametrizations original0 / original1, or a plain weight)."""
    for g, v in (("weight_g", "weight_v"), ("parametrizations.weight.original0", "parametrizations.weight.original1")):
        if f"{prefix}.{g}" in src and f"{prefix}.{v}" in src:
            return src[f"{prefix}.{g}"], src[f"{prefix}.{v}"]
    if f"{prefix}.weight" in src:  # weight norm removed: w = |w| * w / |w|
        w = src[f"{prefix}.weight"]
        return w.norm(dim=(0, 1), keepdim=True), w
    return None


def convert_weights(src: dict[str, Tensor], target: dict[str, Tensor], arch: str, where: Path
                    ) -> tuple[dict[str, Tensor], list[str]]:
    """Source tensors -> the encoder's state dict (`target` gives the names and shapes), plus the
    source names left unused (task heads, quantizers ...)."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()

    def take(name: str, dest: str) -> None:
        if name in src:
            out[dest] = src[name]
            used.add(name)

    if "masked_spec_embed" in src:
        take("masked_spec_embed", "mask_emb")
    else:  # built only for masked training; unused at inference
        out["mask_emb"] = torch.zeros_like(target["mask_emb"])
    for k in src:
        if m := re.match(r"^feature_extractor\.conv_layers\.(\d+)\.(conv|layer_norm)\.(weight|bias)$", k):
            i, part, p = m.groups()
            take(k, f"extractor.{'convs' if part == 'conv' else 'norms'}.{i}.{p}")
        elif m := re.match(r"^feature_projection\.(layer_norm|projection)\.(weight|bias)$", k):
            take(k, f"{'feature_norm' if m[1] == 'layer_norm' else 'project'}.{m[2]}")
        elif m := re.match(r"^encoder\.layer_norm\.(weight|bias)$", k):
            take(k, f"norm.{m[1]}")
        elif m := re.match(r"^encoder\.pos_conv_embed\.layers\.(\d+)\.conv\.(weight|bias)$", k):
            take(k, f"pos_conv.convs.{m[1]}.{m[2]}")
        elif (m := _LAYER.match(k)) and (sub := re.match(r"^(.+)\.(weight|bias)$", m[2])) and sub[1] in _BLOCK:
            take(k, f"blocks.blocks.{m[1]}.{_BLOCK[sub[1]]}.{sub[2]}")
    if arch != "data2vec-audio":
        gv = _pos_conv_gv(src, "encoder.pos_conv_embed.conv")
        if gv is not None:
            out["pos_conv.convs.0.weight_g"], out["pos_conv.convs.0.weight_v"] = gv
            used |= {k for k in src if k.startswith("encoder.pos_conv_embed.conv.") and not k.endswith(".bias")}
        take("encoder.pos_conv_embed.conv.bias", "pos_conv.convs.0.bias")
    depth = sum(1 for k in target if k.endswith(".attn.qkv.weight"))
    for i in range(depth):
        for p in ("weight", "bias"):
            names = [f"encoder.layers.{i}.attention.{x}_proj.{p}" for x in "qkv"]
            if all(n in src for n in names):
                out[f"blocks.blocks.{i}.attn.qkv.{p}"] = torch.cat([src[n] for n in names], 0)
                used |= set(names)
    missing = [k for k in target if k not in out]
    if missing:
        raise CheckpointError(f"{where}: no source weight for {len(missing)} encoder tensor(s), e.g. {missing[0]} "
                              f"(does config.json match the weights?)")
    for k, v in out.items():
        if tuple(v.shape) != tuple(target[k].shape):
            raise CheckpointError(f"{where}: {k} has shape {tuple(v.shape)}, the config gives "
                                  f"{tuple(target[k].shape)}")
    return {k: v.contiguous() for k, v in out.items()}, sorted(set(src) - used)


# -- parity with transformers -------------------------------------------------------------------

def _reference_model(arch: str, cfg: dict, src: dict[str, Tensor]):
    """The source model in transformers, built from its config and loaded with the tensors read
    here (so transformers never opens a pickle), or None when transformers is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    config = getattr(transformers, CONFIG_CLASSES[arch]).from_dict(
        {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
    config._attn_implementation = "eager"
    model = getattr(transformers, MODEL_CLASSES[arch])(config).eval()
    state = dict(src)
    names = set(model.state_dict())
    pre = "encoder.pos_conv_embed.conv."
    renames = [("weight_g", "parametrizations.weight.original0"), ("weight_v", "parametrizations.weight.original1")]
    for a, b in renames:  # old and new weight-norm names, whichever this transformers uses
        for x, y in ((a, b), (b, a)):
            if pre + x in state and pre + x not in names and pre + y in names:
                state[pre + y] = state.pop(pre + x)
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "masked_spec_embed"]
    if missing:
        raise CheckpointError(f"transformers {MODEL_CLASSES[arch]} misses {len(missing)} weight(s), e.g. {missing[0]}")
    return model


def _diff(ours: Tensor, ref: Tensor) -> tuple[float, float]:
    d = (ours.double() - ref.double()).abs().max().item()
    return d, d / max(ref.double().abs().max().item(), 1e-12)


@torch.no_grad()
def check_parity(encoder, reference, seconds: float = 1.0, sample_rate: int = 16000) -> dict:
    """Run both models on the same audio: one item, and a padded batch of two (the second 60% as
    long, with attention_mask). Returns max abs / rel diffs over the valid frames."""
    g = torch.Generator().manual_seed(0)
    n = max(int(seconds * sample_rate), 4 * int(encoder.receptive_field))
    wav = torch.randn(2, n, generator=g) * 0.1
    lengths = torch.tensor([n, max(int(n * 0.6), int(encoder.receptive_field))])
    wav[1, lengths[1]:] = 0.0
    res = {}
    ours = encoder(wav[:1]).tokens
    ref = reference(wav[:1]).last_hidden_state
    res["single_max_abs"], res["single_max_rel"] = _diff(ours, ref)
    mask = (torch.arange(n)[None] < lengths[:, None]).long()
    out = encoder(wav, lengths)
    ref = reference(wav, attention_mask=mask).last_hidden_state
    fl = out.lengths.tolist()
    a = torch.cat([out.tokens[i, :t] for i, t in enumerate(fl)])
    b = torch.cat([ref[i, :t] for i, t in enumerate(fl)])
    res["padded_max_abs"], res["padded_max_rel"] = _diff(a, b)
    return res


# -- the command --------------------------------------------------------------------------------

def _output_file(run_dir: Path, force: bool) -> Path:
    """RUN/export/encoder.safetensors, refused (before anything is read) in a training run folder or
    over an existing encoder without --force."""
    out_file = run_dir / "export" / "encoder.safetensors"
    if (run_dir / "ckpt").exists():
        raise ConfigError(f"{run_dir}: holds training checkpoints; import into a new folder")
    if out_file.exists() and not force:
        raise ConfigError(f"{out_file}: exists (use --force to replace it)")
    return out_file


def _write(run_dir: Path, out_file: Path, frontend, encoder, preset, summary: dict) -> None:
    """The converted encoder (checkpoint.export_encoder, atomic) and RUN/import.json."""
    shim = types.SimpleNamespace(frontend=frontend, inference_encoder=lambda: encoder)
    export_encoder(out_file, shim, preset)
    atomic_text(run_dir / "import.json", json.dumps(summary, indent=2) + "\n")


def import_model(src: str | Path, run_dir: str | Path, force: bool = False, check: bool = True) -> dict:
    """Convert the transformers folder `src` into RUN/export/encoder.safetensors (+ RUN/import.json);
    returns the summary."""
    src, run_dir = Path(src), Path(run_dir)
    if not src.exists():
        raise ConfigError(f"{src}: no such file or folder")
    if not (src / "config.json").is_file():
        raise ConfigError(f"{src}: no config.json (expected a transformers model folder)")
    out_file = _output_file(run_dir, force)
    cfg = _json(src / "config.json")
    pre = src / "preprocessor_config.json"
    preproc = _json(pre) if pre.is_file() else None
    data = preset_dict(cfg, preproc, src / "config.json")
    preset = preset_from_dict(data)
    arch = cfg["model_type"]
    frontend, encoder = build_encoder(preset)
    source = read_weights(src)
    tensors, unused = convert_weights(source, encoder.state_dict(), arch, src)
    encoder.load_state_dict(tensors, strict=True)
    frontend.eval()
    encoder.eval()
    summary = {"source": str(src), "architecture": arch, "out": str(out_file),
               "parameters": sum(p.numel() for p in encoder.parameters()),
               "layers": preset.encoder["depth"], "dim": preset.encoder["dim"],
               "extractor": preset.encoder["extractor_mode"],
               "layer_norm_first": preset.encoder["layer_norm_first"],
               "normalize": preset.frontend["normalize"], "sample_rate": preset.data.sample_rate,
               "unused_source_tensors": len(unused)}
    reference = _reference_model(arch, cfg, source) if check else None
    if reference is None:
        summary["parity"] = "not checked (transformers is not installed)" if check else "not checked"
    else:
        diffs = check_parity(encoder, reference, sample_rate=preset.data.sample_rate)
        summary.update({k: float(f"{v:.3g}") for k, v in diffs.items()})
        worst = max(diffs["single_max_rel"], diffs["padded_max_rel"])
        if not math.isfinite(worst) or worst > MAX_REL_DIFF:
            raise ImportMismatch(f"{src}: the converted encoder differs from transformers (max rel diff "
                                 f"single {diffs['single_max_rel']:.3g}, padded {diffs['padded_max_rel']:.3g} "
                                 f"> {MAX_REL_DIFF:g}); nothing written")
        summary["parity"] = "ok"
    _write(run_dir, out_file, frontend, encoder, preset, summary)
    return summary


# -- official BYOL-A / M2D weight files ---------------------------------------------------------
#
# BYOL-A (github.com/nttcslab/byol-a): AudioNTT2020 (v1, 3 conv blocks) and AudioNTT2022 (v2, 2 conv
# blocks, conv features stacked with the MLP output) share sslaudio's `audiontt` parameter names
# (`features.*`, `fc.*`), so the tensors are copied as they are; `d` / `mlp_hidden` come from the
# file (the released 512 / 1024 / 2048-d variants), everything else from the byol-a / byol-a-v2 preset.
# M2D (github.com/nttcslab/m2d): the checkpoint's `model` dict (or a bare state dict, or RuntimeM2D's
# `backbone.` weights) holds the online encoder as a timm ViT (patch_embed.proj, cls_token, pos_embed,
# blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm) beside the target encoder
# (`target_*`), the predictor (`decoder_*`) and `mask_token`, which inference does not use. The
# official positions are MAE's fixed 2-D sin-cos table with the time index in the first half of the
# channels and the frequency index in the second; the imported preset sets the ViT's
# `pos_order: time_first`, the same table, so the tensors are copied as they are and every output
# token (and the CLS output) is the official one.

# ATST (github.com/Audio-WestlakeU/audiossl): a Lightning checkpoint whose `state_dict` holds
# `model.student.encoder.*` and `model.teacher.encoder.*` (plus projector / predictor heads); the
# teacher's encoder is imported (the official evaluation's `model.teacher.encoder`), or the only
# encoder in the file. ATST-Clip is models/atst/audio_transformer.py's AST (cls_token, `norm`),
# ATST-Frame methods/atstframe/audio_transformer.py's FrameAST (no CLS, `norm_frame`): both
# `patch_embed.patch_embed` (a Linear on (64 x 4) patches flattened frequency-major, = sslaudio's
# Conv2d weight reshaped; or FrameAST's `patch_embed.proj` Conv2d), `mask_embed`, learned `pos_embed`
# (1, 1 + 250, D) cut to the input (row 0 the CLS position: Clip adds it to the CLS token, Frame
# skips it), DINO blocks with the timm names, LayerNorm eps 1e-6. The patch height is the whole
# 64-bin band (one token per 40 ms column), as the released models; the frontend is the presets'
# `mel_db` (fixed min-max dB scaling, so no --norm-stats).

OFFICIAL_KINDS = {"byol-a": "byol-a", "byol-a-v2": "byol-a-v2", "m2d": "m2d",
                  "atst-clip": "atst-clip", "atst-frame": "atst-frame"}  # kind -> preset
M2D_NORM_STATS = (-7.1, 4.2)  # runtime_audio.py's default: log-mel mean / std of AudioSet (M2D pre-training)
_M2D_IGNORED = ("target_", "decoder_", "mask_token", "norm_stats", "offline_", "text_", "audio_proj",
                "head.", "fc_norm.")


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:160] if s else type(e).__name__


def load_official(path: Path) -> dict[str, Tensor]:
    """A BYOL-A / M2D .pth or ATST Lightning .ckpt read with torch.load(weights_only=True) (an
    argparse.Namespace, as M2D training checkpoints keep their arguments in, is the only class
    allowed besides tensors and plain containers) -> its flat tensor dict, unwrapped from `model` /
    `state_dict`."""
    import argparse

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unreadable or unsafe pickle is one line
        raise CheckpointError(f"{path}: not a readable weights-only PyTorch file ({_first_line(e)})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    out = {str(k): (v.float() if v.is_floating_point() else v) for k, v in obj.items() if isinstance(v, Tensor)}
    if not out:
        raise CheckpointError(f"{path}: holds no tensors")
    return out


def _prefixes(src: dict[str, Tensor], anchor: str) -> list[str]:
    return sorted({k[: -len(anchor)] for k in src if k.endswith(anchor) and
                   (len(k) == len(anchor) or k[-len(anchor) - 1] == ".")})


def detect_kind(src: dict[str, Tensor], where: Path) -> str:
    """byol-a / byol-a-v2 / m2d / atst-clip / atst-frame from the key names (and the number of conv
    blocks; ATST's `mask_embed` and `norm_frame` / `cls_token`)."""
    atst = _atst_prefixes(src)
    if atst:
        p = _teacher_first(atst)[0]
        return "atst-frame" if f"{p}norm_frame.weight" in src else "atst-clip"
    m2d = _prefixes(src, "patch_embed.proj.weight") and _prefixes(src, "blocks.0.attn.qkv.weight")
    byol = _prefixes(src, "features.0.weight") and _prefixes(src, "fc.0.weight")
    if m2d and not byol:
        return "m2d"
    if byol and not m2d:
        p = _prefixes(src, "features.0.weight")[0]
        return "byol-a" if f"{p}features.8.weight" in src else "byol-a-v2"
    first = next(iter(src))
    raise CheckpointError(f"{where}: cannot tell BYOL-A, M2D or ATST weights apart (first key {first!r}); "
                          f"pass --kind {', '.join(OFFICIAL_KINDS)}")


def _one_prefix(src: dict[str, Tensor], anchor: str, where: Path) -> str:
    found = _prefixes(src, anchor)
    if not found:
        raise CheckpointError(f"{where}: no '{anchor}' (not weights of this kind?)")
    if len(found) > 1:
        raise CheckpointError(f"{where}: {len(found)} encoders in the file (prefixes "
                              f"{', '.join(repr(p) for p in found[:3])}); save the one to import alone")
    return found[0]


def _fit(out: dict[str, Tensor], target: dict[str, Tensor], where: Path, hint: str) -> dict[str, Tensor]:
    """Refuse, with the first tensor that is missing or does not fit, before anything is loaded."""
    for k, t in target.items():
        if k not in out:
            raise CheckpointError(f"{where}: no source weight for {k} ({hint})")
        if tuple(out[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{where}: {k} has shape {tuple(out[k].shape)}, the {hint} needs {tuple(t.shape)}")
    return {k: out[k].to(target[k].dtype).contiguous() for k in target}


def byola_preset(kind: str, src: dict[str, Tensor], where: Path) -> dict:
    data = load_preset_dict(OFFICIAL_KINDS[kind])
    p = _one_prefix(src, "features.0.weight", where)
    three = f"{p}features.8.weight" in src
    if kind == "byol-a" and not three:
        raise CheckpointError(f"{where}: no source weight for features.8.weight (2 conv blocks: byol-a-v2 weights?)")
    if kind == "byol-a-v2" and three:
        raise CheckpointError(f"{where}: unknown tensor {p}features.8.weight for byol-a-v2's 2 conv blocks "
                              f"(byol-a v1 weights?)")
    fc0, fc3 = src.get(f"{p}fc.0.weight"), src.get(f"{p}fc.3.weight")
    if fc0 is not None and fc3 is not None and fc0.ndim == 2 and fc3.ndim == 2:
        if kind == "byol-a":
            data["encoder"]["d"] = int(fc3.shape[0])
        else:  # d = conv features + MLP output
            data["encoder"].update(d=int(fc3.shape[0] + fc0.shape[1]), mlp_hidden=int(fc0.shape[0]))
    return data


def convert_byola(src: dict[str, Tensor], target: dict[str, Tensor], where: Path, kind: str
                  ) -> tuple[dict[str, Tensor], list[str]]:
    p = _one_prefix(src, "features.0.weight", where)
    out, used = {}, set()
    for k, v in src.items():
        if not k.startswith(p):
            continue
        name = k[len(p):]
        if name.startswith(("features.", "fc.")):
            if name not in target:
                raise CheckpointError(f"{where}: unknown tensor {k} for the {kind} preset's AudioNTT "
                                      f"(a different structure?)")
            out[name] = v
            used.add(k)
    for k, t in target.items():  # older BatchNorm files have no counter
        if k.endswith("num_batches_tracked") and k not in out:
            out[k] = torch.zeros_like(t)
    return _fit(out, target, where, f"{kind} preset's encoder"), sorted(set(src) - used)


_M2D_BLOCK = re.compile(r"^blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$")


def m2d_preset(src: dict[str, Tensor], where: Path) -> dict:
    data = load_preset_dict("m2d")
    p = _one_prefix(src, "patch_embed.proj.weight", where)
    w = src[f"{p}patch_embed.proj.weight"]
    if w.ndim != 4 or w.shape[1] != 1:
        raise CheckpointError(f"{where}: {p}patch_embed.proj.weight has shape {tuple(w.shape)}, "
                              f"expected (dim, 1, F_p, T_p)")
    dim = int(w.shape[0])
    if dim % 64:
        raise CheckpointError(f"{where}: width {dim} is not a multiple of 64 (heads = width / 64 as in timm's ViTs)")
    depth = 1 + max(int(m[1]) for k in src if k.startswith(p) and (m := _M2D_BLOCK.match(k[len(p):])))
    fc1 = src.get(f"{p}blocks.0.mlp.fc1.weight")
    enc = data["encoder"]
    enc.update(patch=[int(w.shape[2]), int(w.shape[3])], dim=dim, depth=depth, heads=dim // 64,
               qkv_bias=f"{p}blocks.0.attn.qkv.bias" in src, cls_token=True, pos_order="time_first")
    if fc1 is not None and fc1.ndim == 2:
        enc["mlp_ratio"] = float(fc1.shape[0]) / dim
    # runtime_audio encodes in chunks of the training grid, the length of the fixed position table
    pos = src.get(f"{p}pos_embed")  # (1, 1 + Fg * Tg, dim)
    fg = int(data["frontend"]["n_mels"]) // int(w.shape[2])
    if pos is not None and pos.shape[-2] > 1 and (int(pos.shape[-2]) - 1) % fg == 0:
        enc["chunk"] = (int(pos.shape[-2]) - 1) // fg
    return data


def convert_m2d(src: dict[str, Tensor], target: dict[str, Tensor], where: Path, n_freq: int
                ) -> tuple[dict[str, Tensor], list[str]]:
    p = _one_prefix(src, "patch_embed.proj.weight", where)
    dim = int(target["cls"].shape[-1])
    out, used = {}, set()
    for k, v in src.items():
        if not k.startswith(p):
            continue
        name = k[len(p):]
        if name in ("cls_token", "pos_embed") or name.startswith(_M2D_IGNORED):
            continue
        m = _M2D_BLOCK.match(name)
        if m:
            i, part, kind = m.groups()
            out[f"blocks.blocks.{i}.{part.removeprefix('mlp.')}.{kind}"] = v
        elif name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"):
            out[name] = v
        else:
            raise CheckpointError(f"{where}: unknown tensor {k} for an M2D ViT encoder "
                                  f"(layer scale, a different block?)")
        used.add(k)
    cls = src.get(f"{p}cls_token")
    if cls is None:
        raise CheckpointError(f"{where}: no {p}cls_token")
    cls = cls.reshape(-1)
    pos = src.get(f"{p}pos_embed")
    if pos is not None:
        used.add(f"{p}pos_embed")
        pos = pos.reshape(-1, pos.shape[-1])
        fp = int(target["patch_embed.proj.weight"].shape[2])
        fg = n_freq // fp
        n = pos.shape[0] - 1
        if pos.shape[-1] != dim or n < fg or n % fg:
            raise CheckpointError(f"{where}: {p}pos_embed has shape {tuple(src[f'{p}pos_embed'].shape)}, "
                                  f"not 1 + {fg} x T positions of width {dim}")
        table = sincos_pos_embed_2d(dim, (fg, n // fg), dtype=torch.float64, time_first=True)
        err = (pos[1:].double() - table).abs().max().item()
        if err > 1e-4:
            raise CheckpointError(f"{where}: {p}pos_embed is not the fixed 2-D sin-cos table (max diff "
                                  f"{err:.3g}); learned or resampled positions are not supported")
        cls = cls + pos[0]  # M2D adds pos_embed[:, :1] (zeros in the released files) to the CLS token
    out["cls"] = cls.reshape(1, 1, dim)
    used.add(f"{p}cls_token")
    out["mask_token"] = torch.zeros_like(target["mask_token"])  # M2D's mask token is the predictor's
    return _fit(out, target, where, "m2d preset's ViT"), sorted(set(src) - used)


# -- ATST ---------------------------------------------------------------------------------------

def _atst_prefixes(src: dict[str, Tensor]) -> list[str]:
    """Prefixes of ATST encoders: transformer blocks beside `mask_embed` / `norm_frame` /
    `patch_embed.patch_embed` (names M2D's timm ViT does not have)."""
    return [p for p in _prefixes(src, "blocks.0.attn.qkv.weight")
            if any(f"{p}{x}" in src for x in ("mask_embed", "norm_frame.weight", "patch_embed.patch_embed.weight"))]


def _teacher_first(found: list[str]) -> list[str]:
    return sorted(found, key=lambda p: (not p.endswith("teacher.encoder."), p))


def _atst_prefix(src: dict[str, Tensor], where: Path) -> str:
    """The teacher's encoder (`model.teacher.encoder.`), else the only ATST encoder in the file."""
    found = _atst_prefixes(src)
    if not found:
        raise CheckpointError(f"{where}: no ATST encoder (blocks.0.attn.qkv.weight beside mask_embed / "
                              f"patch_embed.patch_embed.weight); not ATST weights?")
    teachers = [p for p in found if p.endswith("teacher.encoder.")]
    if len(teachers) == 1:
        return teachers[0]
    if len(found) > 1:
        raise CheckpointError(f"{where}: {len(found)} encoders in the file (prefixes "
                              f"{', '.join(repr(p) for p in found[:3])}); save the one to import alone")
    return found[0]


def atst_preset(kind: str, src: dict[str, Tensor], where: Path) -> dict:
    data = load_preset_dict(OFFICIAL_KINDS[kind])
    p = _atst_prefix(src, where)
    enc = data["encoder"]
    w = src.get(f"{p}patch_embed.patch_embed.weight", src.get(f"{p}patch_embed.proj.weight"))
    if w is None:
        raise CheckpointError(f"{where}: no {p}patch_embed.patch_embed.weight (or patch_embed.proj.weight)")
    n_mels = int(data["frontend"]["n_mels"])
    size = int(w[0].numel())
    if w.ndim == 4 and (w.shape[1] != 1 or w.shape[2] != n_mels):
        raise CheckpointError(f"{where}: {p}patch_embed.proj.weight has shape {tuple(w.shape)}, expected "
                              f"(dim, 1, {n_mels}, T_p): patches of the whole {n_mels}-bin band")
    if w.ndim not in (2, 4) or size % n_mels:
        raise CheckpointError(f"{where}: patch embedding of shape {tuple(w.shape)} does not take "
                              f"{n_mels}-bin patches (the {kind} preset's frontend)")
    dim = int(w.shape[0])
    if dim % 64:
        raise CheckpointError(f"{where}: width {dim} is not a multiple of 64 (heads = width / 64 as ATST's "
                              f"small / base models)")
    pos = src.get(f"{p}pos_embed")
    if pos is None:
        raise CheckpointError(f"{where}: no {p}pos_embed")
    rows = int(pos.reshape(-1, pos.shape[-1]).shape[0]) - 1  # row 0: the CLS position
    if rows < 1:
        raise CheckpointError(f"{where}: {p}pos_embed has shape {tuple(pos.shape)}: no patch positions")
    depth = 1 + max(int(m[1]) for k in src if k.startswith(p) and (m := _M2D_BLOCK.match(k[len(p):])))
    enc.update(patch=[n_mels, size // n_mels], dim=dim, depth=depth, heads=dim // 64,
               qkv_bias=f"{p}blocks.0.attn.qkv.bias" in src,
               pos_len=rows if kind == "atst-frame" else min(int(enc.get("pos_len", rows)), rows),
               eval_blocks=min(int(enc.get("eval_blocks", 1)), depth))  # official: the last 12, all of small / base
    fc1 = src.get(f"{p}blocks.0.mlp.fc1.weight")
    if fc1 is not None and fc1.ndim == 2:
        enc["mlp_ratio"] = float(fc1.shape[0]) / dim
    return data


def convert_atst(src: dict[str, Tensor], target: dict[str, Tensor], where: Path, kind: str
                 ) -> tuple[dict[str, Tensor], list[str]]:
    p = _atst_prefix(src, where)
    norm = "norm_frame" if kind == "atst-frame" else "norm"
    out, used = {}, set()
    for k, v in src.items():
        if not k.startswith(p):
            continue
        name = k[len(p):]
        if name in ("cls_token", "pos_embed"):
            continue
        if name == "final_to_melsp.weight" or name == "final_to_melsp.bias":  # AST's reconstruction head
            continue
        m = _M2D_BLOCK.match(name)
        if m:
            i, part, pk = m.groups()
            out[f"blocks.blocks.{i}.{part.removeprefix('mlp.')}.{pk}"] = v
        elif name in ("patch_embed.patch_embed.weight", "patch_embed.proj.weight"):
            t = target["patch_embed.proj.weight"]
            out["patch_embed.proj.weight"] = v.reshape(t.shape) if v.numel() == t.numel() else v
        elif name in ("patch_embed.patch_embed.bias", "patch_embed.proj.bias"):
            out["patch_embed.proj.bias"] = v
        elif name == "mask_embed":
            out["mask_token"] = v.reshape(-1)
        elif name in (f"{norm}.weight", f"{norm}.bias"):
            out[f"norm.{name.rsplit('.', 1)[1]}"] = v
        else:
            raise CheckpointError(f"{where}: unknown tensor {k} for an {kind} encoder "
                                  f"(prompts, another structure, or the other ATST kind?)")
        used.add(k)
    pos = src.get(f"{p}pos_embed")
    t = target["pos_embed"]  # (1, pos_len, dim)
    pos = pos.reshape(-1, pos.shape[-1])
    if pos.shape[-1] != t.shape[-1] or pos.shape[0] < 1 + t.shape[1]:
        raise CheckpointError(f"{where}: {p}pos_embed has shape {tuple(src[f'{p}pos_embed'].shape)}, the {kind} "
                              f"preset's ViT needs 1 + {t.shape[1]} positions of width {t.shape[-1]}")
    out["pos_embed"] = pos[1: 1 + t.shape[1]].reshape(t.shape)
    used.add(f"{p}pos_embed")
    if "cls" in target:
        cls = src.get(f"{p}cls_token")
        if cls is None:
            raise CheckpointError(f"{where}: no {p}cls_token (ATST-Frame weights? pass --kind atst-frame)")
        out["cls"] = (cls.reshape(-1) + pos[0]).reshape(target["cls"].shape)  # AST adds pos_embed[:, 0] to CLS
        used.add(f"{p}cls_token")
    elif f"{p}cls_token" in src:
        raise CheckpointError(f"{where}: unknown tensor {p}cls_token for an {kind} encoder (ATST-Clip weights?)")
    return _fit(out, target, where, f"{kind} preset's ViT"), sorted(set(src) - used)


def import_official(src: str | Path, run_dir: str | Path, kind: str | None = None,
                    norm_stats: tuple[float, float] | None = None, force: bool = False) -> dict:
    """Convert an official BYOL-A / M2D / ATST weight file into RUN/export/encoder.safetensors (+ RUN/import.json)."""
    src, run_dir = Path(src), Path(run_dir)
    if not src.is_file():
        raise ConfigError(f"{src}: no such file")
    if kind is not None and kind not in OFFICIAL_KINDS:
        raise ConfigError(f"--kind {kind!r} is not one of {', '.join(OFFICIAL_KINDS)}")
    out_file = _output_file(run_dir, force)
    source = load_official(src)
    detected = kind is None
    kind = kind or detect_kind(source, src)
    stats_from = "--norm-stats"
    atst = kind.startswith("atst")
    if atst and norm_stats is not None:
        raise ConfigError(f"{src}: ATST's frontend scales dB by the fixed official bounds; --norm-stats does not apply")
    if atst:
        pass
    elif norm_stats is None:
        if kind != "m2d":
            raise ConfigError(f"{src}: BYOL-A weights need the log-mel statistics they are used with: "
                              f"--norm-stats MEAN STD (of your data, or the ones you pre-trained with)")
        ns = next((v for k, v in source.items() if k.split(".")[-1] == "norm_stats" and v.numel() == 2), None)
        if ns is not None:
            norm_stats, stats_from = (float(ns[0]), float(ns[1])), "the file's norm_stats"
        else:
            norm_stats, stats_from = M2D_NORM_STATS, "M2D default (AudioSet)"
    if not atst:
        mean, std = (float(x) for x in norm_stats)
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ConfigError(f"--norm-stats {mean} {std}: need a finite mean and a positive std")
    if atst:
        data = atst_preset(kind, source, src)
    else:
        data = m2d_preset(source, src) if kind == "m2d" else byola_preset(kind, source, src)
    data["description"] = f"imported from the official {kind} weights ({src.name})"
    preset = preset_from_dict(data)
    frontend, encoder = build_encoder(preset)
    if kind == "m2d":
        tensors, unused = convert_m2d(source, encoder.state_dict(), src, int(frontend.out_channels))
    elif atst:
        tensors, unused = convert_atst(source, encoder.state_dict(), src, kind)
    else:
        tensors, unused = convert_byola(source, encoder.state_dict(), src, kind)
    encoder.load_state_dict(tensors, strict=True)
    if atst:  # mel_db: the official min-max bounds, kept in the normalisation buffers
        mean, std = float(frontend.norm_mean), float(frontend.norm_std)
        stats_from = "ATST's fixed dB bounds (mel_db frontend)"
    else:
        with torch.no_grad():
            frontend.norm_mean.fill_(mean)
            frontend.norm_std.fill_(std)
    frontend.eval()
    encoder.eval()
    summary = {"source": str(src), "kind": kind, "kind_detected": detected, "preset": OFFICIAL_KINDS[kind],
               "out": str(out_file), "parameters": sum(p.numel() for p in encoder.parameters()),
               "encoder": dict(preset.encoder), "norm_mean": mean, "norm_std": std, "norm_stats_from": stats_from,
               "unused_source_tensors": len(unused), "parity": "not checked (no official package here)"}
    _write(run_dir, out_file, frontend, encoder, preset, summary)
    return summary
