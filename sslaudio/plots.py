"""PNG plots: a run's training curves (`sslaudio plot RUN`), and the probe's confusion matrices and
suite comparison (`probe --plots DIR`).

matplotlib is the optional `plots` extra: it is imported inside the functions (Agg backend, no
display needed), so importing this module costs nothing and needs neither matplotlib nor torch.
Without it, `require_matplotlib()` raises PlotError with the install hint. Every PNG is written
atomically (a temp file in the target's folder, then a rename).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from sslaudio.atomic import atomic_write
from sslaudio.config import ConfigError

MISSING = "plotting needs matplotlib: pip install 'sslaudio[plots]'"

# log.jsonl keys that are not training signals: the x axis, bookkeeping and throughput. Every other
# numeric key (loss first, then the method's scalars: emb_std, frame_std, code_ppl, acc ...) is one
# subplot.
NOT_PLOTTED = ("step", "time", "lr", "steps_per_s", "audio_h_per_s", "data_wait")


class PlotError(ConfigError):
    """A plot that cannot be made: matplotlib missing, no log to plot (exit code 2)."""


def require_matplotlib():
    """The pyplot module on the Agg backend; PlotError with the install hint when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError(MISSING) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = require_matplotlib()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), mode=0o666)
    finally:
        plt.close(fig)


