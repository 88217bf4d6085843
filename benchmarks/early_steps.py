#!/usr/bin/env python
"""What the first updates of a run do to one probe task, layer group by layer group.

    python benchmarks/early_steps.py RUN random:PRESET LABELS.csv
    python benchmarks/early_steps.py /work/runs/cpc-fine random:tiny/cpc /work/devbench-full/pitch_class/labels.csv \\
        --swap-step 20
    python benchmarks/early_steps.py /work/runs/npc-fine random:tiny/npc /work/devbench-full/pitch_class/labels.csv \\
        --layers

RUN is a run folder whose checkpoints (`ckpt/step-N`) started from the network that random:PRESET
builds (the same preset and seed, unmodified by --set); keep several early checkpoints with
`--set train.ckpt_every=5 --set train.keep_last=20`. Every network is embedded with the run's own
frontend (its training statistics), so only the encoder's weights differ between rows.

Table 1, one row per checkpoint (and the initial network): the accuracy of a ridge classifier
(closed form, standardised clip embeddings, one penalty) trained on up to --train clips of the
task's train split and scored on up to --test of its test split; the share of the training clip
embeddings' variance on their first principal component (near 1: the clips differ along one
direction only, a collapse the loss does not show); and each layer group's weight change relative
to its initial weights (Frobenius norms of the parameters; running statistics left out). Table 2
(--swap-step N): the initial network with one group's weights taken from step N, the same
classifier: which group's updates remove what the probe finds. Table 3 (--layers): the same
classifier on each of the encoder's layers (`probe --layer L`, L = 0 .. depth - 1, and `all` side
by side), initial network and every checkpoint: where in the network the task's information goes
first. Groups are parameter-name prefixes up to the first index (`convs.1`, `blocks.0`, `gru`).
Empty or undecodable files are skipped (a warning each, a count in the header); clips are cut to
the shortest one so they batch; the ridge classifier is a quick stand-in for `sslaudio probe`, not
the devbench protocol.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from sslaudio.audio import AudioError, load
from sslaudio.checkpoint import CheckpointError, step_dirs
from sslaudio.config import ConfigError
from sslaudio.inference import load_encoder
from sslaudio.probe import ProbeError, is_event_csv, read_labels


def group_of(name: str) -> str:
    m = re.match(r"^(.*?\.\d+)\.", name)
    return m.group(1) if m else name.split(".")[0]


def read_split(labels: Path, split: str, limit: int, sr: int) -> tuple[list[torch.Tensor], list[str], int]:
    """The first `limit` decodable, non-empty files of `split` (probe.read_labels checks the CSV), their
    labels, and how many were skipped."""
    if is_event_csv(labels):
        raise SystemExit(f"error: {labels} is a sound event (onset,offset) task; a single-label clip task is needed")
    rows = [r for r in read_labels(labels) if r.split == split]
    if not rows:
        raise SystemExit(f"error: {labels} has no '{split}' rows (a path,label,split CSV is needed)")
    if any(len(r.labels) != 1 for r in rows):
        raise SystemExit(f"error: {labels}: one label per file is needed (a single-label task)")
    clips, names, skipped = [], [], 0
    for r in rows:
        if len(clips) == limit:
            break
        try:
            clips.append(load(r.path, sr))  # AudioError for empty files too
        except AudioError as e:
            print(f"warning: skipped {r.rel}: {e}", file=sys.stderr)
            skipped += 1
            continue
        names.append(r.labels[0])
    if not clips:
        raise SystemExit(f"error: {labels}: no decodable '{split}' file")
    return clips, names, skipped


@torch.no_grad()
def embed(bundle, clips: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([bundle.embed(x)[0] for x in clips.split(batch)]).float()


def ridge_accuracy(ftr, ytr, fte, yte, n_classes: int, lam: float) -> float:
    mean, std = ftr.mean(0), ftr.std(0) + 1e-6
    a, b = (ftr - mean) / std, (fte - mean) / std
    a = torch.cat([a, torch.ones(len(a), 1)], 1)
    b = torch.cat([b, torch.ones(len(b), 1)], 1)
    target = torch.nn.functional.one_hot(ytr, n_classes).float()
    w = torch.linalg.solve(a.T @ a + lam * len(a) * torch.eye(a.shape[1]), a.T @ target)
    return ((b @ w).argmax(1) == yte).float().mean().item()


def pc1_share(f: torch.Tensor) -> float:
    """Fraction of the variance of the rows of f (N, D) on their first principal component."""
    s = torch.linalg.svdvals((f - f.mean(0)).double())
    return float(s[0] ** 2 / (s ** 2).sum().clamp_min(1e-300))


def main() -> None:
    try:
        run(parse_args())
    except (CheckpointError, ConfigError, ProbeError) as e:
        raise SystemExit(f"error: {e}") from None


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("init", help="random:PRESET: the network the run started from")
    ap.add_argument("labels", type=Path, help="path,label,split CSV of a single-label task")
    ap.add_argument("--train", type=int, default=800)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--ridge", type=float, default=1.0, help="penalty, times the number of clips")
    ap.add_argument("--swap-step", type=int, help="also table 2 with this checkpoint's groups")
    ap.add_argument("--layers", action="store_true", help="also table 3: the accuracy of every layer (probe --layer)")
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args()


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    steps = dict(step_dirs(args.run))
    if not steps:
        raise SystemExit(f"error: {args.run} has no checkpoints")
    if args.swap_step is not None and args.swap_step not in steps:
        raise SystemExit(f"error: no checkpoint at step {args.swap_step} (have {sorted(steps)})")
    last = load_encoder(str(steps[max(steps)]))
    init_sd = {k: v.clone() for k, v in load_encoder(args.init).encoder.state_dict().items()}
    if init_sd.keys() != last.encoder.state_dict().keys():
        raise SystemExit(f"error: {args.init} and {args.run} are different networks")
    sr = last.preset.data.sample_rate
    xtr, ltr, skip_tr = read_split(args.labels, "train", args.train, sr)
    xte, lte, skip_te = read_split(args.labels, "test", args.test, sr)
    n = min(len(x) for x in xtr + xte)
    xtr, xte = torch.stack([x[:n] for x in xtr]), torch.stack([x[:n] for x in xte])
    classes = sorted(set(ltr) | set(lte))
    ytr, yte = torch.tensor([classes.index(v) for v in ltr]), torch.tensor([classes.index(v) for v in lte])
    groups = sorted({group_of(k) for k, v in init_sd.items() if v.is_floating_point()})
    params = {name for name, _ in last.encoder.named_parameters()}
    last.eval()
    layers: list[int | str] = []
    if args.layers:
        depth = len(last.layer_widths())
        if depth < 1:
            raise SystemExit(f"error: --layers: {type(last.encoder).__name__} gives no per-layer outputs")
        layers = [*range(depth), "all"]

    def scores(sd: dict) -> tuple[float, float]:
        last.encoder.load_state_dict(sd)
        ftr = embed(last, xtr)
        return ridge_accuracy(ftr, ytr, embed(last, xte), yte, len(classes), args.ridge), pc1_share(ftr)

    def score(sd: dict) -> float:
        return scores(sd)[0]

    def layer_scores(sd: dict) -> list[float]:
        accs = []
        for layer in layers:
            last.set_layer(layer)
            try:
                accs.append(score(sd))
            finally:
                last.set_layer(None)
        return accs

    def change(sd: dict, g: str) -> float:
        keys = [k for k in sd if group_of(k) == g and k in params]  # weights, not BatchNorm statistics
        num = sum(float((sd[k] - init_sd[k]).pow(2).sum()) for k in keys)
        den = sum(float(init_sd[k].pow(2).sum()) for k in keys)
        return (num / den) ** 0.5 if den > 0 else float("nan")

    print(f"{args.labels.parent.name}: {len(ytr)} train / {len(yte)} test clips of {n / sr:.2f} s, "
          f"{len(classes)} classes, ridge {args.ridge}; skipped {skip_tr + skip_te} empty or undecodable\n")
    try:
        first, share = scores(init_sd)
    except ValueError as e:  # the shortest clip is below what the encoder can take
        raise SystemExit(f"error: clips cut to the shortest one ({n / sr:.3f} s): {e}") from None
    print("| step | accuracy | PC1 share | " + " | ".join(groups) + " |")
    print("|---|---|---|" + "---|" * len(groups))
    print(f"| init | {first:.3f} | {share:.3f} | " + " | ".join("0" for _ in groups) + " |", flush=True)
    layer_rows = [("init", layer_scores(init_sd))] if layers else []  # table 3, printed last
    for s in sorted(steps):
        sd = load_encoder(str(steps[s])).encoder.state_dict()
        acc, share = scores(sd)
        if layers:
            layer_rows.append((str(s), layer_scores(sd)))  # while this checkpoint is loaded
        print(f"| {s} | {acc:.3f} | {share:.3f} | " + " | ".join(f"{change(sd, g):.3f}" for g in groups) + " |",
              flush=True)
    if args.swap_step is not None:
        swap = load_encoder(str(steps[args.swap_step])).encoder.state_dict()
        print(f"\n| initial network with step {args.swap_step}'s | accuracy |\n|---|---|")
        for g in groups + ["(all)"]:
            sd = {k: (swap[k] if g in ("(all)", group_of(k)) else init_sd[k]) for k in init_sd}
            print(f"| {g} | {score(sd):.3f} |", flush=True)
    if layers:
        print("\n| step | " + " | ".join(f"layer {v}" for v in layers) + " |\n|---|" + "---|" * len(layers))
        for name, accs in layer_rows:
            print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) + " |", flush=True)


if __name__ == "__main__":
    main()
