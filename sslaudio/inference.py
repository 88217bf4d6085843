"""The inference model: frontend + encoder, loaded from a run folder, a step folder, an exported
encoder file, or built at random init (`random:PRESET`, the baseline every probe is compared with).
Storage (what the files hold) is `checkpoint.py`'s; this module turns them into a model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from sslaudio.build import build_encoder, build_method, load_preset, preset_from_dict
from sslaudio.checkpoint import (ENCODER_FORMAT, HASH_KEY, CheckpointError, check_tensors, latest, read_tensors,
                                 step_dirs)
from sslaudio.config import ConfigError, Preset
from sslaudio.encoders.base import POOLS, lengths_to_padding, pool_frames


class EncoderBundle(nn.Module):
    """Frontend + encoder: waveform in, clip and frame embeddings out."""

    def __init__(self, frontend: nn.Module, encoder: nn.Module, preset: Preset, needs_stats: bool = False):
        super().__init__()
        self.frontend = frontend
        self.encoder = encoder
        self.preset = preset
        self.needs_stats = needs_stats  # random-init baselines estimate frontend stats from their inputs
        self.layer: int | str | None = None  # an intermediate layer's output, or 'all' layers side by side
        self.pool: tuple[str, ...] | None = None  # clip statistics replacing the encoder's clip_pool
        encoder.embedding_blocks(True)  # an embedding that spans several blocks (ViT eval_blocks)

    @property
    def sample_rate(self) -> int:
        return self.preset.data.sample_rate

    def set_layer(self, layer: int | str | None) -> "EncoderBundle":
        """Use layer `layer` (negative from the end; None: the encoder's output) for embeddings, as
        SUPERB-style probes of speech models do: the encoder's `layers` with return_layers, which
        for a transformer are its hidden states as SUPERB and transformers count them (0: the
        blocks' input, i: block i's output); 'all': every layer (as `layer` i gives it) side by
        side, first first, in every frame. A linear probe on that can weight the layers as SUPERB's
        learned weighted sum does, or mix them more freely (the frame and clip widths are the
        layers' widths summed; clip pooling is per dimension, so the clip embedding is the layers'
        clip embeddings side by side)."""
        if layer is not None:
            with torch.no_grad():
                depth = len(self.encoder(*self._probe_input(), return_layers=True).layers or [])
            if layer == "all":
                if depth < 1:
                    raise CheckpointError(f"--layer all: {type(self.encoder).__name__} gives no per-block outputs")
            elif not -depth <= layer < depth:
                raise CheckpointError(f"--layer {layer}: this encoder has {depth} layer(s) (0..{depth - 1})")
        self.layer = layer
        self.encoder.embedding_blocks(layer is None)  # one block's output when a layer is chosen
        return self

    def layer_widths(self) -> list[int]:
        """The frame width of each layer that layer 'all' puts side by side, first first."""
        with torch.no_grad():
            out = self.encoder(*self._probe_input(), return_layers=True)
            return [self.encoder.to_frames(dataclasses.replace(out, tokens=h))[0].shape[-1] for h in out.layers or []]

    def set_pool(self, pool: str | None) -> EncoderBundle:
        """Pool the clip embedding with these statistics of the frames (a POOLS name: 'mean',
        'max', 'mean+max', their sum) instead of the encoder's own `clip_pool`; None: its own."""
        if pool is not None and pool not in POOLS:
            raise ConfigError(f"--pool must be one of {', '.join(POOLS)}, found '{pool}'")
        self.pool = None if pool is None else POOLS[pool]
        return self

    @property
    def clip_stats(self) -> tuple[str, ...]:
        """The statistics the clip embedding sums: set_pool's, else the encoder's `clip_pool`."""
        return self.pool or self.encoder.clip_pool

    def _probe_input(self) -> tuple[Tensor, Tensor]:
        audio = torch.zeros(1, 4 * int(self.encoder.downsample), device=next(self.encoder.parameters()).device)
        with torch.no_grad():
            x, fl = self.frontend(audio)
        return x, fl

    def forward(self, audio: Tensor, lengths: Tensor | None = None):
        x, frame_lengths = self.frontend(audio, lengths)
        if self.layer is None:
            return self.encoder(x, frame_lengths)
        if self.layer == "all":  # several outputs: frames() and embed() put them side by side
            raise ValueError("a bundle with layer 'all' gives frames() and embed(), not one EncoderOut")
        out = self.encoder(x, frame_lengths, return_layers=True)
        return dataclasses.replace(out, tokens=out.layers[self.layer])

    def frames(self, audio: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, S) -> time-major frames (B, T, D) and valid frames (B,) of the chosen output; with
        layer 'all', every layer's frames (as layer i gives them) side by side, first first."""
        if self.layer != "all":
            return self.encoder.to_frames(self(audio, lengths))
        x, frame_lengths = self.frontend(audio, lengths)
        out = self.encoder(x, frame_lengths, return_layers=True)
        per = [self.encoder.to_frames(dataclasses.replace(out, tokens=h)) for h in out.layers]
        return torch.cat([f for f, _ in per], -1), per[0][1]

    def embed(self, audio: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(B, S) -> clip (B, D), frames (B, T, D), frame lengths (B,); the frames' centre times
        are `self.encoder.frame_times(T)`. The clip embedding pools the frames with `clip_stats` (the
        encoder's `clip_pool` statistics unless set_pool chose others), as `Encoder.pool` does."""
        frames, frame_lengths = self.frames(audio, lengths)
        return pool_frames(frames, lengths_to_padding(frame_lengths, frames.shape[1]), self.clip_stats), \
            frames, frame_lengths


def _bundle(preset: Preset) -> EncoderBundle:
    frontend, encoder = build_encoder(preset)
    return EncoderBundle(frontend, encoder, preset)


def _preset_from_meta(meta: dict, where: Path) -> Preset:
    try:
        return preset_from_dict(json.loads(meta["config"]))
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{where}: no sslaudio config in its metadata") from None


def load_encoder(spec: str, warn: Callable[[str], None] | None = None) -> EncoderBundle:
    """A run folder (its newest step that verifies; `warn` hears of each newer one skipped), a step
    folder, an exported encoder file, or `random:PRESET`.

    Weights are checked before use: against the sha256 in the file's metadata (files written
    before the hashes existed have none and are accepted) and for NaN / inf; a file that fails
    either is a CheckpointError naming it (and the tensor)."""
    if spec.startswith("random:"):
        preset = load_preset(spec[len("random:"):])
        torch.manual_seed(preset.seed)
        bundle = _bundle(preset)
        bundle.needs_stats = True
        return bundle.eval()
    p = Path(spec)
    if p.is_dir() and not (p / "model.safetensors").is_file():  # a run folder
        steps = step_dirs(p)
        step = latest(p, warn) if steps else None
        if step is not None:
            p = step
        elif steps:
            raise CheckpointError(f"{spec}: none of its {len(steps)} checkpoint(s) verifies (see the warnings)")
        elif (p / "export" / "encoder.safetensors").is_file():
            p = p / "export" / "encoder.safetensors"
    if p.is_file():
        tensors, meta = read_tensors(p)
        if meta.get("format") != ENCODER_FORMAT:
            raise CheckpointError(f"{p}: not an sslaudio encoder file")
        check_tensors(tensors, meta, p)
        bundle = _bundle(_preset_from_meta(meta, p))
        _load_into(bundle, tensors, p)
        return bundle.eval()
    if p.is_dir() and (p / "model.safetensors").is_file():
        tensors, meta = read_tensors(p / "model.safetensors")
        check_tensors(tensors, meta, p / "model.safetensors", _state_hash(p, meta))
        preset = _preset_from_meta(meta, p)
        method = build_method(preset)
        _load_into(method, tensors, p)
        return EncoderBundle(method.frontend, method.inference_encoder(), preset).eval()
    raise CheckpointError(f"{spec}: not a run folder, step folder, encoder file or random:PRESET")


def _state_hash(step_dir: Path, meta: dict) -> str | None:
    """The model file's sha256 as the step's state.json records it (None for steps saved before
    the hashes, or when state.json is unreadable: the file's own hash still applies)."""
    try:
        return (json.loads((step_dir / "state.json").read_text()).get(HASH_KEY) or {}).get("model.safetensors")
    except (OSError, ValueError, AttributeError):
        return None


def _load_into(module: nn.Module, tensors: dict[str, Tensor], where: Path) -> None:
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not match the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
