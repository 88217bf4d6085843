#!/usr/bin/env python
"""Representation quality on ../shared/devbench: pretrain on its unlabeled pool, probe its tasks.

    python benchmarks/devbench.py /work/devbench-small --presets tiny/byol-a tiny/m2d --steps 600
    python benchmarks/devbench.py /work/devbench-full --presets tiny/byol-a --minutes 10 --runs runs/devbench

For each preset: `sslaudio pretrain OUT/pretrain_pool/audio` into RUNS/<preset>, then the linear /
kNN probe of `words`, `instrument_family`, `speaker_id` and `pitch_class` (fit on train,
hyper-parameters picked on valid, reported on test; a task missing from the devbench folder is
skipped) and the frame-level linear probe of `sound_events` (frame micro-F1 at 100 ms, as
devbench's own baseline) for the pretrained encoder and for `random:<preset>`. A budget in minutes sets
train.steps from a short timing of the preset on this machine. Prints a Markdown table and writes
RUNS/devbench_results.json. Make the data with ../shared/devbench/make_devbench.py first.

`--finetune` also fine-tunes each encoder on `sound_events` (`sslaudio probe --finetune`, its
defaults or the --ft-* values given) and prints a second table: frozen against fine-tuned frame
micro-F1, segment-based F1 (1 s) and event-based F1 (200 ms collar), for SSL and random init.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from sslaudio.build import load_preset
from sslaudio.evaluation import probe_checkpoint
from sslaudio.finetune import FinetuneConfig
from sslaudio.train import fit

TASKS = ("words", "instrument_family", "speaker_id", "pitch_class", "sound_events")
SED_KEYS = ("f1", "segment_f1", "event_f1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("devbench", type=Path)
    ap.add_argument("--presets", nargs="+", required=True)
    ap.add_argument("--probe-on", type=Path, default=None,
                    help="another devbench folder for the probes (e.g. pretrain on full, probe small)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    ap.add_argument("--minutes", type=float, default=None, help="CPU budget per preset instead of --steps")
    ap.add_argument("--runs", type=Path, default=Path("runs/devbench"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--layer", type=int, default=None, help="probe this encoder block (default: the output)")
    ap.add_argument("--no-train", action="store_true", help="probe the existing runs in RUNS only")
    ap.add_argument("--finetune", action="store_true", help="also fine-tune on sound_events (frozen vs fine-tuned)")
    ap.add_argument("--ft-epochs", type=int, default=None)
    ap.add_argument("--ft-lr", type=float, default=None)
    ap.add_argument("--ft-encoder-lr-ratio", type=float, default=None)
    ap.add_argument("--ft-patience", type=int, default=None)
    ap.add_argument("--ft-batch-size", type=int, default=None)
    ap.add_argument("--rnn-head", action="store_true", help="fine-tune with the BiGRU head")
    a = ap.parse_args()
    ft_given = {k: getattr(a, f"ft_{k}") for k in ("epochs", "lr", "encoder_lr_ratio", "patience", "batch_size")}
    ft_cfg = FinetuneConfig(rnn_head=a.rnn_head, **{k: v for k, v in ft_given.items() if v is not None}) \
        if a.finetune else None
    torch.set_num_threads(a.threads)
    pool = a.devbench / "pretrain_pool" / "audio"
    results = {}
    for name in a.presets:
        overrides = list(a.overrides)
        if a.minutes:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from throughput import measure

            sps = measure(name, "cpu" if a.device == "auto" and not torch.cuda.is_available() else
                          ("cuda" if a.device == "auto" else a.device), 10, 3, overrides)["steps_per_s"]
            overrides.append(f"train.steps={max(10, int(sps * 0.8 * a.minutes * 60))}")
        elif a.steps:
            overrides.append(f"train.steps={a.steps}")
        preset = load_preset(name, overrides)
        run = a.runs / name.replace("/", "_")
        t0 = time.time()
        if not a.no_train:
            fit(preset, [str(pool)], run, resume=True, device=a.device)
        train_s = time.time() - t0
        log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        row = {"steps": log[-1]["step"], "train_s": round(train_s, 1), "first_loss": log[0]["loss"],
               "last_loss": log[-1]["loss"], "audio_h_per_s": sum(r["audio_h_per_s"] for r in log) / len(log)}
        for task in TASKS:
            labels = (a.probe_on or a.devbench) / task / "labels.csv"
            if not labels.is_file():  # devbench builds before dev-1.1 lack speaker_id, pitch_class
                continue
            # the run's resolved config, so --set overrides reach the random-init baseline too
            for kind, ckpt in (("ssl", str(run)), ("random", f"random:{run / 'config.yaml'}")):
                sed = task == "sound_events"
                r = probe_checkpoint(ckpt, labels, device=a.device, layer=a.layer,
                                     finetune_cfg=ft_cfg if sed else None)
                if sed:  # frame micro-F1 at 100 ms (files.csv beside the labels)
                    row[f"{task}_{kind}"], row[f"{task}_{kind}_map"] = r["f1"], r["map"]
                    for key in SED_KEYS:
                        row[f"{task}_{kind}_frozen_{key}"] = r[key]
                        if "finetune" in r:
                            row[f"{task}_{kind}_ft_{key}"] = r["finetune"][key]
                    if "finetune" in r:
                        row[f"{task}_{kind}_ft_epochs"] = r["finetune"]["epochs"]
                else:
                    row[f"{task}_{kind}"] = r["accuracy"]
                    row[f"{task}_{kind}_knn"] = r["knn_accuracy"]
        results[name] = row
        print(json.dumps({name: row}), flush=True)
    a.runs.mkdir(parents=True, exist_ok=True)
    name = "devbench_results.json" if a.layer is None else f"devbench_results_layer{a.layer}.json"
    (a.runs / name).write_text(json.dumps(results, indent=1))
    print(f"\ndevbench: pool {a.devbench}, probes {a.probe_on or a.devbench} (test accuracy of the linear probe, "
          f"kNN in brackets; sound_events: frame micro-F1, frame mAP in brackets)\n")
    tasks = [t for t in TASKS if any(f"{t}_ssl" in r for r in results.values())]
    print("| preset | steps | train s | loss first -> last | " + " | ".join(f"{t} SSL | {t} random" for t in tasks)
          + " |")
    print("|---" * (4 + 2 * len(tasks)) + "|")
    second = {t: "_map" if t == "sound_events" else "_knn" for t in tasks}
    for name, r in results.items():
        cells = [f"{r.get(f'{t}_{k}', float('nan')):.3f} ({r.get(f'{t}_{k}{second[t]}', float('nan')):.3f})"
                 for t in tasks for k in ("ssl", "random")]
        print(f"| {name} | {r['steps']} | {r['train_s']:.0f} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} | "
              + " | ".join(cells) + " |")
    print_finetune_table(results)


def print_finetune_table(results: dict) -> None:
    """Frozen vs fine-tuned sound_events: frame micro-F1, segment-based F1, event-based F1."""
    rows = [(name, kind, r) for name, r in results.items() for kind in ("ssl", "random")
            if f"sound_events_{kind}_ft_f1" in r]
    if not rows:
        return
    print("\nsound_events, frozen linear probe -> fine-tuned (epochs: the best valid epoch, 0 = the frozen head)\n")
    print("| preset | encoder | frame F1 | segment F1 (1 s) | event F1 (200 ms) | epochs |")
    print("|---|---|---|---|---|---|")
    for name, kind, r in rows:
        cells = [f"{r[f'sound_events_{kind}_frozen_{k}']:.3f} -> {r[f'sound_events_{kind}_ft_{k}']:.3f}"
                 for k in SED_KEYS]
        print(f"| {name} | {kind} | " + " | ".join(cells) + f" | {r[f'sound_events_{kind}_ft_epochs']} |")


if __name__ == "__main__":
    main()
