"""Checkpoints and exported encoders: safetensors with JSON metadata, atomic writes, no pickle.

RUN/ckpt/step-000001000/{model.safetensors, optim.safetensors, state.json} is written in a
hidden temp folder and renamed into place, so a step folder exists only once it is complete.
RUN/export/encoder.safetensors holds the frontend + inference encoder, with the resolved preset
in its metadata: everything `extract` / `probe` / `export` need.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from sslaudio import __version__
from sslaudio.config import Preset, build_preset, load_preset

STEP_RE = re.compile(r"^step-(\d+)$")
ENCODER_FORMAT = "sslaudio-encoder/1"


class CheckpointError(Exception):
    """A checkpoint argument that does not point at something loadable (exit code 2)."""


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:  # one open for the tensors and the metadata
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:100]})") from None


# -- optimizer state <-> flat tensors -----------------------------------------------------------

def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"state.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        _, idx, k = name.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for name, v in meta.get("scalars", {}).items():
        idx, k = name.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# -- run folders --------------------------------------------------------------------------------

def step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    ckpt = Path(run_dir) / "ckpt"
    if not ckpt.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in ckpt.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()
           and (p / "state.json").is_file()]
    return sorted(out)


def latest(run_dir: Path) -> Path | None:
    dirs = step_dirs(run_dir)
    return dirs[-1][1] if dirs else None


def save(run_dir: Path, step: int, method: nn.Module, optimizer: torch.optim.Optimizer, preset: Preset,
         state: dict, keep_last: int) -> Path:
    """Write RUN/ckpt/step-N atomically, then prune to the newest `keep_last`."""
    ckpt = Path(run_dir) / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    final = ckpt / f"step-{step:09d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt, prefix=f".tmp-step-{step:09d}-"))
    try:
        config_json = json.dumps(preset.to_dict())
        _atomic_save(method.state_dict(), tmp / "model.safetensors",
                     {"config": config_json, "step": str(step), "sslaudio": __version__})
        opt_tensors, opt_meta = optimizer_tensors(optimizer)
        _atomic_save(opt_tensors, tmp / "optim.safetensors", {"optim": json.dumps(opt_meta)})
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "identity": preset.identity(),
                                                    "config": preset.to_dict()}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in step_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_step(step_dir: Path) -> tuple[dict[str, Tensor], dict[str, Tensor], dict, dict]:
    """-> (model tensors, optimizer tensors, optimizer meta, state.json)."""
    state = json.loads((step_dir / "state.json").read_text())
    model, _ = _read(step_dir / "model.safetensors")
    optim, meta = _read(step_dir / "optim.safetensors")
    return model, optim, json.loads(meta["optim"]), state


# -- exported encoders --------------------------------------------------------------------------

class EncoderBundle(nn.Module):
    """Frontend + encoder: waveform in, clip and frame embeddings out."""

    def __init__(self, frontend: nn.Module, encoder: nn.Module, preset: Preset, needs_stats: bool = False):
        super().__init__()
        self.frontend = frontend
        self.encoder = encoder
        self.preset = preset
        self.needs_stats = needs_stats  # random-init baselines estimate frontend stats from their inputs
        self.layer: int | None = None  # embed an intermediate block's output instead of the last

    @property
    def sample_rate(self) -> int:
        return self.preset.data.sample_rate

    def set_layer(self, layer: int | None) -> "EncoderBundle":
        """Use block `layer` (0-based, negative from the end; None: the encoder's output) for
        embeddings, as SUPERB-style probes of speech models do."""
        if layer is not None:
            with torch.no_grad():
                depth = len(self.encoder(*self._probe_input(), return_layers=True).layers or [])
            if not -depth <= layer < depth:
                raise CheckpointError(f"--layer {layer}: this encoder has {depth} layer(s) (0..{depth - 1})")
        self.layer = layer
        return self

    def _probe_input(self) -> tuple[Tensor, Tensor]:
        audio = torch.zeros(1, 4 * int(self.encoder.downsample), device=next(self.encoder.parameters()).device)
        with torch.no_grad():
            x, fl = self.frontend(audio)
        return x, fl

    def forward(self, audio: Tensor, lengths: Tensor | None = None):
        x, frame_lengths = self.frontend(audio, lengths)
        if self.layer is None:
            return self.encoder(x, frame_lengths)
        out = self.encoder(x, frame_lengths, return_layers=True)
        return dataclasses.replace(out, tokens=out.layers[self.layer])

    def embed(self, audio: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(B, S) -> clip (B, D), frames (B, T, D), frame lengths (B,)."""
        out = self(audio, lengths)
        frames, frame_lengths = self.encoder.to_frames(out)
        return self.encoder.pool(out), frames, frame_lengths


def export_encoder(path: Path, method: nn.Module, preset: Preset) -> None:
    tensors = {f"frontend.{k}": v for k, v in method.frontend.state_dict().items()}
    tensors.update({f"encoder.{k}": v for k, v in method.inference_encoder().state_dict().items()})
    _atomic_save(tensors, Path(path), {"format": ENCODER_FORMAT, "config": json.dumps(preset.to_dict()),
                                       "sslaudio": __version__})


def _bundle_from_preset(preset: Preset) -> EncoderBundle:
    from sslaudio.frontends import build_frontend
    from sslaudio.registry import ENCODERS, load_components

    load_components()
    frontend = build_frontend(preset.frontend, preset.data.sample_rate)
    encoder = ENCODERS.build(preset.encoder, "encoder", frontend=frontend)
    return EncoderBundle(frontend, encoder, preset)


def _preset_from_meta(meta: dict, where: Path) -> Preset:
    try:
        return build_preset(json.loads(meta["config"]))
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{where}: no sslaudio config in its metadata") from None


def load_encoder(spec: str) -> EncoderBundle:
    """A run folder (latest step), a step folder, an exported encoder file, or `random:PRESET`."""
    if spec.startswith("random:"):
        preset = load_preset(spec[len("random:"):])
        torch.manual_seed(preset.seed)
        bundle = _bundle_from_preset(preset)
        bundle.needs_stats = True
        return bundle.eval()
    p = Path(spec)
    if p.is_dir() and (p / "export" / "encoder.safetensors").is_file() and latest(p) is None:
        p = p / "export" / "encoder.safetensors"
    elif p.is_dir() and latest(p) is not None:
        p = latest(p)
    if p.is_file():
        tensors, meta = _read(p)
        if meta.get("format") != ENCODER_FORMAT:
            raise CheckpointError(f"{p}: not an sslaudio encoder file")
        bundle = _bundle_from_preset(_preset_from_meta(meta, p))
        _load_into(bundle, tensors, p)
        return bundle.eval()
    if p.is_dir() and (p / "model.safetensors").is_file():
        from sslaudio.methods import build_method

        tensors, meta = _read(p / "model.safetensors")
        preset = _preset_from_meta(meta, p)
        method = build_method(preset)
        _load_into(method, tensors, p)
        return EncoderBundle(method.frontend, method.inference_encoder(), preset).eval()
    raise CheckpointError(f"{spec}: not a run folder, step folder, encoder file or random:PRESET")


def _load_into(module: nn.Module, tensors: dict[str, Tensor], where: Path) -> None:
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not match the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
