"""The HEAR 2021 common API, so that any sslaudio checkpoint drops into the HEAR evaluation kit.

    hear-validator sslaudio.hear -m runs/byola
    python -m heareval.embeddings.runner sslaudio.hear --model runs/byola

The API (hearbenchmark.com, "common API"; hear-validator and hear-eval-kit check and call it):
- `load_model(model_file_path)` -> a torch.nn.Module with the int attributes `sample_rate`,
  `scene_embedding_size` and `timestamp_embedding_size`. Here model_file_path is any CKPT the CLI
  takes (run folder, step folder, exported encoder file, random:PRESET); `layer` (the kit's
  --model-options '{"layer": N}') embeds layer N (as `--layer N`) instead of the encoder's output.
- `get_scene_embeddings(audio, model)`: audio (n_sounds, n_samples) float32 at model.sample_rate
  in [-1, 1] -> (n_sounds, scene_embedding_size) float32: the encoder's clip embedding.
- `get_timestamp_embeddings(audio, model)` -> embeddings (n_sounds, n_timestamps,
  timestamp_embedding_size) float32 and timestamps (n_sounds, n_timestamps) float32 in
  milliseconds: the centre of each frame's receptive field, one frame hop apart.

Results are on the audio's device. Sounds are embedded as `sslaudio.load` embeds them: equal
lengths in batches without padding (each sound gets the numbers it gets alone), long sounds chunk
by chunk in bounded memory with timestamps that stay one hop apart; bad audio (NaN, empty, too
short for one frame, not 2-D) is a ValueError with one line.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sslaudio.api import Embedder, InputError, load
from sslaudio.checkpoint import CheckpointError


class HearModel(nn.Module):
    """An sslaudio encoder with the attributes the HEAR API asks of a model."""

    def __init__(self, embedder: Embedder):
        super().__init__()
        self.embedder = embedder
        self.sample_rate = int(embedder.sample_rate)
        self.scene_embedding_size = int(embedder.dim)
        self.timestamp_embedding_size = int(embedder.frame_dim)


def load_model(model_file_path: str = "", layer: int | None = None) -> HearModel:
    """The HEAR model of a checkpoint (on the CPU; the kit moves it with .to(device))."""
    if not str(model_file_path):
        raise CheckpointError("sslaudio.hear.load_model needs a checkpoint: a run folder, a step folder, an "
                              "exported encoder.safetensors or random:PRESET (hear-validator -m CKPT)")
    return HearModel(load(model_file_path, device="cpu", layer=layer))


def get_scene_embeddings(audio: Tensor, model: HearModel) -> Tensor:
    """(n_sounds, n_samples) at model.sample_rate -> (n_sounds, scene_embedding_size) float32."""
    out = model.embedder.embed(_sounds(audio), model.sample_rate)
    return torch.stack([e.clip for e in out]).to(audio.device)


def get_timestamp_embeddings(audio: Tensor, model: HearModel) -> tuple[Tensor, Tensor]:
    """(n_sounds, n_samples) -> embeddings (n_sounds, n_timestamps, timestamp_embedding_size)
    float32 and timestamps (n_sounds, n_timestamps) float32 in milliseconds."""
    out = model.embedder.embed(_sounds(audio), model.sample_rate)
    emb = torch.stack([e.frames for e in out])  # equal lengths give equal frame counts
    times = torch.stack([e.timestamps * 1000.0 for e in out]).float()
    return emb.to(audio.device), times.to(audio.device)


def _sounds(audio: Tensor) -> list[Tensor]:
    if not isinstance(audio, Tensor):
        raise InputError(f"audio must be a torch tensor (n_sounds, n_samples), found {type(audio).__name__}")
    if audio.ndim != 2:
        raise InputError(f"audio must be (n_sounds, n_samples), found shape {tuple(audio.shape)}")
    if audio.shape[0] == 0:
        raise InputError(f"audio: no sounds, shape {tuple(audio.shape)}")
    return list(audio)
