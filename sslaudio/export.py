"""Deployable encoders: waveform batch (B, S) -> clip embeddings, frame embeddings and their times,
frontend included, plus a sidecar JSON model card (`<out>.json`).

Outputs, in this order (ONNX output names; TorchScript's `embed(audio)` returns them as a dict):
- `embedding` (B, D) float32: the clip embedding (ONNX output 0; TorchScript's `forward`, as before);
- `frames` (B, T, D) float32: time-major frame embeddings, what `sslaudio extract --frames` gives;
- `frame_times` (T,) float64: the centre in seconds of each frame (`encoder.frame_times(T)`);
- `layer_<i>` (B, T, D) float32 per requested layer i (`layers=[...]`, as `--layer` counts them), its frames.
Batch and time axes are dynamic (named batch, samples, frames). TorchScript accepts float32 or int16
(scaled by 1/32768) waveforms; ONNX takes float32. Every output is checked against the PyTorch
module on random audio of another batch and length than the one traced; the max abs differences
go into the model card.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from sslaudio.atomic import atomic_text, atomic_write
from sslaudio.inference import EncoderBundle

FORMATS = ("torchscript", "onnx")
OPSET = 18  # >= 17: LayerNormalization and the STFT-free frontend run in any onnxruntime since 1.14
MAX_OPSET = 20  # what the TorchScript-based exporter writes
CARD_FORMAT = "sslaudio-export-card/1"


class ExportError(Exception):
    """The export tool chain is missing, the request is invalid, or the exported model disagrees with PyTorch."""


def card_path(out: str | Path) -> Path:
    """The sidecar model card of an exported file: `<out>.json` (byola.onnx -> byola.onnx.json)."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def parse_layers(spec: str | None) -> list[int] | str | None:
    """`--layers`: None or '' -> None, 'all' -> 'all', '0,2,-1' -> [0, 2, -1]."""
    if spec is None or not spec.strip():
        return None
    if spec.strip() == "all":
        return "all"
    try:
        return [int(s) for s in spec.split(",")]
    except ValueError:
        raise ExportError(f"--layers '{spec}': expected 'all' or comma-separated block indices, e.g. 0,2,-1") from None


def resolve_layers(bundle: EncoderBundle, layers: list[int] | str | None) -> list[int]:
    """Requested blocks ('all' or indices, negative from the end) as sorted, unique, non-negative indices."""
    if not layers:
        return []
    with torch.no_grad():
        depth = len(bundle.encoder(*bundle._probe_input(), return_layers=True).layers or [])
    if depth == 0:
        raise ExportError("--layers: this encoder has no per-block outputs")
    if layers == "all":
        return list(range(depth))
    if isinstance(layers, str):
        raise ExportError(f"--layers '{layers}': expected 'all' or a list of block indices")
    out = []
    for i in layers:
        if not -depth <= i < depth:
            raise ExportError(f"--layers {i}: this encoder has {depth} layer(s) (0..{depth - 1})")
        out.append(i % depth)
    return sorted(set(out))


def _time_grid(encoder: nn.Module) -> tuple[float, float, float]:
    """(offset, step, floor) with frame_times(n)[i] == max(offset + step * i, floor) for every n, i:
    what every encoder's frame_times is (CPC clamps its first frames at 0); checked on 4096 frames."""
    ref = encoder.frame_times(4096).double()
    step = float(ref[-1] - ref[-2])
    offset = float(ref[-1]) - step * (len(ref) - 1)
    floor = float(ref[0])
    grid = (offset + step * torch.arange(len(ref), dtype=torch.float64)).clamp_min(floor)
    if not torch.allclose(grid, ref, rtol=0, atol=1e-9) or not torch.allclose(encoder.frame_times(7).double(),
                                                                           ref[:7], rtol=0, atol=1e-12):
        raise ExportError(f"{type(encoder).__name__}.frame_times is not an affine grid; it cannot be exported")
    return offset, step, floor


class ExportModule(nn.Module):
    """audio (B, S) float32 -> (embedding, frames, frame_times, *layer_i) as a tuple, or as a dict
    keyed by output name (`as_dict`, for TorchScript)."""

    def __init__(self, bundle: EncoderBundle, layers: list[int] = (), as_dict: bool = False):
        super().__init__()
        self.frontend = copy.deepcopy(bundle.frontend)
        self.encoder = bundle.encoder
        if hasattr(self.frontend, "use_conv_stft"):
            self.frontend.use_conv_stft()
        self.layers = list(layers)
        self.as_dict = as_dict
        self.offset, self.step, self.floor = _time_grid(bundle.encoder)
        self.names = ["embedding", "frames", "frame_times"] + [f"layer_{i}" for i in self.layers]

    def forward(self, audio: Tensor):
        x, _ = self.frontend(audio.float())
        out = self.encoder(x, return_layers=True) if self.layers else self.encoder(x)
        frames, _ = self.encoder.to_frames(out)
        idx = torch.ones_like(frames[0, :, 0], dtype=torch.float64).cumsum(0) - 1  # 0..T-1, T dynamic
        times = (self.offset + self.step * idx).clamp_min(self.floor)
        outs = [self.encoder.pool(out), frames, times]
        for i in self.layers:
            outs.append(self.encoder.to_frames(dataclasses.replace(out, tokens=out.layers[i]))[0])
        if self.as_dict:
            return dict(zip(self.names, outs))
        return tuple(outs)


