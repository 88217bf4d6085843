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

Seeds table (`--seeds`, `--all-tiny` or `--results` turn it on): every preset given (`--all-tiny`:
every preset under presets/tiny/, plus tiny/hubert+iter2) with the same budget, once per seed
(`--set seed=S`), each probed with its seed next to `random:` of the same preset and seed, and one
Markdown table of the five tasks (mean ± half the range over the seeds, SSL / random) with the
devbench hand-crafted baseline as the last row, then each seed's SSL minus its own random init
(paired, in points):

    python benchmarks/devbench.py /work/devbench-full --all-tiny --seeds 0 1 --minutes 4 \\
        --runs runs/devbench-table --results benchmarks/RESULTS.md
    python benchmarks/devbench.py /work/devbench-small --presets tiny/byol-a tiny/apc --seeds 0 1 --steps 5 \\
        --runs /tmp/dt --results /tmp/RESULTS_test.md

Everything is cached under RUNS/<pool size>-<budget>[-t<threads>][-set<hash of --set>]/: steps.json
(the steps a `--minutes` budget gave each preset, measured once, then reused for every seed and
every later invocation), <preset>_s<seed>/ (the run; an interrupted one resumes from its last
checkpoint) and <preset>_s<seed>.json (the training summary and every probe result, written as
each one finishes). Run the same command again to continue an interrupted table: finished runs
and probes are skipped. `--no-train` only renders (and probes finished runs). A random-init probe
is also kept in RUNS/random_probes.json under the sha256 of the random encoder's weights and its
frontend / encoder configuration (with the probe set, layer, task and seed): presets whose random
init is the same network (the two-view presets on one CNN, one preset at several budgets) probe it
once.

Presets that read other runs are chained from the same seed's runs: tiny/atst-c2f distils that
seed's tiny/atst-clip and tiny/atst-frame (method.clip_teacher / method.frame_teacher), and
tiny/hubert+iter2 is tiny/hubert with that seed's tiny/hubert run as its k-means targets
(`--targets RUN`, HuBERT iteration 2); the runs they need are added to the list. Any other preset
whose method reads a run (Method.sources, or a `random:` placeholder) is skipped with a note.
`--results FILE` replaces the section between `<!-- devbench-table:start -->` and
`<!-- devbench-table:end -->` in FILE (appending it when the markers are absent), atomically; the
table is also printed and written to the cache folder as table.md. The baseline row comes from
`--baseline` (default PROBES/baseline_results.json, made by ../shared/devbench/baseline_devbench.py).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

from sslaudio.atomic import atomic_write
from sslaudio.build import load_preset
from sslaudio.config import list_presets, load_preset_dict
from sslaudio.encoders.base import POOLS
from sslaudio.evaluation import probe_checkpoint
from sslaudio.finetune import FinetuneConfig
from sslaudio.train import fit, resolve_sources

TASKS = ("words", "instrument_family", "speaker_id", "pitch_class", "sound_events")
SED_KEYS = ("f1", "segment_f1", "event_f1")

# the seeds table ---------------------------------------------------------------------------------
MARK_START, MARK_END = "<!-- devbench-table:start -->", "<!-- devbench-table:end -->"
BASELINE_CMD = "/work/.venv-devbench/bin/python /work/shared/devbench/baseline_devbench.py {}"
# families of the methods (method.name), for the table's family column
FAMILIES = {
    "two-view": ("byol-a", "byol", "simclr", "simsiam", "moco-v2", "moco-v3", "barlow-twins", "vicreg", "dino",
                 "atst-clip", "atst-frame", "atst-c2f"),
    "masked prediction": ("m2d", "data2vec", "data2vec2", "hubert", "wav2vec2", "mockingjay", "tera"),
    "predictive coding": ("apc", "cpc", "npc"),
    "clustering": ("deepcluster", "swav"),
}
# presets that read other runs: name -> (preset file, {override key: preset whose run of the same seed
# it names}); the runs needed are trained first, with the same budget
CHAINED = {
    "tiny/atst-c2f": ("tiny/atst-c2f", {"method.clip_teacher": "tiny/atst-clip",
                                        "method.frame_teacher": "tiny/atst-frame"}),
    "tiny/hubert+iter2": ("tiny/hubert", {"method.targets": "tiny/hubert"}),
}
# what a table cell shows: the linear probe's test accuracy, sound_events' frame micro-F1 at 100 ms
MAIN_METRIC = {t: "f1" if t == "sound_events" else "accuracy" for t in TASKS}
KEEP_METRICS = ("accuracy", "knn_accuracy", "f1", "map", "segment_f1", "event_f1", "layer_weights")


