"""Checkpoints and exported encoders: safetensors with JSON metadata, atomic writes, no pickle.

RUN/ckpt/step-000001000/{model.safetensors, optim.safetensors, state.json} is written in a
hidden temp folder, flushed to the disk and renamed into place, so a step folder exists only once
it is complete. RUN/export/encoder.safetensors holds the frontend + inference encoder, with the
resolved preset in its metadata: everything `extract` / `probe` / `export` need. This module is
storage only; `inference.py` turns these files into a model.

Integrity. Nothing non-finite is written (`NonFiniteWeights`, before any file is touched). Every
tensor file carries `sha256` in its metadata (`tensors_sha256`: the tensors in sorted name order,
each as the JSON line `[name, dtype, shape]` and then its raw little-endian bytes), and state.json
repeats both files' hashes. `verify_step` checks a step folder against them (and that every tensor
is finite); `latest` returns the newest step that verifies, skipping the others with a warning,
and pruning keeps the newest `keep_last` steps that verify. Files written before the hashes
existed have none and are accepted when they are readable and finite.

Fault injection, for the crash tests: SSLAUDIO_FAULT=<point> (or <point>@<step>: only when saving
that step) ends the process with os._exit(99) at that point of `save` (after-model, after-optim,
after-state, before-rename, before-prune) or of `export_encoder` (before-export-rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from sslaudio import __version__
from sslaudio.atomic import as_os_error, atomic_write, fsync_path
from sslaudio.config import Preset

STEP_RE = re.compile(r"^step-(\d+)$")
ENCODER_FORMAT = "sslaudio-encoder/1"
HASH_KEY = "sha256"
STEP_FILES = ("model.safetensors", "optim.safetensors")
RANKS_FILE = "ranks.safetensors"  # several processes: the buffers that differ between them (optional)
FAULT_ENV = "SSLAUDIO_FAULT"
FAULT_POINTS = ("after-model", "after-optim", "after-state", "before-rename", "before-prune",
                "before-export-rename")


class CheckpointError(Exception):
    """A checkpoint argument that does not point at something loadable (exit code 2)."""


class NonFiniteWeights(CheckpointError):
    """A model or optimizer tensor holds NaN or inf: refused before anything is written."""


class CheckpointWarning(UserWarning):
    """A step folder that does not verify was skipped (the default channel of `latest`'s warn)."""


# -- integrity ----------------------------------------------------------------------------------

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """sha256 over the tensors in sorted name order: for each, the JSON line
    `["name", "F32", [shape...]]\\n` (safetensors dtype names) and then its raw bytes (C order,
    little-endian): what the file's tensor data must hash to, whatever its header layout."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update((json.dumps([name, _DTYPES.get(t.dtype, str(t.dtype)), list(t.shape)]) + "\n").encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def first_nonfinite(tensors: dict[str, Tensor]) -> str | None:
    """'name (3 NaN, 1 inf of 4096 values)' for the first tensor holding NaN or inf, else None."""
    for name, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
            n_nan = int(torch.isnan(t).sum())
            n_inf = int(torch.isinf(t).sum())
            return f"'{name}' ({n_nan} NaN, {n_inf} inf of {t.numel()} values)"
    return None


def check_tensors(tensors: dict[str, Tensor], meta: dict[str, str], where: Path | str,
                  expected: str | None = None) -> None:
    """Raise CheckpointError unless `tensors` (read from file `where`, with its metadata) match the
    file's sha256 (and `expected`, the hash state.json records, when given) and are all finite."""
    stored = meta.get(HASH_KEY)
    if expected is not None and stored != expected:
        raise CheckpointError(f"{where}: not the file its state.json was saved with (sha256 "
                              f"{(stored or 'missing')[:12]}, expected {expected[:12]})")
    if stored is not None and tensors_sha256(tensors) != stored:
        raise CheckpointError(f"{where}: tensor data does not match its sha256 (the file is corrupted)")
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise CheckpointError(f"{where}: tensor {bad} is not finite")


_VERIFIED: dict[tuple, str | None] = {}  # (step folder, its files' stat) -> verify_step's answer


def verify_step(step_dir: Path) -> str | None:
    """Why the step folder cannot be trusted (a one-line reason), or None when it verifies: state.json
    readable, both tensor files readable, matching their sha256 and state.json's, every tensor
    finite; the per-process buffers too when state.json lists them. A step saved before the hashes
    existed needs only be readable and finite. The answer is cached for as long as the files are
    unchanged."""
    step_dir = Path(step_dir)
    try:
        key = (str(step_dir.resolve()),) + tuple(
            (st.st_ino, st.st_size, st.st_mtime_ns) for st in
            (os.stat(step_dir / n) for n in ("state.json",) + STEP_FILES))
    except OSError as e:
        return f"{step_dir}: {e.strerror or e} ({Path(e.filename or '').name})"
    try:  # optional (several processes), but a change to it must not reuse the cached answer
        st = os.stat(step_dir / RANKS_FILE)
        key += ((st.st_ino, st.st_size, st.st_mtime_ns),)
    except OSError:
        key += (None,)
    if key not in _VERIFIED:
        if len(_VERIFIED) > 256:
            _VERIFIED.clear()
        _VERIFIED[key] = _verify(step_dir)
    return _VERIFIED[key]


def _verify(step_dir: Path) -> str | None:
    try:
        state = json.loads((step_dir / "state.json").read_text())
        hashes = state.get(HASH_KEY) or {}
        if not isinstance(hashes, dict):
            raise ValueError("bad sha256 entry")
    except (OSError, ValueError, AttributeError) as e:
        return f"{step_dir / 'state.json'}: unreadable ({str(e).splitlines()[0][:100]})"
    for name in STEP_FILES + ((RANKS_FILE,) if RANKS_FILE in hashes else ()):
        try:
            tensors, meta = read_tensors(step_dir / name)
            check_tensors(tensors, meta, step_dir / name, hashes.get(name))
        except CheckpointError as e:
            return str(e)
    return None


def load_rank_state(step_dir: Path, state: dict, rank: int) -> dict[str, Tensor] | None:
    """This process's per-process buffers from a step written by several processes ({} for rank
    0, whose copies are the model's), or None when the step has none (one process wrote it, or an
    interrupt saved it without gathering them). `state`: the step's state.json (load_step's)."""
    if RANKS_FILE not in (state.get(HASH_KEY) or {}):
        return None
    tensors, meta = read_tensors(Path(step_dir) / RANKS_FILE)
    check_tensors(tensors, meta, Path(step_dir) / RANKS_FILE, state[HASH_KEY][RANKS_FILE])
    prefix = f"{rank}/"
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _fault_spec() -> tuple[str, int | None] | None:
    """SSLAUDIO_FAULT as (point, step or None); None when unset. An unknown point is refused."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    name, _, at = spec.partition("@")
    if name not in FAULT_POINTS or (at and not at.isdigit()):
        raise CheckpointError(f"{FAULT_ENV}={spec}: expected one of {', '.join(FAULT_POINTS)}, optionally @STEP")
    return name, int(at) if at else None


def _fault(point: str, step: int | None = None) -> None:
    """End the process at once (exit code 99, no cleanup) if SSLAUDIO_FAULT names this point."""
    spec = _fault_spec()
    if spec is not None and spec[0] == point and spec[1] in (None, step):
        os._exit(99)


def _cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _refuse_nonfinite(tensors: dict[str, Tensor], what: str) -> None:
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise NonFiniteWeights(f"{what}: tensor {bad} is not finite; refusing to save it")


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str], fault: str | None = None,
                 step: int | None = None) -> None:
    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=metadata)
        if fault is not None:
            _fault(fault, step)

    atomic_write(path, write, fsync=True)


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


def latest(run_dir: Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest committed step folder that verifies (see `verify_step`), or None. Each newer one
    that does not is skipped with one warning through `warn` (default: warnings.warn with
    CheckpointWarning)."""
    for _, step_dir in reversed(step_dirs(run_dir)):
        reason = verify_step(step_dir)
        if reason is None:
            return step_dir
        _warn(warn, f"skipping checkpoint {step_dir.name}: {reason}")
    return None


def _warn(warn: Callable[[str], None] | None, msg: str) -> None:
    if warn is not None:
        warn(msg)
    else:
        warnings.warn(msg, CheckpointWarning, stacklevel=3)


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` steps that verify, and whatever is newer than the oldest of them
    (a newer step that does not verify is kept for inspection, never counted); delete the rest.
    Steps are verified newest first, only until `keep_last` good ones are found."""
    steps = step_dirs(run_dir)
    good = 0
    for i in range(len(steps) - 1, -1, -1):
        good += verify_step(steps[i][1]) is None
        if good == keep_last:
            for _, old in steps[:i]:
                shutil.rmtree(old, ignore_errors=True)
            return


def save(run_dir: Path, step: int, method: nn.Module, optimizer: torch.optim.Optimizer, preset: Preset,
         state: dict, keep_last: int, rank_state: dict[str, Tensor] | None = None) -> Path:
    """Write RUN/ckpt/step-N atomically, then prune to the newest `keep_last` that verify.

    Raises NonFiniteWeights, before anything is written, when a model or optimizer tensor holds NaN
    or inf. An I/O error (a full disk) leaves no temp folder and comes out as an OSError naming the
    file that could not be written."""
    model = _cpu(method.state_dict())
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    opt_tensors = _cpu(opt_tensors)
    _refuse_nonfinite(model, f"step {step}: model")
    _refuse_nonfinite(opt_tensors, f"step {step}: optimizer state")
    _fault_spec()  # an unknown SSLAUDIO_FAULT is refused before anything is written
    hashes = {"model.safetensors": tensors_sha256(model), "optim.safetensors": tensors_sha256(opt_tensors)}
    rank_state = _cpu(rank_state) if rank_state else {}
    if rank_state:  # other processes' copies of per-process buffers (distributed.rank_buffers)
        _refuse_nonfinite(rank_state, f"step {step}: per-process buffers")
        hashes[RANKS_FILE] = tensors_sha256(rank_state)
    ckpt = Path(run_dir) / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    final = ckpt / f"step-{step:09d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt, prefix=f".tmp-step-{step:09d}-"))
    try:
        config_json = json.dumps(preset.to_dict())
        _atomic_save(model, tmp / "model.safetensors", {"config": config_json, "step": str(step),
                                                        "sslaudio": __version__, HASH_KEY: hashes["model.safetensors"]})
        _fault("after-model", step)
        _atomic_save(opt_tensors, tmp / "optim.safetensors", {"optim": json.dumps(opt_meta),
                                                              HASH_KEY: hashes["optim.safetensors"]})
        _fault("after-optim", step)
        if rank_state:
            _atomic_save(rank_state, tmp / RANKS_FILE, {HASH_KEY: hashes[RANKS_FILE]})
        text = json.dumps({**state, "step": step, "identity": preset.identity(), HASH_KEY: hashes,
                           "config": preset.to_dict()}, indent=1)
        atomic_write(tmp / "state.json", lambda t: Path(t).write_text(text), fsync=True)
        _fault("after-state", step)
        fsync_path(tmp)
        _fault("before-rename", step)
        old = None
        if final.exists():  # the same step again (a resume past a step that did not verify): swap, then delete
            old = Path(tempfile.mkdtemp(dir=ckpt, prefix=f".tmp-step-{step:09d}-old-"))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
        fsync_path(ckpt)  # the rename reaches the disk before any older step is deleted
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.filename and str(e.filename).startswith(str(tmp)):
            named = as_os_error(OSError(e.errno, e.strerror), final / Path(e.filename).relative_to(tmp))
            if named is not None:
                raise named from e
        raise
    _fault("before-prune", step)
    prune(run_dir, keep_last)
    return final


def load_step(step_dir: Path) -> tuple[dict[str, Tensor], dict[str, Tensor], dict, dict]:
    """-> (model tensors, optimizer tensors, optimizer meta, state.json), each file checked against
    its sha256 and for finiteness (CheckpointError)."""
    try:
        state = json.loads((step_dir / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{step_dir / 'state.json'}: unreadable ({str(e).splitlines()[0][:100]})") from None
    hashes = state.get(HASH_KEY) or {}
    model, model_meta = read_tensors(step_dir / "model.safetensors")
    check_tensors(model, model_meta, step_dir / "model.safetensors", hashes.get("model.safetensors"))
    optim, meta = read_tensors(step_dir / "optim.safetensors")
    check_tensors(optim, meta, step_dir / "optim.safetensors", hashes.get("optim.safetensors"))
    return model, optim, json.loads(meta["optim"]), state


# -- exported encoders --------------------------------------------------------------------------

def export_is_current(path: Path, step: int) -> bool:
    """Whether `path` is a readable encoder export of training step `step` whose tensors match their
    sha256 (a finished run's export can be deleted or damaged after the run)."""
    try:
        tensors, meta = read_tensors(path)
        check_tensors(tensors, meta, path)
    except CheckpointError:
        return False
    return meta.get("step") == str(step) and meta.get(HASH_KEY) is not None


def export_encoder(path: Path, method: nn.Module, preset: Preset, step: int | None = None) -> None:
    """Write the frontend + inference encoder (with the preset, its sha256 and `step` in the
    metadata) atomically; NonFiniteWeights before anything is written."""
    tensors = {f"frontend.{k}": v for k, v in method.frontend.state_dict().items()}
    tensors.update({f"encoder.{k}": v for k, v in method.inference_encoder().state_dict().items()})
    tensors = _cpu(tensors)
    _refuse_nonfinite(tensors, f"{path}: encoder")
    _fault_spec()
    meta = {"format": ENCODER_FORMAT, "config": json.dumps(preset.to_dict()), "sslaudio": __version__,
            HASH_KEY: tensors_sha256(tensors)}
    if step is not None:
        meta["step"] = str(step)
    _atomic_save(tensors, Path(path), meta, fault="before-export-rename", step=step)
