"""Run an encoder exported with `sslaudio export --format onnx` with numpy, soundfile and
onnxruntime only: no torch, no sslaudio.

    sslaudio export runs/byola --format onnx --out byola.onnx      # writes byola.onnx and byola.onnx.json
    pip install numpy soundfile onnxruntime                        # on the machine that runs it
    python onnx_without_torch.py byola.onnx song.wav               # prints a JSON summary
    python onnx_without_torch.py byola.onnx song.wav --save emb.npz  # and saves every output

The model card beside the model (`byola.onnx.json`) gives the sample rate the model expects and
the input and output names: `embedding` (1, D) the clip embedding, `frames` (1, T, D) the frame
embeddings, `frame_times` (T,) their centres in seconds, `layer_<i>` (1, T, D) with --layers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import soundfile as sf


def load_card(model: Path) -> dict:
    card = model.with_name(model.name + ".json")
    if not card.is_file():
        sys.exit(f"error: {card}: no model card (written by 'sslaudio export' next to the model)")
    return json.loads(card.read_text())


def load_audio(path: Path, sample_rate: int) -> np.ndarray:
    """(1, S) float32 mono waveform in [-1, 1] at the model's sample rate."""
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (S, channels)
    if sr != sample_rate:
        sys.exit(f"error: {path}: {sr} Hz; this model takes {sample_rate} Hz audio "
                 f"(resample it first, e.g. sox in.wav -r {sample_rate} out.wav)")
    return data.mean(axis=1, dtype=np.float32)[None, :]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="the .onnx file (its model card is MODEL.json)")
    ap.add_argument("audio", type=Path, help="an audio file soundfile reads (wav, flac, ogg ...)")
    ap.add_argument("--save", type=Path, help="write every output to this .npz file")
    args = ap.parse_args(argv)

    card = load_card(args.model)
    audio = load_audio(args.audio, card["sample_rate"])
    sess = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    in_name = card["inputs"][0]["name"]
    names = [o["name"] for o in card["outputs"]]
    outputs = dict(zip(names, sess.run(names, {in_name: audio})))

    if args.save:
        np.savez(args.save, **outputs)
    times = outputs["frame_times"]
    print(json.dumps({
        "model": args.model.name, "preset": card.get("preset"), "method": card.get("method"),
        "sample_rate": card["sample_rate"], "seconds": round(audio.shape[1] / card["sample_rate"], 3),
        "outputs": {n: list(v.shape) for n, v in outputs.items()},
        "frames": {"count": int(times.shape[0]), "first_s": float(times[0]) if len(times) else None,
                   "last_s": float(times[-1]) if len(times) else None},
        "embedding_head": [round(float(v), 5) for v in outputs["embedding"][0, :5]],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
