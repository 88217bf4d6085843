#!/usr/bin/env python
"""How well HuBERT's k-means targets follow devbench's word labels, per iteration.

    python benchmarks/hubert_purity.py /work/devbench-small runs/hubert-it1 runs/hubert-it2

For each HuBERT run: its method (codebook, label model) from the newest checkpoint, the cluster id
of every frame of devbench `words` clips (train and test splits, voiced frames only: frames whose
energy is within 30 dB of the clip's loudest), and the HuBERT paper's purity measures against the
clip's word: phone purity E_z[max_y p(y|z)] (here word purity), cluster purity E_y[max_z p(z|y)],
and the number of clusters the frames use. Word labels are a coarse stand-in for the paper's phone
alignments: every voiced frame of a clip carries its word. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

from sslaudio import kmeans
from sslaudio.audio import load as load_audio
from sslaudio.build import build_method, preset_from_dict
from sslaudio.checkpoint import latest, load_step


def load_method(run: Path):
    step = latest(run)
    if step is None:
        raise SystemExit(f"{run}: no checkpoint")
    model, _, _, state = load_step(step)
    preset = preset_from_dict(state["config"])
    torch.manual_seed(0)
    method = build_method(preset)
    method.load_state_dict(model)
    return method.eval(), preset, state


def voiced(audio: torch.Tensor, times: torch.Tensor, sr: int) -> torch.Tensor:
    """(S,) clip, frame centre times -> (T,) bool: frames within 30 dB of the loudest."""
    win = int(0.025 * sr)
    idx = (times * sr).long().clamp(0, audio.numel() - 1)
    padded = torch.nn.functional.pad(audio, (win, win))
    frames = torch.stack([padded[i:i + 2 * win] for i in idx.tolist()])
    db = 10 * torch.log10(frames.pow(2).mean(1) + 1e-10)
    return db > db.max() - 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("devbench", type=Path)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--max-clips", type=int, default=400)
    a = ap.parse_args()
    torch.set_num_threads(2)
    rows = list(csv.DictReader(open(a.devbench / "words" / "labels.csv")))[: a.max_clips]
    words = sorted({r["label"] for r in rows})
    table = []
    for run in a.runs:
        method, preset, state = load_method(run)
        sr = preset.data.sample_rate
        ids, cls = [], []
        with torch.no_grad():
            for r in rows:
                audio = load_audio(a.devbench / "words" / r["path"], sr).float().reshape(-1)
                x = method.features(audio[None])
                out = method.encoder(x)
                n = out.tokens.shape[1]
                labels = method.frame_labels(audio[None], n)[0]
                keep = voiced(audio, method.encoder.frame_times(n).float(), sr)
                ids.append(labels[keep])
                cls.append(torch.full((int(keep.sum()),), words.index(r["label"])))
        ids, cls = torch.cat(ids), torch.cat(cls)
        info = state.get("method", {})
        table.append({"run": str(run), "targets": info.get("targets"), "layer": info.get("layer", "-"),
                      "k": method.k, "frames": int(ids.numel()), "used": int(ids.unique().numel()),
                      "word_purity": kmeans.purity(ids, cls), "cluster_purity": kmeans.purity(cls, ids),
                      "chance_word_purity": float(torch.bincount(cls).max()) / cls.numel()})
    print("| run | targets | layer | k | voiced frames | clusters used | word purity E_z max_y p(y|z) "
          "| cluster purity E_y max_z p(z|y) | majority-word rate |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['run']} | {t['targets']} | {t['layer']} | {t['k']} | {t['frames']} | {t['used']} | "
              f"{t['word_purity']:.3f} | {t['cluster_purity']:.3f} | {t['chance_word_purity']:.3f} |")
    print(json.dumps(table))


if __name__ == "__main__":
    main()
