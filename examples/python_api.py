"""sslaudio.load: embed waveforms in memory (any rate, any channels), every layer, and the HEAR API.

    python examples/python_api.py [CKPT]      # default random:tiny/byol-a; a run folder works too
"""

import sys

import numpy as np
import torch

import sslaudio
from sslaudio import hear

ckpt = sys.argv[1] if len(sys.argv) > 1 else "random:tiny/byol-a"
model = sslaudio.load(ckpt, device="cpu")
rng = np.random.default_rng(0)

# one stereo clip at 44.1 kHz: downmixed and resampled to the encoder's rate
stereo = (0.1 * rng.standard_normal((2, 3 * 44100))).astype(np.float32)
e = model.embed(stereo, 44100)
print(f"clip {tuple(e.clip.shape)}  frames {tuple(e.frames.shape)}  first timestamps {e.timestamps[:3].tolist()} s")

# a batch of clips of different lengths (a list); a (B, C, S) array works too
batch = model.embed([rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 24000, 40000)], 16000)
print("batch frame counts", [b.frames.shape[0] for b in batch])

# every block's output, as s3prl-style toolkits take it (a weighted sum of layers, or one of them)
out = model.layers(stereo, 44100)
print(f"{len(out.layers)} layer(s) of {[tuple(h.shape) for h in out.layers]} at {out.frame_rate:g} frames/s")

# bad input is one line
try:
    model.embed(stereo.T, 44100)  # (samples, channels), as soundfile.read returns it
except ValueError as err:
    print("error:", err)

# the HEAR 2021 common API on the same checkpoint
m = hear.load_model(ckpt)
audio = torch.rand(2, 2 * m.sample_rate) * 2 - 1
emb, ts = hear.get_timestamp_embeddings(audio, m)
print(f"HEAR: scene {tuple(hear.get_scene_embeddings(audio, m).shape)}  timestamp {tuple(emb.shape)}, "
      f"every {float(ts[0, 1] - ts[0, 0]):g} ms")
