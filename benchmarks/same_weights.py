"""Does a change of code change what training computes? Train every tiny preset for a few steps
with two checkouts of sslaudio and compare the weights and logged losses bit for bit.

    python benchmarks/same_weights.py --base /path/to/old/checkout --new . --steps 3

Each checkout runs `python -m sslaudio pretrain` (the CLI, whose interface both share) on the same
synthetic folder, single-threaded on the CPU. Prints one row per preset: identical, or the largest
weight difference and which tensors differ. Exit code 1 when any preset differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def tiny_presets(checkout: Path) -> list[str]:
    root = checkout / "presets"
    return sorted(str(p.relative_to(root).with_suffix("")) for p in (root / "tiny").glob("*.yaml"))


def pretrain(checkout: Path, preset: str, data: Path, run: Path, steps: int) -> str | None:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sslaudio", "pretrain", str(data), "--preset", preset, "--out", str(run),
           "--steps", str(steps), "--batch-size", "4", "--device", "cpu", "-q",
           "--set", "train.log_every=1", "--set", "data.num_workers=0"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=checkout)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1]


# tensors that a change renamed on purpose (old prefix -> new prefix); loading keeps accepting the old
RENAMED = {"views.augs.": "views.global_chains.0.augs."}  # BYOL-A's chain, now held by ViewSampler


def _renamed(tensors: dict) -> dict:
    out = {}
    for k, v in tensors.items():
        for old, new in RENAMED.items():
            if k.startswith(old):
                k = new + k[len(old):]
        out[k] = v
    return out


def compare(a: Path, b: Path) -> tuple[bool, str]:
    ta = _renamed(load_file(str(next((a / "ckpt").glob("step-*/model.safetensors")))))
    tb = _renamed(load_file(str(next((b / "ckpt").glob("step-*/model.safetensors")))))
    if set(ta) != set(tb):
        return False, f"tensor names differ: {sorted(set(ta) ^ set(tb))[:4]}"
    diff = {k: float(np.abs(ta[k].astype(np.float64) - tb[k].astype(np.float64)).max()) if ta[k].size else 0.0
            for k in ta}
    bad = [k for k, d in diff.items() if d > 0 or ta[k].shape != tb[k].shape]
    la = [json.loads(x)["loss"] for x in (a / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (b / "log.jsonl").read_text().splitlines()]
    if not bad and la == lb:
        return True, f"identical ({len(ta)} tensors, losses {', '.join(f'{v:.5f}' for v in la)})"
    return False, f"max |dw| {max(diff.values()):.3g} in {len(bad)} tensors (e.g. {bad[:3]}); losses {la} vs {lb}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="checkout to compare against")
    ap.add_argument("--new", type=Path, default=Path("."))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--presets", nargs="*", help="default: every tiny preset both checkouts have")
    args = ap.parse_args()
    base, new = args.base.resolve(), args.new.resolve()
    presets = args.presets or sorted(set(tiny_presets(base)) & set(tiny_presets(new)))
    work = Path(tempfile.mkdtemp(prefix="same-weights-"))
    subprocess.run([sys.executable, "-c", f"from sslaudio.synth import make_dataset; make_dataset('{work / 'data'}')"],
                   env={**os.environ, "PYTHONPATH": str(new)}, check=True, capture_output=True)
    data = work / "data" / "audio" / "train"
    ok_all = True
    print(f"| preset | {args.steps} steps, batch 4: base vs new |\n|---|---|")
    for name in presets:
        runs = []
        for tag, checkout in (("base", base), ("new", new)):
            run = work / tag / name.replace("/", "_")
            err = pretrain(checkout, name, data, run, args.steps)
            if err:
                runs = None
                print(f"| {name} | {tag} failed: {err} |", flush=True)
                ok_all = False
                break
            runs.append(run)
        if runs:
            ok, msg = compare(*runs)
            ok_all &= ok
            print(f"| {name} | {msg} |", flush=True)
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