class ClipEncoder(ExportModule):
    """audio (B, S) -> clip embeddings (B, D) only (kept for callers of the first export API)."""

    def forward(self, audio: Tensor) -> Tensor:
        x, _ = self.frontend(audio.float())
        return self.encoder.pool(self.encoder(x))


class TorchScriptEncoder(nn.Module):
    """The saved TorchScript module: `forward(audio)` -> embedding (B, D) as before the frame outputs
    existed; `embed(audio)` -> every output by name; `output_names` lists them in order."""

    def __init__(self, inner: nn.Module, names: list[str]):
        super().__init__()
        self.inner = inner
        self.output_names = list(names)

    def _float(self, audio: Tensor) -> Tensor:
        if audio.dtype == torch.int16:
            audio = audio.to(torch.float32) / 32768.0
        return audio.to(torch.float32)

    def forward(self, audio: Tensor) -> Tensor:
        return self.inner(self._float(audio))["embedding"]

    @torch.jit.export
    def embed(self, audio: Tensor) -> dict[str, Tensor]:
        return self.inner(self._float(audio))


def check_format(fmt: str, opset: int = OPSET) -> None:
    """Refuse, as one-line ExportErrors, an unknown format, an ONNX opset below 17, or ONNX export
    without onnx / onnxruntime installed (before any model is loaded)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format '{fmt}' ({' or '.join(FORMATS)})")
    if fmt == "onnx":
        if not 17 <= opset <= MAX_OPSET:
            raise ExportError(f"--opset {opset}: ONNX export supports opsets 17 to {MAX_OPSET}")
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            # no brackets in the message: the CLI prints it as rich markup
            raise ExportError("ONNX export needs onnx and onnxruntime: pip install onnx onnxruntime "
                              "(sslaudio's 'export' extra)") from None


def export(bundle: EncoderBundle, fmt: str, out: str | Path, seconds: float = 1.0,
           layers: list[int] | str | None = None,
           source: str | None = None, opset: int = OPSET) -> dict:
    """Write the model to `out` and its model card to `<out>.json` (each atomically) and return a
    summary: {"format", "out", "card", "dim", "max_abs_diff" (of the embedding), "parity" (per output), ...}.

    `layers`: block indices (negative from the end) or "all", whose frames become extra outputs.
    `source`: what the bundle was loaded from (`random:tiny/m2d`, a run folder), for the card."""
    check_format(fmt, opset)
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out}: is a folder; give a file name")
    with warnings.catch_warnings():
        # torch.jit's deprecation notices and the tracer's constant-shape notes are expected: the
        # check in _export runs the exported model on another batch and length instead
        warnings.simplefilter("ignore")
        return _export(bundle, fmt, out, seconds, resolve_layers(bundle, layers), source, opset)


def _reference(bundle: EncoderBundle, check: Tensor, layers: list[int]) -> dict[str, Tensor]:
    """The PyTorch path extraction uses (torch.stft, bundle.embed), output by output."""
    with torch.no_grad():
        x, fl = bundle.frontend(check)
        out = bundle.encoder(x, fl, return_layers=bool(layers))
        frames, _ = bundle.encoder.to_frames(out)
        ref = {"embedding": bundle.encoder.pool(out), "frames": frames,
               "frame_times": bundle.encoder.frame_times(frames.shape[1]).double()}
        for i in layers:
            ref[f"layer_{i}"] = bundle.encoder.to_frames(dataclasses.replace(out, tokens=out.layers[i]))[0]
    return ref


def _export(bundle: EncoderBundle, fmt: str, out: Path, seconds: float, layers: list[int], source: str | None,
            opset: int) -> dict:
    sr = bundle.sample_rate
    g = torch.Generator().manual_seed(0)
    example = 0.1 * torch.randn(2, int(seconds * sr), generator=g)
    check = 0.1 * torch.randn(3, int(1.37 * seconds * sr), generator=g)  # other batch and length
    ref = _reference(bundle, check, layers)
    if not all(bool(torch.isfinite(v).all()) for v in ref.values()):  # NaN weights would pass as "disagrees"
        raise ExportError("the encoder's embeddings of random audio are not finite (NaN / inf weights?); "
                          "nothing written")
    model = ExportModule(bundle, layers, as_dict=fmt == "torchscript").eval()
    names = model.names
    parity: dict[str, float] = {}

    def compare(got: dict[str, np.ndarray]) -> None:
        for n in names:
            r = ref[n].numpy()
            if got[n].shape != r.shape:
                raise ExportError(f"exported output '{n}' has shape {list(got[n].shape)}, PyTorch {list(r.shape)}")
            parity[n] = float(np.abs(got[n].astype(np.float64) - r.astype(np.float64)).max())
            tol = 1e-3 * max(1.0, float(np.abs(r).max()))
            if not parity[n] <= tol:
                raise ExportError(f"exported model disagrees with PyTorch on '{n}': max abs diff "
                                  f"{parity[n]:.3g} > {tol:.3g}")

    def write(tmp: str) -> None:  # an ExportError here leaves `out` as it was
        if fmt == "torchscript":
            with torch.no_grad():
                traced = torch.jit.trace(model, example, check_trace=False, strict=False)
            scripted = torch.jit.script(TorchScriptEncoder(traced, names))
            scripted.save(tmp)
            loaded = torch.jit.load(tmp)
            with torch.no_grad():
                got = {k: v.numpy() for k, v in loaded.embed(check).items()}
                clip = loaded(check)
                got16 = loaded((check * 32767).round().clamp(-32768, 32767).to(torch.int16))
            if not np.array_equal(clip.numpy(), got["embedding"]):
                raise ExportError("TorchScript forward and embed()['embedding'] differ")
            if not torch.isfinite(got16).all():
                raise ExportError("int16 input produced non-finite output")
        else:
            import onnxruntime as ort

            _onnx_export(model, example, tmp, names, opset)
            sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
            got = dict(zip(names, sess.run(names, {"audio": check.numpy()})))
        compare(got)

    atomic_write(out, write, mode=0o666)
    card = model_card(bundle, fmt, out, names, ref, parity, list(check.shape), source, opset)
    atomic_text(card_path(out), json.dumps(card, indent=2) + "\n")
    return {"format": fmt, "out": str(out), "card": str(card_path(out)), "dim": int(ref["embedding"].shape[1]),
            "outputs": ", ".join(names), "max_abs_diff": parity["embedding"],
            "parity": {k: float(f"{v:.3g}") for k, v in parity.items()}, "checked_on": list(check.shape)}


def _shapes(names: list[str]) -> tuple[dict, dict]:
    """Named dynamic axes and shapes ([axis name or size]) of the inputs and outputs."""
    axes = {"audio": {0: "batch", 1: "samples"}, "embedding": {0: "batch"}, "frames": {0: "batch", 1: "frames"},
            "frame_times": {0: "frames"}}
    for n in names:
        axes.setdefault(n, {0: "batch", 1: "frames"})
    return {n: axes[n] for n in ["audio", *names]}, axes


def model_card(bundle: EncoderBundle, fmt: str, out: Path, names: list[str], ref: dict[str, Tensor],
               parity: dict[str, float], checked_on: list[int], source: str | None, opset: int) -> dict:
    from sslaudio import __version__

    p, enc = bundle.preset, bundle.encoder
    _, axes = _shapes(names)

    def spec(name: str, dtype: str, shape: list) -> dict:
        dims = [axes[name].get(i, s) for i, s in enumerate(shape)]
        return {"name": name, "dtype": dtype, "shape": dims}

    outputs = [spec(n, "float64" if n == "frame_times" else "float32", list(ref[n].shape)) for n in names]
    inputs = [spec("audio", "float32" if fmt == "onnx" else "float32 | int16", ["batch", "samples"])]
    versions = {"sslaudio": __version__, "torch": torch.__version__}
    if fmt == "onnx":
        import onnx
        import onnxruntime

        versions.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__, opset=opset)
    preset_name = source[len("random:"):] if source and source.startswith("random:") else None
    sha = hashlib.sha256()
    with open(out, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return {
        "format": CARD_FORMAT,
        "model": {"file": out.name, "format": fmt, "sha256": sha.hexdigest()},
        "source": source, "preset": preset_name, "preset_identity": p.identity(),
        "description": (p.description or "").strip().splitlines()[0] if (p.description or "").strip() else "",
        "method": p.method.get("name"), "encoder": p.encoder.get("name"), "frontend": p.frontend.get("name"),
        "random_init": bool(bundle.needs_stats),
        "sample_rate": int(bundle.sample_rate), "frame_rate": float(enc.frame_rate),
        "samples_per_frame": int(enc.downsample),
        "embedding_dim": int(ref["embedding"].shape[1]), "frame_dim": int(ref["frames"].shape[2]),
        "layers": [int(n.split("_")[1]) for n in names if n.startswith("layer_")],
        "inputs": inputs, "outputs": outputs,
        "dynamic_axes": {"batch": "clips in the batch", "samples": "waveform samples at sample_rate",
                         "frames": "output frames (frame_times gives their centres in seconds)"},
        "versions": versions,
        "parity": {"max_abs_diff": parity, "checked_on": checked_on,
                   "reference": "PyTorch (torch.stft frontend) on random audio of another batch and length"},
    }


def _onnx_export(model: nn.Module, example: Tensor, path: str, names: list[str], opset: int) -> None:
    dyn, _ = _shapes(names)
    kwargs = {"input_names": ["audio"], "output_names": names, "opset_version": opset, "dynamic_axes": dyn}
    try:  # the TorchScript-based exporter handles our data-dependent checks as constants
        torch.onnx.export(model, (example,), path, dynamo=False, **kwargs)
    except TypeError:  # torch without the `dynamo` argument
        torch.onnx.export(model, (example,), path, **kwargs)
