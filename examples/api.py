"""Python API: pretrain a tiny model, embed waveforms, and read extracted feature files.

    python examples/api.py [WORKDIR]
"""

import sys
from pathlib import Path

import torch
from safetensors.numpy import load_file

from sslaudio.build import load_preset
from sslaudio.inference import load_encoder
from sslaudio.data import scan_pairs
from sslaudio.features import extract
from sslaudio.synth import make_dataset
from sslaudio.train import fit

work = Path(sys.argv[1] if len(sys.argv) > 1 else "sslaudio-api-example")
make_dataset(work / "data", per_class=(10, 2, 4), unlabeled=40)

# 1. pretrain (any preset; --set style overrides as a list)
preset = load_preset("tiny/byol-a", ["train.steps=50", "train.log_every=10"])
fit(preset, [str(work / "data" / "unlabeled")], work / "run")

# 2. embed tensors directly: frontend + encoder in one module
bundle = load_encoder(str(work / "run"))
waves = torch.randn(4, bundle.sample_rate) * 0.1  # (B, S) at the preset's sample rate
with torch.no_grad():
    clip, frames, lengths = bundle.embed(waves)
print("clip", tuple(clip.shape), "frames", tuple(frames.shape), "frame seconds", bundle.encoder.downsample / bundle.sample_rate)

# 3. or write feature files and read them back
summary = extract(bundle, scan_pairs([str(work / "data" / "audio" / "test")]), work / "feats", frames=True,
                  fmt="safetensors", device=torch.device("cpu"), batch_size=16, encoder_id=str(work / "run"))
first = sorted((work / "feats").rglob("*.safetensors"))[0]
f = load_file(str(first))
print(summary["written"], "files;", first.name, {k: v.shape for k, v in f.items()})