def safe_name(name: str) -> str:
    """A task or checkpoint name as a file name part: [A-Za-z0-9._-] only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "task"


# --- training curves -------------------------------------------------------------------------------

def read_log(path: str | Path) -> list[dict]:
    """The rows of a log.jsonl (RUN/log.jsonl or the file itself), one per step (the last row written
    for a step wins), sorted by step; lines that are not JSON objects with a step are skipped.
    PlotError when there is no log or no row in it."""
    path = Path(path)
    log = path / "log.jsonl" if path.is_dir() else path
    if not log.is_file():
        where = f"{path} has no log.jsonl" if path.is_dir() else f"{path}: no such run folder or log file"
        raise PlotError(f"{where} (is it a pretrain run folder?)")
    rows: dict[int, dict] = {}
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a killed process
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and not isinstance(row["step"], bool):
            rows[int(row["step"])] = row
    if not rows:
        what = "is empty" if not log.read_bytes().strip() else "holds no JSON line with a step"
        raise PlotError(f"{log} {what}: no logged step to plot")
    return [rows[s] for s in sorted(rows)]


def signals(rows: list[dict]) -> list[str]:
    """The keys plotted: `loss`, then every other numeric key of the rows but NOT_PLOTTED, in the
    order they first appear."""
    keys: list[str] = []
    for row in rows:
        for k, v in row.items():
            if k not in NOT_PLOTTED and k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    return sorted(keys, key=lambda k: k != "loss")  # stable: loss first, the rest as found


def plot_training(run: str | Path, out: str | Path | None = None) -> dict:
    """One subplot per signal (loss and the method's collapse signals) against the step; steps whose
    row holds `warnings` are marked with a red dotted line. Writes `out` (default
    RUN/plots/training.png); -> {out, steps, panels: [key, ...], warnings: steps with warnings}."""
    run = Path(run)
    rows = read_log(run)
    plt = require_matplotlib()
    keys = signals(rows)
    if not keys:
        raise PlotError(f"{run}: the log has no numeric signal to plot")
    if out is None:
        out = (run if run.is_dir() else run.parent) / "plots" / "training.png"
    out = Path(out)
    steps = [r["step"] for r in rows]
    warned = [r["step"] for r in rows if r.get("warnings")]
    ncols = 1 if len(keys) <= 3 else 2
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 2.4 * nrows + 0.6), sharex=True, squeeze=False)
    flat = list(axes.flat)
    for ax, k in zip(flat, keys):
        ys = [_number(r.get(k)) for r in rows]
        ax.plot(steps, ys, marker="." if len(steps) <= 50 else None, lw=1.2)
        for s in warned:
            ax.axvline(s, color="red", ls=":", lw=0.8)
        ax.set_title(k, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in flat[len(keys):]:
        ax.remove()
    for ax in flat[:len(keys)][-ncols:]:
        ax.set_xlabel("step")
        ax.tick_params(labelbottom=True)
    fig.suptitle(f"{run}" + (" (red: steps with warnings)" if warned else ""), fontsize=10)
    fig.tight_layout()
    _save(fig, out)
    return {"out": str(out), "steps": len(rows), "panels": keys, "warnings": warned}


def _number(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


# --- probe plots -----------------------------------------------------------------------------------

def has_confusion(res: dict) -> bool:
    return bool(res.get("confusion")) and bool(res.get("classes"))


def plot_confusion(results: dict[str, dict], out: str | Path, title: str = "") -> str:
    """One row-normalised confusion matrix (rows: true class, columns: predicted; class names on the
    axes) per checkpoint in `results` ({checkpoint: probe result with `confusion` and `classes`}),
    side by side in one PNG at `out`."""
    import numpy as np

    plt = require_matplotlib()
    results = {c: r for c, r in results.items() if has_confusion(r)}
    if not results:
        raise PlotError("no confusion matrix to plot (multi-label and event tasks have none)")
    n = max(len(r["classes"]) for r in results.values())
    side = min(max(4.0, 0.4 * n + 2.5), 24.0)
    fig, axes = plt.subplots(1, len(results), figsize=(side * len(results), side), squeeze=False)
    for ax, (ckpt, r) in zip(axes.flat, results.items()):
        cm = np.asarray(r["confusion"], dtype=float)
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        classes = list(r["classes"])
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        ticks = range(len(classes))
        small = 8 if len(classes) <= 20 else 6
        ax.set_xticks(ticks, classes, rotation=90, fontsize=small)
        ax.set_yticks(ticks, classes, fontsize=small)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if len(classes) <= 15:
            for i in ticks:
                for j in ticks:
                    if cm[i, j]:
                        ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if norm[i, j] > 0.5 else "black")
        acc = r.get("accuracy")
        ax.set_title(ckpt + (f"\naccuracy {acc:.3f}" if isinstance(acc, float) else ""), fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, Path(out))
    return str(out)


def plot_suite(res: dict, out: str | Path) -> str:
    """Grouped bars of a probe suite (probe_suite's dict): one group per task, one bar per
    checkpoint, height the task's main metric (a missing value: no bar)."""
    plt = require_matplotlib()
    tasks, ckpts = res["tasks"], res["checkpoints"]
    width = 0.8 / max(len(ckpts), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + len(tasks) * (0.4 + 0.35 * len(ckpts))), 4.2))
    for k, c in enumerate(ckpts):
        xs, hs = [], []
        for i, t in enumerate(tasks):
            v = res["table"].get(t, {}).get(c)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                xs.append(i - 0.4 + width * (k + 0.5))
                hs.append(v)
        ax.bar(xs, hs, width, label=c)
    ax.set_xticks(range(len(tasks)), [f"{t}\n({res['main_metric'].get(t, '?')})" for t in tasks], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("main metric (test)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"probe suite: {res.get('suite', '')}", fontsize=10)
    fig.tight_layout()
    _save(fig, Path(out))
    return str(out)


def probe_plots(res: dict, out_dir: str | Path, suite: bool = False) -> list[str]:
    """`probe --plots DIR`: DIR/confusion.png for one probe result (single-label clip task), or for a
    suite's dict DIR/confusion-<task>.png per single-label task (a panel per checkpoint) and
    DIR/suite.png. -> the files written."""
    out_dir = Path(out_dir)
    if not suite:
        return [plot_confusion({res.get("checkpoint", ""): res}, out_dir / "confusion.png",
                               title=str(res.get("labels", "")))] if has_confusion(res) else []
    written, used = [], set()
    for task in res["tasks"]:
        per = res["results"].get(task, {})
        if not any(has_confusion(r) for r in per.values()):
            continue
        name, k = safe_name(task), 2
        while name in used:  # two task names that differ only in characters a file name drops
            name, k = f"{safe_name(task)}-{k}", k + 1
        used.add(name)
        written.append(plot_confusion(per, out_dir / f"confusion-{name}.png", title=task))
    written.append(plot_suite(res, out_dir / "suite.png"))
    return written