def _layer(value: str) -> int | str:
    """--layer: a block index (0-based, negative from the end), 'all' or 'weighted' (as probe --layer)."""
    if value.strip().lower() in ("all", "weighted"):
        return value.strip().lower()
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a block index, 'all' or 'weighted', not '{value}'") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("devbench", type=Path)
    ap.add_argument("--presets", nargs="+", default=None)
    ap.add_argument("--probe-on", type=Path, default=None,
                    help="another devbench folder for the probes (e.g. pretrain on full, probe small)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    ap.add_argument("--minutes", type=float, default=None, help="CPU budget per preset instead of --steps")
    ap.add_argument("--runs", type=Path, default=Path("runs/devbench"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--layer", type=_layer, default=None,
                    help="probe this layer (as probe --layer counts them), 'all' side by side or 'weighted' (SUPERB's "
                         "learned weighted sum) (default: the output)")
    ap.add_argument("--pool", choices=list(POOLS), default=None,
                    help="clip tasks: pool the clip embeddings so (probe --pool; default: the encoder's own)")
    ap.add_argument("--no-train", action="store_true", help="probe the existing runs in RUNS only")
    ap.add_argument("--finetune", action="store_true", help="also fine-tune on sound_events (frozen vs fine-tuned)")
    ap.add_argument("--ft-epochs", type=int, default=None)
    ap.add_argument("--ft-lr", type=float, default=None)
    ap.add_argument("--ft-encoder-lr-ratio", type=float, default=None)
    ap.add_argument("--ft-patience", type=int, default=None)
    ap.add_argument("--ft-batch-size", type=int, default=None)
    ap.add_argument("--rnn-head", action="store_true", help="fine-tune with the BiGRU head")
    tab = ap.add_argument_group("seeds table (any of these turns it on)")
    tab.add_argument("--seeds", nargs="+", type=int, default=None,
                     help="one run per seed and preset (--set seed=S); default 0 1")
    tab.add_argument("--all-tiny", action="store_true",
                     help="every preset under presets/tiny/ (plus tiny/hubert+iter2); --presets restricts")
    tab.add_argument("--results", type=Path, default=None,
                     help="write the table into this Markdown file (e.g. benchmarks/RESULTS.md), replacing "
                          "its devbench-table section")
    tab.add_argument("--baseline", type=Path, default=None,
                     help="devbench baseline results (default PROBES/baseline_results.json)")
    a = ap.parse_args()
    if a.seeds is not None or a.all_tiny or a.results is not None:
        if a.finetune:
            ap.error("--finetune is not part of the seeds table")
        if not a.presets and not a.all_tiny:
            ap.error("the seeds table needs --presets or --all-tiny")
        torch.set_num_threads(a.threads)
        try:
            table_mode(a)
        except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM (fit saves its last finished step first)
            print(f"\n{e or 'interrupted'}; finished runs and probes are cached: run the same command to continue",
                  file=sys.stderr)
            sys.exit(130)
        return
    if not a.presets:
        ap.error("--presets is required (or --all-tiny for the seeds table)")
    ft_given = {k: getattr(a, f"ft_{k}") for k in ("epochs", "lr", "encoder_lr_ratio", "patience", "batch_size")}
    ft_cfg = FinetuneConfig(rnn_head=a.rnn_head, **{k: v for k, v in ft_given.items() if v is not None}) \
        if a.finetune else None
    torch.set_num_threads(a.threads)
    pool = a.devbench / "pretrain_pool" / "audio"
    results = {}
    for name in a.presets:
        overrides = list(a.overrides)
        if a.minutes:
            overrides.append(f"train.steps={minutes_to_steps(name, a, overrides)[0]}")
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
                                     finetune_cfg=ft_cfg if sed else None, pool=None if sed else a.pool)
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
    name = ("devbench_results" + ("" if a.layer is None else f"_layer{a.layer}")
            + ("" if a.pool is None else f"_pool-{a.pool}") + ".json")
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


def train_device(a) -> str:
    if a.device != "auto":
        return a.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def minutes_to_steps(name: str, a, overrides: list[str]) -> tuple[int, float]:
    """train.steps for a budget of a.minutes: 80% of the step rate of a short timing (the rest is data)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from throughput import measure

    sps = measure(name, train_device(a), 10, 3, overrides)["steps_per_s"]
    return max(10, int(sps * 0.8 * a.minutes * 60)), sps


# the seeds table ---------------------------------------------------------------------------------

def random_network_hash(spec: str) -> str:
    """What a random-init probe depends on besides the probe set, layer, task and seed: the random
    network's weights and buffers and the frontend and encoder configuration (forward options that
    are not weights)."""
    from sslaudio.inference import load_encoder

    bundle = load_encoder(spec)
    h = hashlib.sha256()
    for name, t in sorted(bundle.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    p = bundle.preset
    h.update(json.dumps([p.frontend, p.encoder, p.data.sample_rate], sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def write_json(path: Path, data) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n"), mode=0o666)


def manifest(folder: Path) -> dict:
    return read_json(folder / "MANIFEST.json", {}) or {}


def devbench_size(folder: Path) -> str:
    m = manifest(folder)
    return f"{m['size']} ({m.get('gen_version', '?')})" if "size" in m else f"{folder.name} (no MANIFEST.json)"


def test_sizes(folder: Path, tasks) -> dict[str, int]:
    """Test files per task (sound_events: clips, from files.csv)."""
    out = {}
    for t in tasks:
        with open(folder / t / ("files.csv" if t == "sound_events" else "labels.csv"), newline="") as f:
            out[t] = sum(r.get("split") == "test" for r in csv.DictReader(f))
    return out


def family(name: str) -> str:
    method = load_preset_dict(CHAINED.get(name, (name,))[0]).get("method", {}).get("name", "")
    return next((f for f, methods in FAMILIES.items() if method in methods), "other")


def needs_runs(name: str) -> str | None:
    """Why a preset (not chained here) cannot run on its own: the runs its method reads, else None."""
    from sslaudio.build import load_components
    from sslaudio.config import component_config
    from sslaudio.registry import METHODS

    method = load_preset_dict(name).get("method", {})
    load_components()
    cls, cfg = component_config(METHODS, method, "method")
    keys = sorted(set(cls.sources(cfg)) | {k for k, v in method.items()
                                          if isinstance(v, str) and v.startswith("random:")})
    return f"reads other runs (method.{', method.'.join(keys)}) and is not chained here" if keys else None


def table_presets(a) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(presets in training order, dependencies first; skipped -> reason; added -> why)."""
    if a.presets:
        names = list(a.presets)
    else:
        names = [n for n in list_presets() if n.startswith("tiny/")]
        if "tiny/hubert" in names:
            names.insert(names.index("tiny/hubert") + 1, "tiny/hubert+iter2")
    order, skipped, added = [], {}, {}

    def add(name: str, needed_by: str | None = None) -> bool:
        if name in order:
            return True
        if name in skipped:
            return False
        if name in CHAINED:
            for dep in CHAINED[name][1].values():
                if not add(dep, name):
                    skipped[name] = f"needs {dep}, which is skipped"
                    return False
        else:
            why = needs_runs(name)
            if why:
                skipped[name] = why
                return False
        if needed_by and name not in names:
            added[name] = f"added: {needed_by} reads its runs"
        order.append(name)
        return True

    for n in names:
        add(n)
    return order, skipped, added


