"""Checkpoints and exported encoders: safetensors with JSON metadata, atomic writes, no pickle.

RUN/ckpt/step-000001000/{model.safetensors, optim.safetensors, state.json} is written in a
hidden temp folder and renamed into place, so a step folder exists only once it is complete.
RUN/export/encoder.safetensors holds the frontend + inference encoder, with the resolved preset
in its metadata: everything `extract` / `probe` / `export` need. This module is storage only;
`inference.py` turns these files into a model.
"""

from __future__ import annotations

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
from sslaudio.atomic import atomic_write
from sslaudio.config import Preset

STEP_RE = re.compile(r"^step-(\d+)$")
ENCODER_FORMAT = "sslaudio-encoder/1"


class CheckpointError(Exception):
    """A checkpoint argument that does not point at something loadable (exit code 2)."""


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                                             metadata=metadata))


def read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
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
    groups = [{("constant_lr" if k == "fix_lr" else k): v for k, v in g.items()}  # fix_lr: sslaudio <= 0.1.0
              for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


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
    model, _ = read_tensors(step_dir / "model.safetensors")
    optim, meta = read_tensors(step_dir / "optim.safetensors")
    return model, optim, json.loads(meta["optim"]), state


# -- exported encoders --------------------------------------------------------------------------

def export_encoder(path: Path, method: nn.Module, preset: Preset) -> None:
    tensors = {f"frontend.{k}": v for k, v in method.frontend.state_dict().items()}
    tensors.update({f"encoder.{k}": v for k, v in method.inference_encoder().state_dict().items()})
    _atomic_save(tensors, Path(path), {"format": ENCODER_FORMAT, "config": json.dumps(preset.to_dict()),
                                       "sslaudio": __version__})
