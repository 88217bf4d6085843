"""The run folder's housekeeping around training: what a killed process left behind, moving an old
run aside for `--no-resume`, and the checks made before a run resumes (its configuration and its
data). Writing the run folder is `train.py`'s; locking it is `runlock.py`'s.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from sslaudio.config import Preset, preset_tree


class RunMismatch(Exception):
    """RUN holds checkpoints of a different configuration (exit code 2)."""


_MISSING = object()


def config_diff(old: dict, preset: Preset) -> list[str]:
    """'key: old -> new' for every leaf of the saved config that differs from `preset` and that
    changes its identity (what Preset.identity ignores, such as train.log_every, is left out)."""
    new = preset.to_dict()
    found: list[tuple[tuple, object, object]] = []

    def walk(a, b, path: tuple) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in list(a) + [k for k in b if k not in a]:
                walk(a.get(k, _MISSING), b.get(k, _MISSING), path + (k,))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, path + (i,))
        elif a != b:
            found.append((path, a, b))

    walk(old, new, ())
    try:
        base = preset_tree(new).identity()
    except Exception:
        base = None

    def matters(path: tuple, old_value) -> bool:
        if base is None:
            return True
        d = copy.deepcopy(new)
        cur = d
        for k in path[:-1]:
            cur = cur[k]
        if old_value is _MISSING:
            del cur[path[-1]]
        else:
            cur[path[-1]] = copy.deepcopy(old_value)
        try:
            return preset_tree(d).identity() != base
        except Exception:
            return True

    def show(v) -> str:
        text = "(none)" if v is _MISSING else json.dumps(v)
        return text if len(text) <= 40 else text[:37] + "..."

    def dotted(path: tuple) -> str:
        return "".join(f"[{k}]" if isinstance(k, int) else (f".{k}" if i else str(k)) for i, k in enumerate(path))

    return [f"{dotted(p)}: {show(a)} -> {show(b)}" for p, a, b in found if matters(p, a)]


def mismatch(run: Path, saved: dict, preset: Preset) -> RunMismatch:
    diff = config_diff(saved.get("config") or {}, preset)
    what = ""
    if diff:
        what = " (" + "; ".join(diff[:5]) + (f"; and {len(diff) - 5} more" if len(diff) > 5 else "") + ")"
    return RunMismatch(f"{run} holds a run with another configuration{what}; see {run}/config.yaml. Use the "
                       f"same preset and --set values, --no-resume, or a new --out")


def data_digest(infos) -> str:
    """sha256 of the sorted absolute paths of the files a run trains on."""
    paths = sorted(os.path.abspath(i.path) for i in infos)
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()


def remove_leftovers(run: Path) -> None:
    """What a killed process leaves behind: the step folder it was writing and atomic-write temp
    files. Nothing committed matches these names."""
    for p in (run / "ckpt").glob(".tmp-step-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for folder, name in ((run, "config.yaml"), (run, "log.jsonl"), (run / "export", "encoder.safetensors")):
        for p in folder.glob(f".{name}.*.tmp"):
            p.unlink(missing_ok=True)


def move_aside(run: Path) -> Path:
    """--no-resume: the old run's files into RUN/.replaced-<time>-*/ (deleted once the new run has
    committed a checkpoint). The checkpoints move last, so a process killed half-way leaves them
    where a resume finds them."""
    dest = Path(tempfile.mkdtemp(dir=run, prefix=f".replaced-{time.strftime('%Y%m%d-%H%M%S')}-"))
    for name in ("log.jsonl", "config.yaml", "export", "ckpt"):
        if (run / name).exists():
            os.replace(run / name, dest / name)
    return dest
