"""HuBERT: masked prediction of k-means cluster ids, with the clustering built in.

Hsu, Bolte, Tsai, Lakhotia, Salakhutdinov, Mohamed. "HuBERT: Self-Supervised Speech Representation
Learning by Masked Prediction of Hidden Units", IEEE/ACM TASLP 2021. Official code: fairseq
`fairseq/models/hubert/hubert.py`, `fairseq/criterions/hubert_criterion.py`,
`examples/hubert/config/pretrain/hubert_base_librispeech.yaml` and `examples/hubert/simple_kmeans/`
(dump_mfcc_feature.py, dump_hubert_feature.py, learn_kmeans.py, dump_km_label.py).

The student (the wav2vec 2.0 conv + transformer encoder) sees span-masked frames (p 0.8, length 10)
replaced by a learned vector; `final_proj` (untied, D -> final_dim 256) maps each output frame to a
vector whose cosine similarity / 0.1 with every codeword embedding (C x final_dim, uniform init as
fairseq's label_embs_concat) are the logits of its cluster id; cross-entropy on masked frames only
(`unmasked_weight` 0, configurable), divided by the number of frames that count, plus 10 x the
feature penalty (fairseq loss_weights [10]).

Targets, computed on the fly for every batch (no label files next to the audio):
- `targets: mfcc` (iteration 1): 39-d Kaldi MFCCs with deltas at 100 Hz (`frontends.KaldiMFCC`,
  as dump_mfcc_feature.py), 100 clusters;
- `targets: RUN_OR_CKPT[:LAYER]` (iteration 2): the output of block LAYER (counted from 1, as
  fairseq's `output_layer` and as `--layer` counts a transformer's hidden states; default `layer`, 6) of another sslaudio encoder (the iteration-1 model),
  500 clusters. That model is a frozen part of this method: its weights are loaded from the source
  when the run starts and are saved in every checkpoint, so a resumed run never needs the source.
Before the first step (`prepare`) a mini-batch k-means (`sslaudio.kmeans`: k-means++, n_init 20,
batches of 10k frames, as learn_kmeans.py) is fitted on the target features of `kmeans.sample_crops`
training crops (at most `kmeans.max_frames` frames kept: bounded memory). The codebook, its k,
inertia, used clusters and the label rate are buffers (saved and restored with every checkpoint);
`run_info` adds the source's identity (sha256 of its weights) and layer to each state.json.
Labels at a higher rate than the encoder's frames are subsampled as fairseq (label rate 100 Hz and
50 Hz frames: the label of frame t is label 2t): each frame takes the label frame whose centre is
nearest to its own, which is exactly 2t for the conv encoder and the MFCC frames.

Checks (one-line ConfigError): a label rate that is not a whole multiple of the encoder's frame
rate; a source encoder without block LAYER, or one that is not a frame sequence; a codebook whose
fitting sample uses fewer than `kmeans.min_used` x k clusters.
Logged: acc_masked (fairseq correct_m / count_m), acc_unmasked, cluster_usage (entropy of the
batch's labels over log k: 0 when one cluster takes everything), kmeans_inertia and kmeans_used
(the fit's, every row), frame_std / emb_std.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sslaudio import kmeans
from sslaudio.config import ConfigError
from sslaudio.frontends import KaldiMFCC
from sslaudio.masking import to_device
from sslaudio.methods import losses
from sslaudio.methods.base import Method, Needs, embedding_signals
from sslaudio.methods.data2vec import frame_std
from sslaudio.registry import METHODS

DEFAULT_K = {"mfcc": 100, "model": 500}  # the paper's iteration 1 and iteration 2


def parse_targets(spec: str, default_layer: int) -> tuple[str, int]:
    """'mfcc' -> ('mfcc', 0); 'runs/it1:6' -> ('runs/it1', 6); 'runs/it1' -> ('runs/it1', default)."""
    if spec == "mfcc":
        return spec, 0
    path, sep, tail = spec.rpartition(":")
    if sep and tail.isdigit() and path:
        return path, int(tail)
    return spec, default_layer


@METHODS.register("hubert")
class HuBERT(Method):
    @dataclass
    class Config:
        targets: str = "mfcc"  # "mfcc" or RUN_OR_CKPT[:LAYER]
        layer: int = 6  # block of the source model whose output is clustered (from 1), unless given in targets
        label_model_preset: dict | None = None  # the source's preset, recorded by the trainer
        kmeans: kmeans.KMeansConfig = field(default_factory=kmeans.KMeansConfig)
        final_dim: int = 256
        logit_temp: float = 0.1
        masked_weight: float = 1.0  # fairseq pred_masked_weight
        unmasked_weight: float = 0.0  # fairseq pred_nomask_weight
        feature_pen_weight: float = 10.0  # fairseq loss_weights [10]

        def __post_init__(self):
            if not self.targets:
                raise ConfigError("method.targets must be 'mfcc' or a run folder / checkpoint[:LAYER]")
            if self.layer < 1:
                raise ConfigError(f"method.layer must be >= 1 (blocks count from 1), found {self.layer}")
            if self.final_dim < 1 or self.logit_temp <= 0:
                raise ConfigError("method.final_dim must be >= 1 and method.logit_temp > 0")
            if self.masked_weight < 0 or self.unmasked_weight < 0 or self.masked_weight + self.unmasked_weight == 0:
                raise ConfigError("method.masked_weight and method.unmasked_weight must be >= 0, not both 0")
            if self.feature_pen_weight < 0:
                raise ConfigError(f"method.feature_pen_weight must be >= 0, found {self.feature_pen_weight}")

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(frontend=("waveform", "logmel"), encoder=("conv_transformer", "frame_transformer"),
                     masker="replace", segments=1)

    @classmethod
    def sources(cls, cfg) -> dict[str, str]:
        path, _ = parse_targets(cfg.targets, cfg.layer)
        return {} if path == "mfcc" else {"label_model": path}

    def __init__(self, cfg: Config, inputs, frontend, encoder, masker=None, sources=None):
        super().__init__(cfg, inputs, frontend, encoder, masker)
        if getattr(encoder.cfg, "mask_token", True) is False:
            raise ConfigError("encoder.mask_token: HuBERT replaces masked frames by a learned vector; "
                              "set encoder.mask_token: true")
        path, self.layer = parse_targets(cfg.targets, cfg.layer)
        self.k = cfg.kmeans.k or DEFAULT_K["mfcc" if path == "mfcc" else "model"]
        sr = inputs.sample_rate
        if path == "mfcc":
            self.mfcc = KaldiMFCC(sr)
            label_dim, label_rate = self.mfcc.dim, sr / self.mfcc.hop
        else:
            lf, le = sources["label_model"]
            self.label_model = nn.ModuleDict({"frontend": lf, "encoder": le})
            for p in self.label_model.parameters():
                p.requires_grad_(False)
            if int(lf.sample_rate) != sr:
                raise ConfigError(f"method.targets: {path} reads {lf.sample_rate} Hz audio, this preset {sr} Hz")
            depth = self._depth(le)
            if not 1 <= self.layer <= depth:
                raise ConfigError(f"method.targets: the encoder of {path} has {depth} blocks (1..{depth}); "
                                  f"it has no layer {self.layer}")
            label_dim, label_rate = int(le.dim), sr / int(le.downsample)
        frame_rate = sr / int(encoder.downsample)
        ratio = label_rate / frame_rate
        if ratio < 1 - 1e-6 or abs(ratio - round(ratio)) > 1e-6:
            raise ConfigError(f"method.targets: labels at {label_rate:g} Hz do not fit the encoder's {frame_rate:g} "
                              f"frames per second (the label rate must be a whole multiple of the frame rate)")
        self.label_rate = label_rate
        self.final_proj = nn.Linear(encoder.dim, cfg.final_dim)
        self.label_embs = nn.Parameter(torch.empty(self.k, cfg.final_dim).uniform_())  # fairseq label_embs_concat
        self.register_buffer("codebook", torch.zeros(self.k, label_dim))
        self.register_buffer("kmeans_stats", torch.zeros(3))  # inertia, used clusters, rows (0: not fitted)
        self._source_id: str | None = None
        self.register_load_state_dict_post_hook(lambda m, keys: m.__dict__.pop("_fitted", None))

    @staticmethod
    def _depth(encoder: nn.Module) -> int:
        depth = getattr(getattr(encoder, "cfg", None), "depth", None)
        if depth is None or not hasattr(encoder, "blocks"):
            raise ConfigError("method.targets: the source encoder is not a transformer with blocks")
        return int(depth)

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self, "label_model"):
            self.label_model.eval()  # a fixed feature extractor: no dropout
        return self

    # -- targets --------------------------------------------------------------------------------
    @torch.no_grad()
    def target_features(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        """(B, S) raw waveform -> (features (B, T', C), centre times (T',) in seconds)."""
        if hasattr(self, "mfcc"):
            f = self.mfcc(audio)
            return f, self.mfcc.frame_times(f.shape[1])
        x, lengths = self.label_model["frontend"](audio)
        out = self.label_model["encoder"](x, lengths, return_layers=True)
        if out.grid is None or len(out.grid) != 1:
            raise ConfigError("method.targets: the source encoder must give a sequence of frames, not a patch grid")
        f = out.layers[self.layer].float()  # hidden states: the blocks' input first, so block i is [i]
        return f, self.label_model["encoder"].frame_times(f.shape[1])

    def frame_labels(self, audio: Tensor, n_frames: int) -> Tensor:
        """(B, S) -> (B, n_frames) cluster ids: each encoder frame takes the label frame nearest in time."""
        f, t_label = self.target_features(audio)
        ids, _ = kmeans.assign(f.reshape(-1, f.shape[-1]), self.codebook)
        ids = ids.view(f.shape[0], f.shape[1])
        t_frame = self.encoder.frame_times(n_frames)
        step = float(t_label[1] - t_label[0]) if len(t_label) > 1 else 1.0
        idx = torch.round((t_frame - float(t_label[0])) / step).long().clamp(0, f.shape[1] - 1)
        return ids[:, to_device(idx, ids.device)]  # host-built index: a non-blocking copy

    def prepare(self, audio: Tensor, sample=None) -> None:
        super().prepare(audio)
        cfg = self.cfg.kmeans
        gen = torch.Generator(audio.device).manual_seed(torch.initial_seed() + 0x4B4D)
        pool = kmeans.Reservoir(cfg.max_frames, gen)
        batches = sample(cfg.sample_crops, 32) if sample is not None else audio.split(32)
        for crops in batches:
            f, _ = self.target_features(crops)
            pool.add(f.reshape(-1, f.shape[-1]))
        fit = kmeans.fit(pool.rows, cfg, gen, k=self.k)
        if fit.used < cfg.min_used * self.k:
            raise ConfigError(f"k-means: the codebook's sample ({fit.rows} frames) uses only {fit.used} of "
                              f"{self.k} clusters, fewer than method.kmeans.min_used = {cfg.min_used} of them "
                              f"(more or more varied audio, or a smaller method.kmeans.k)")
        self.codebook.copy_(fit.centers)
        self.kmeans_stats.copy_(torch.tensor([fit.inertia, fit.used, fit.rows], dtype=torch.float32))

    def run_info(self) -> dict:
        path, _ = parse_targets(self.cfg.targets, self.cfg.layer)
        info = {"targets": path, "k": self.k, "label_rate": self.label_rate,
                "kmeans_inertia": float(self.kmeans_stats[0]), "kmeans_used": int(self.kmeans_stats[1]),
                "kmeans_rows": int(self.kmeans_stats[2])}
        if hasattr(self, "label_model"):
            if self._source_id is None:
                h = hashlib.sha256()
                for name, t in sorted(self.label_model.state_dict().items()):
                    h.update(name.encode())
                    h.update(t.detach().cpu().contiguous().numpy().tobytes())
                self._source_id = h.hexdigest()
            info.update({"layer": self.layer, "source_sha256": self._source_id})
        return info

    # -- the step -------------------------------------------------------------------------------
    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        if not self.__dict__.get("_fitted"):  # read once per run (a load forgets it), not every step
            if not bool(self.kmeans_stats[2] > 0):
                raise RuntimeError("hubert: the codebook was never fitted (prepare() runs before the first step)")
            self.__dict__["_fitted"] = True
        audio = batch["audio"][:, 0]
        x = self.features(audio)
        B = x.shape[0]
        # whole crops: no lengths for the encoder to check, all-False padding made on the device
        padding = torch.zeros(B, math.prod(self.encoder.token_grid(x.shape)), dtype=torch.bool, device=x.device)
        mask = self.masker(self.encoder.token_grid(x.shape), B, None, generator)
        out = self.encoder(x, None, mask=mask)
        labels = self.frame_labels(audio, out.tokens.shape[1])
        pred = self.final_proj(out.tokens)
        hidden = mask.masked.to(x.device) & ~padding
        shown = ~mask.masked.to(x.device) & ~padding
        cfg = self.cfg
        # every frame's logits, the masked ones selected by weights (no data-dependent shapes)
        flat_pred, flat_labels = pred.reshape(-1, pred.shape[-1]), labels.reshape(-1)
        m = losses.cluster_prediction_loss(flat_pred, self.label_embs, flat_labels, cfg.logit_temp, select=hidden)
        total, frames = cfg.masked_weight * m.loss, m.terms["rows"]
        acc_u = torch.zeros((), device=x.device)
        if cfg.unmasked_weight > 0:
            u = losses.cluster_prediction_loss(flat_pred, self.label_embs, flat_labels, cfg.logit_temp, select=shown)
            total, frames = total + cfg.unmasked_weight * u.loss, frames + u.terms["rows"]
            acc_u = u.terms["correct"] / u.terms["rows"].clamp_min(1)
        loss = total / frames.clamp_min(1)
        if out.features_pen is not None and cfg.feature_pen_weight > 0:
            loss = loss + cfg.feature_pen_weight * out.features_pen
        return {"loss": loss, "masked_loss": (m.loss / m.terms["rows"].clamp_min(1)).detach(),
                "acc_masked": m.terms["correct"] / m.terms["rows"].clamp_min(1), "acc_unmasked": acc_u,
                "cluster_usage": kmeans.usage_entropy(labels, self.k, ~padding),
                "kmeans_inertia": self.kmeans_stats[0].clone(), "kmeans_used": self.kmeans_stats[1].clone(),
                "features_pen": (out.features_pen if out.features_pen is not None else torch.zeros(())).detach(),
                "frame_std": frame_std(out.tokens, out.padding), **embedding_signals(self.encoder.pool(out)),
                "masked_pct": hidden.float().mean().detach()}