def budget_tag(a) -> str:
    size = manifest(a.devbench).get("size", a.devbench.name)
    if a.minutes:
        tag = f"{size}-{a.minutes:g}min-t{a.threads}"
    elif a.steps:
        tag = f"{size}-{a.steps}steps"
    else:
        tag = f"{size}-preset-steps"
    if a.overrides:
        tag += "-set" + hashlib.sha1("\n".join(a.overrides).encode()).hexdigest()[:8]
    return tag


def budget_text(a) -> str:
    if a.minutes:
        return (f"{a.minutes:g} CPU-minutes per preset and seed (train.steps = 80% of the step rate of a 10-step "
                f"timing on {a.threads} thread(s), measured once per preset)")
    if a.steps:
        return f"{a.steps} steps per preset and seed"
    return "each preset's own train.steps"


def table_mode(a) -> None:
    seeds = a.seeds if a.seeds is not None else [0, 1]
    probes = a.probe_on or a.devbench
    pool = a.devbench / "pretrain_pool" / "audio"
    cache = a.runs / budget_tag(a)
    cache.mkdir(parents=True, exist_ok=True)
    # records keep the context they were probed in (older ones have no pool; a chosen layer is counted
    # as hidden states since sslaudio 0.2: a transformer's 0 is its blocks' input)
    layer = "None" if a.layer is None else f"{a.layer}|hidden-states"
    ctx = f"{probes.resolve()}|layer={layer}" + (f"|pool={a.pool}" if a.pool else "")
    order, skipped, added = table_presets(a)
    tasks = [t for t in TASKS if (probes / t / "labels.csv").is_file()]
    print(f"seeds table: {len(order)} preset(s) x seeds {' '.join(map(str, seeds))}, {budget_text(a)}; "
          f"cache {cache}", flush=True)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}", flush=True)
    steps_file = cache / "steps.json"
    random_file = a.runs / "random_probes.json"
    failed: dict[str, str] = {}

    def run_dir(name: str, seed: int) -> Path:
        return cache / f"{name.replace('/', '_')}_s{seed}"

    def done(name: str, seed: int) -> bool:
        return "train" in (read_json(run_dir(name, seed).with_suffix(".json"), {}) or {})

    for name in order:
        base, chain = CHAINED.get(name, (name, {}))
        for seed in seeds:
            run, rec_path = run_dir(name, seed), run_dir(name, seed).with_suffix(".json")
            rec = read_json(rec_path, {}) or {}
            try:
                missing = [dep for dep in chain.values() if not done(dep, seed)]
                if missing:
                    raise RuntimeError(f"seed {seed}: the run of {', '.join(missing)} is not finished")
                overrides = list(a.overrides) + [f"{k}={json.dumps(str(run_dir(dep, seed).resolve()))}"
                                                 for k, dep in chain.items()]
                steps_of = read_json(steps_file, {}) or {}
                if a.minutes and name not in steps_of and not a.no_train:
                    t0 = time.time()
                    steps, sps = minutes_to_steps(base, a, overrides)
                    steps_of = read_json(steps_file, {}) or {}
                    steps_of[name] = {"steps": steps, "steps_per_s": round(sps, 3), "threads": a.threads,
                                      "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                          timespec="seconds"), "timing_s": round(time.time() - t0, 1)}
                    write_json(steps_file, steps_of)
                    print(f"{name}: {sps:.2f} steps/s -> {steps} steps", flush=True)
                steps = steps_of.get(name, {}).get("steps") if a.minutes else a.steps
                if steps:
                    overrides.append(f"train.steps={steps}")
                overrides.append(f"seed={seed}")
                preset = load_preset(base, overrides)
                # the preset (or --set) changed since this run was trained: its probes are of another model.
                # The run's config.yaml also records the presets of the checkpoints it read (HuBERT's
                # iteration 2, ATST-C2F's teachers): compare with those filled in the same way
                trained = run / "config.yaml"
                if "train" in rec and trained.is_file() and load_preset(str(trained)).identity() \
                        != resolve_sources(preset, resume_from=run).identity():
                    raise StaleRun(f"{run.name} in {cache} was trained with another configuration of {base}; "
                                   f"delete it and {rec_path.name} to train it again")
                if "train" not in rec:
                    if a.no_train:
                        continue
                    print(f"{name} seed {seed}: training {preset.train.steps} steps into {run}", flush=True)
                    t0 = time.time()
                    fit(preset, [str(pool)], run, resume=True, device=a.device)
                    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
                    rec = {"preset": name, "base": base, "seed": seed, "overrides": overrides, "probes": {},
                           "train": {"steps": log[-1]["step"], "train_s": round(time.time() - t0, 1),
                                     "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"]}}
                    write_json(rec_path, rec)
                got = rec.setdefault("probes", {}).setdefault(ctx, {})
                network = None  # the random network's hash, worked out once per run when needed
                for task in tasks:
                    for kind, ckpt in (("ssl", str(run)), ("random", f"random:{run / 'config.yaml'}")):
                        key = f"{task}_{kind}"
                        if key in got:
                            continue
                        shared_key = None
                        if kind == "random":
                            network = network or random_network_hash(ckpt)
                            shared_key = f"{network}|{ctx}|{task}|seed={seed}"
                        shared = (read_json(random_file, {}) or {}).get(shared_key) if shared_key else None
                        if shared is not None:  # the same random network, probed for another preset or budget
                            got[key] = shared | {"reused": True}
                            write_json(rec_path, rec)
                            print(f"{name} seed {seed}: {key} {got[key][MAIN_METRIC[task]]:.3f} (the same random "
                                  f"network was probed before)", flush=True)
                            continue
                        t0 = time.time()
                        r = probe_checkpoint(ckpt, probes / task / "labels.csv", device=a.device, seed=seed,
                                             layer=a.layer, pool=None if task == "sound_events" else a.pool)
                        got[key] = {k: r[k] for k in KEEP_METRICS if k in r} | {"probe_s": round(time.time() - t0, 1)}
                        write_json(rec_path, rec)
                        if shared_key:
                            known = read_json(random_file, {}) or {}
                            known[shared_key] = got[key]
                            write_json(random_file, known)
                        print(f"{name} seed {seed}: {key} {got[key][MAIN_METRIC[task]]:.3f}", flush=True)
            # one broken run must not end a long table (Ctrl-C still does: fit's Interrupted is a
            # KeyboardInterrupt; the same command resumes)
            except Exception as e:  # noqa: BLE001
                if not isinstance(e, StaleRun):
                    traceback.print_exc()
                failed[f"{name} seed {seed}"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                print(f"{name} seed {seed}: failed ({failed[f'{name} seed {seed}']}); run again to retry",
                      flush=True)
    text = render_table(a, seeds, order, skipped, added, failed, tasks, cache, ctx, probes)
    print("\n" + text)
    atomic_write(cache / "table.md", lambda tmp: Path(tmp).write_text(text), mode=0o666)
    if a.results is not None:
        write_section(a.results, text)
        print(f"wrote the devbench-table section of {a.results}")


class StaleRun(RuntimeError):
    """A cached run whose configuration is not the one asked for (the preset changed since)."""


def spread(values: list[float]) -> tuple[float, float] | None:
    return (sum(values) / len(values), (max(values) - min(values)) / 2) if values else None


def paired_table(records: dict[str, list[dict]], seeds, tasks, ctx) -> list[str]:
    """Each seed's SSL minus its own random init (the weights it started from), in points, task by
    task: the differences the mean ± half-range cells average over, and how many are above zero.
    records: each preset's per-seed records, in the order of `seeds`."""
    rows = []
    for name, recs in records.items():
        cells, above, total = [], 0, 0
        for r in recs:
            rec = r.get("probes", {}).get(ctx, {})
            diffs = []
            for t in tasks:
                if {f"{t}_ssl", f"{t}_random"} <= set(rec):
                    d = 100 * (rec[f"{t}_ssl"][MAIN_METRIC[t]] - rec[f"{t}_random"][MAIN_METRIC[t]])
                    diffs.append(f"{d:+.1f}")
                    above, total = above + (d > 0), total + 1
                else:
                    diffs.append("–")
            cells.append(" ".join(diffs))
        if total:
            rows.append(f"| {name} | " + " | ".join(cells) + f" | {above}/{total} |")
    if not rows:
        return []
    head = ["preset"] + [f"seed {s}" for s in seeds] + ["cells above"]
    return ["", f"Paired: SSL minus its own random init of the same seed, in points ({', '.join(tasks)}):", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + rows + [""]


def margin_table(margins: dict[str, dict[str, float]], tasks) -> list[str]:
    """How far each task is past the bar (SSL mean minus random mean minus the two half-ranges), in
    points: a bold cell by 0.1 point is a pass that one more seed can undo."""
    rows = [f"| {name} | " + " | ".join(f"{m[t]:+.1f}" if t in m else "–" for t in tasks) + " |"
            for name, m in margins.items() if m]
    if not rows:
        return []
    return ["Past the bar, in points (SSL mean - random mean - both half-ranges; > 0: the bold cells; "
            "< 0: inside the spread, or below):", "",
            "| preset | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)] + rows + [""]


def render_table(a, seeds, order, skipped, added, failed, tasks, cache, ctx, probes) -> str:
    steps_of = read_json(cache / "steps.json", {}) or {}
    base_path = a.baseline or probes / "baseline_results.json"
    baseline = read_json(base_path)
    cmd = "python " + shlex.join([os.path.relpath(sys.argv[0]) if Path(sys.argv[0]).exists() else sys.argv[0]]
                                 + sys.argv[1:])
    now = datetime.datetime.now(datetime.timezone.utc)
    pool_files = manifest(a.devbench).get("tasks", {}).get("pretrain_pool", {}).get("n_files", "?")
    title = "every tiny preset" if a.all_tiny and not a.presets else "tiny presets"
    lines = [MARK_START, f"## devbench seeds table: {title}, seeds {', '.join(map(str, seeds))} ({now:%Y-%m-%d})", "",
             "```sh", cmd, "```", ""]
    lines.append(f"- date: {now:%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()} CPU cores ({platform.machine()}), "
                 f"torch {torch.__version__} with {a.threads} thread(s), device {train_device(a)}")
    lines.append(f"- budget: {budget_text(a)}" + (f"; --set {' --set '.join(a.overrides)}" if a.overrides else ""))
    lines.append(f"- pretraining: {a.devbench}/pretrain_pool, devbench {devbench_size(a.devbench)}, {pool_files} "
                 f"clips; probes: {probes}, devbench {devbench_size(probes)}, test sets of "
                 + ", ".join(f"{n} {'clips' if t == 'sound_events' else 'files'} ({t})"
                             for t, n in test_sizes(probes, tasks).items())
                 + ("" if a.layer is None else "; every layer side by side, a transformer's blocks' input included "
                    "(--layer all)" if a.layer == "all" else "; a learned weighted sum of every layer, a transformer's "
                    "blocks' input included (--layer weighted, SUPERB's protocol)" if a.layer == "weighted"
                    else f"; encoder layer {a.layer} (--layer, as extract counts)")
                 + ("" if a.pool is None else f"; clip embeddings pooled by {a.pool} (--pool)"))
    lines.append("- cells: linear-probe test accuracy (sound_events: frame micro-F1 at 100 ms), SSL / random init "
                 "of the same preset and seed, mean ± half the range over the seeds; **bold**: SSL above random by "
                 "more than the two half-ranges together; ↑: SSL mean above the hand-crafted baseline. \"beats "
                 "random\": the tasks in bold (below on: random above SSL by more than the two half-ranges). "
                 "\"every seed\": the tasks where SSL is above its own random init (the weights it started "
                 "from) in every seed, a paired view of the same runs.")
    lines.append("")
    head = ["preset", "family", "steps"] + list(tasks) + ["beats random", "every seed", "above baseline"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base_val = {}
    for t in tasks:
        r = (baseline or {}).get(t, {})
        v = r.get("test_micro_f1" if t == "sound_events" else "test_acc")
        if v is not None:
            base_val[t] = v
    records, margins = {}, {}
    for name in order:
        recs = records[name] = [read_json(cache / f"{name.replace('/', '_')}_s{s}.json", {}) or {} for s in seeds]
        steps = sorted({r["train"]["steps"] for r in recs if "train" in r})
        planned = steps_of.get(name, {}).get("steps")
        cells, wins, losses, above, n, paired = [], 0, [], [], 0, 0
        margins[name] = {}
        for t in tasks:
            pairs = [(r["probes"][ctx][f"{t}_ssl"][MAIN_METRIC[t]], r["probes"][ctx][f"{t}_random"][MAIN_METRIC[t]])
                     for r in recs if {f"{t}_ssl", f"{t}_random"} <= set(r.get("probes", {}).get(ctx, {}))]
            paired += bool(pairs) and all(a > b for a, b in pairs)
            vals = {k: [r["probes"][ctx][f"{t}_{k}"][MAIN_METRIC[t]] for r in recs
                        if f"{t}_{k}" in r.get("probes", {}).get(ctx, {})] for k in ("ssl", "random")}
            ssl, rnd = spread(vals["ssl"]), spread(vals["random"])
            if ssl is None or rnd is None:
                cells.append("–")
                continue
            n += 1
            s = f"{ssl[0]:.3f} ± {ssl[1]:.3f}"
            margin = ssl[1] + rnd[1]
            margins[name][t] = 100 * (ssl[0] - rnd[0] - margin)
            if ssl[0] - rnd[0] > margin:
                s, wins = f"**{s}**", wins + 1
            elif rnd[0] - ssl[0] > margin:
                losses.append(t)
            if t in base_val and ssl[0] > base_val[t]:
                s += " ↑"
                above.append(t)
            cells.append(f"{s} / {rnd[0]:.3f} ± {rnd[1]:.3f}")
        done_seeds = sum("train" in r for r in recs)
        label = name + ("" if done_seeds == len(seeds) else f" ({done_seeds}/{len(seeds)} seeds)")
        if name in added:
            label += f" ({added[name]})"
        steps_cell = ", ".join(map(str, steps)) or (f"{planned} (planned)" if planned else "–")
        verdict = f"{wins}/{n}" + (f" (below on {', '.join(losses)})" if losses else "") if n else "–"
        lines.append(f"| {label} | {family(name)} | {steps_cell} | " + " | ".join(cells)
                     + f" | {verdict} | {f'{paired}/{n}' if n else '–'} | {f'{len(above)}/{len(base_val)}' if base_val else '–'} |")
    if baseline is not None:
        lines.append("| hand-crafted baseline (log-mel + MFCC statistics, logistic regression) | – | – | "
                     + " | ".join(f"{base_val[t]:.3f}" if t in base_val else "–" for t in tasks) + " | – | – | – |")
    lines.append("")
    if baseline is None:
        lines.append(f"No baseline row: {base_path} is missing; make it with "
                     f"`{BASELINE_CMD.format(probes)}`.")
        print(f"note: {base_path} is missing; make it with {BASELINE_CMD.format(probes)}", file=sys.stderr)
    else:
        lines.append(f"Baseline: ../shared/devbench/baseline_devbench.py on the same probe sets ({base_path}).")
    lines += paired_table(records, seeds, tasks, ctx)
    lines += margin_table(margins, tasks)
    for name, why in skipped.items():
        lines.append(f"Skipped {name}: {why}.")
    chained = [n for n in order if n in CHAINED]
    for name in chained:
        deps = ", ".join(f"{k}={dep}" for k, dep in CHAINED[name][1].items())
        lines.append(f"{name}: {CHAINED[name][0]} with {deps} (the run of the same seed).")
    for what, why in failed.items():
        lines.append(f"Failed (run the command again to retry): {what}: {why}.")
    lines.append(MARK_END)
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace the devbench-table section of `path` (append it when the markers are absent), atomically."""
    old = path.read_text() if path.is_file() else ""
    i, j = old.find(MARK_START), old.find(MARK_END)
    if i >= 0 and j > i:
        new = old[:i] + section.rstrip("\n") + old[j + len(MARK_END):]
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + ("\n" if old else "") + section
    atomic_write(path, lambda tmp: Path(tmp).write_text(new), mode=0o666)


if __name__ == "__main__":
    main()
