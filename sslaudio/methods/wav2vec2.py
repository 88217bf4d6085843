"""wav2vec 2.0: pick the quantized local features of span-masked frames among distractors.

Baevski, Zhou, Mohamed, Auli. "wav2vec 2.0: A Framework for Self-Supervised Learning of Speech
Representations", NeurIPS 2020. Official code: fairseq `models/wav2vec/wav2vec2.py`
(Wav2Vec2Model: forward, sample_negatives, compute_preds, get_extra_losses),
`modules/gumbel_vector_quantizer.py`, `criterions/wav2vec_criterion.py` and
`examples/wav2vec/config/pretraining/wav2vec2_base_librispeech.yaml`.

The encoder (a ConvTransformer on the waveform, its gradient into the conv extractor scaled by
`feature_grad_mult`) sees its projected conv features with span-masked frames replaced by a
learned vector. At the masked frames (padding excluded), `final_proj` maps the context output to
`final_dim`; the targets are the layer-normed conv features of the same frames (`EncoderOut.
features`) after `dropout_features`, through the shared Gumbel product quantizer (G groups of V
codewords, straight-through hard choices in training, temperature max(2 * 0.999995^step, 0.5))
and `project_q`. Each frame's K = 100 distractors are the targets of other masked frames of the same
utterance (`sample_negatives`), and `losses.wav2vec2_contrastive` scores cosine similarity / 0.1
with the target at index 0. Loss = contrastive + 0.1 * diversity + 10 * feature penalty, the
weights of fairseq `loss_weights: [0.1, 10]`.

Where the paper and the code differ we follow the code:
- the paper quantizes the feature encoder output as is; fairseq applies `dropout_features` (0.1)
  to the quantizer input first;
- the paper draws the distractors uniformly from the other masked frames; fairseq draws them with
  replacement and gives a distractor equal to the target (the same codewords) a logit of -inf;
- the paper's loss is L_m + alpha L_d; fairseq adds the feature penalty (mean square of the conv
  features, weight 10) and divides the summed cross-entropy by the number of masked frames while
  scaling the extra terms by that number, i.e. the weights apply to the per-frame mean.
Our encoder averages the feature penalty over valid frames (fairseq: over every frame, padding
included); the two agree on unpadded batches, which is what training sees.

On log-mel frames (encoder `frame_transformer` with `mask_token: true`, the tiny preset) the
same objective reads `EncoderOut.features` = the stacked log-mel frames as the quantizer input
(layer-normed per frame first with `encoder.feature_norm`, fairseq's layer_norm; tiny/wav2vec2 leaves
it off, see its comment): there is no learned feature extractor, so no feature penalty and no
feature_grad_mult.

Logged (losses in nats; fairseq logs bits): contrastive, diversity and feature_pen (the unweighted
parts), acc (fairseq's correct / count), code_ppl / prob_ppl (sum over groups of the perplexity of
the hard choices / of the softmax, averaged over the masked frames; G..G*V), temp, masked_pct, and
codebook_collapse: the number of consecutive training steps, this one included, whose code_ppl
stayed below `collapse_perplexity` per group (0 while the codebook is healthy; a value that keeps
growing means the codebook has collapsed to a few codewords).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sslaudio.config import ConfigError, check_range
from sslaudio.masking import to_device
from sslaudio.methods import losses
from sslaudio.methods.base import Method, Needs, embedding_signals
from sslaudio.methods.quantizer import GumbelQuantizer, gumbel_temperature
from sslaudio.registry import METHODS


def sample_negatives(counts: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """Distractors for M = counts.sum() masked frames listed utterance by utterance (the row-major
    order of `x[mask]`), `counts` (B,) frames per utterance -> (M, n) long indices into those M rows.

    Frame j of an utterance with c masked frames gets n draws, with replacement, uniform over the
    c - 1 other masked frames of the same utterance: a draw in [0, c - 2] is shifted by one at or
    above j (fairseq `neg_idxs[neg_idxs >= tszs] += 1`), so a frame never draws itself. A lone
    masked frame (c = 1) has no other frame: its draws point at itself, which the loss masks out as
    equal to the target. The bookkeeping is built on the host from host `counts` (the mask's host
    copy), so nothing is read from the device; the draws come from `generator` (on its device)."""
    device = generator.device
    counts = counts.cpu().long()
    first = torch.cumsum(counts, 0) - counts  # (B,) row of each utterance's first frame
    utt = torch.repeat_interleave(torch.arange(counts.shape[0]), counts)  # (M,)
    start, size = first[utt], counts[utt]  # (M,)
    local = torch.arange(utt.shape[0]) - start  # position among its utterance's frames
    start, size, local = (to_device(t, device) for t in (start, size, local))
    others = (size - 1).clamp_min(1)[:, None]  # (M, 1)
    u = torch.rand((utt.shape[0], n), generator=generator, device=device, dtype=torch.float64)
    idx = torch.minimum((u * others).long(), others - 1)  # uniform over [0, c - 2]
    idx = idx + (idx >= local[:, None]).long()  # skip the frame itself
    idx = torch.where(size[:, None] > 1, idx, local[:, None])
    return start[:, None] + idx


def _feature_dim(encoder: nn.Module) -> int:
    """Width of EncoderOut.features: the conv channels, or the stacked log-mel frame."""
    if hasattr(encoder, "extractor"):
        return int(encoder.extractor.out_channels)
    return int(encoder.input_dim)


@METHODS.register("wav2vec2")
class Wav2Vec2(Method):
    @dataclass
    class Config:
        final_dim: int = 256  # width of the contrastive space (final_proj, project_q)
        latent_groups: int = 2  # G codebooks
        latent_vars: int = 320  # V codewords per group
        latent_dim: int = 0  # codeword width summed over groups (fairseq vq_dim); 0: final_dim
        latent_temp: tuple[float, float, float] = (2.0, 0.5, 0.999995)  # Gumbel start, end, decay per update
        num_negatives: int = 100  # distractors per masked frame, from the same utterance
        logit_temp: float = 0.1  # kappa
        diversity_weight: float = 0.1  # loss_weights[0]
        feature_pen_weight: float = 10.0  # loss_weights[1]
        dropout_features: float = 0.1  # on the quantizer input
        collapse_perplexity: float = 2.0  # code_ppl per group below this counts as collapsed
        collapse_warn_steps: int = 100  # warn once the codebook has been collapsed this many steps in a row

        def __post_init__(self):
            for key in ("final_dim", "latent_groups", "num_negatives"):
                check_range(f"method.{key}", getattr(self, key), low=1)
            check_range("method.latent_vars", self.latent_vars, low=2)
            check_range("method.latent_dim", self.latent_dim, low=0)
            if (self.latent_dim or self.final_dim) % self.latent_groups:
                raise ConfigError(f"method.latent_groups {self.latent_groups} must divide the codeword width "
                                  f"{self.latent_dim or self.final_dim} (method.latent_dim, or final_dim if 0)")
            start, end, decay = self.latent_temp
            check_range("method.latent_temp[1]", end, low=0, low_open=True)
            check_range("method.latent_temp[0]", start, low=end)
            check_range("method.latent_temp[2]", decay, low=0, low_open=True, high=1)
            check_range("method.logit_temp", self.logit_temp, low=0, low_open=True)
            check_range("method.diversity_weight", self.diversity_weight, low=0)
            check_range("method.feature_pen_weight", self.feature_pen_weight, low=0)
            check_range("method.dropout_features", self.dropout_features, low=0, high=1, high_open=True)
            check_range("method.collapse_perplexity", self.collapse_perplexity, low=1)
            check_range("method.collapse_warn_steps", self.collapse_warn_steps, low=1)

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(frontend=("waveform", "logmel"), encoder=("conv_transformer", "frame_transformer"),
                     masker="replace", segments=1)

    def log_warnings(self, row: dict) -> list[str]:
        n = int(row.get("codebook_collapse", 0))
        if n < self.cfg.collapse_warn_steps:
            return []
        return [f"step {row['step']}: the wav2vec 2.0 codebook has collapsed: fewer than "
                f"{self.cfg.collapse_perplexity:g} codes per group in use for {n} steps in a row (code_ppl "
                f"{row.get('code_ppl', float('nan')):.2f}); try a lower optim.lr or a higher diversity_weight"]

    def __init__(self, cfg: Config, inputs, frontend, encoder, masker=None):
        super().__init__(cfg, inputs, frontend, encoder, masker)
        if not getattr(encoder.cfg, "mask_token", True):
            raise ConfigError("encoder.mask_token must be true: wav2vec 2.0 replaces the masked frames "
                              "with a learned vector")
        code_dim = cfg.latent_dim or cfg.final_dim
        self.dropout_features = nn.Dropout(cfg.dropout_features)
        # fairseq init: weight_proj N(0, 1), bias 0, codewords U(0, 1)
        self.quantizer = GumbelQuantizer(_feature_dim(encoder), cfg.latent_groups, cfg.latent_vars, code_dim)
        self.project_q = nn.Linear(code_dim, cfg.final_dim)
        self.final_proj = nn.Linear(encoder.dim, cfg.final_dim)
        # consecutive collapsed steps; a buffer, so it travels in checkpoints and resumes exactly
        self.register_buffer("collapse_steps", torch.zeros(()))

    def temperature(self, step: int) -> float:
        """Gumbel-softmax temperature at `step` (fairseq sets it from num_updates before the forward)."""
        return gumbel_temperature(step, *self.cfg.latent_temp)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The default groups, with the quantizer's (G, V) logit bias among the undecayed biases."""
        decay, no_decay = super().param_groups(weight_decay)
        bias = self.quantizer.bias
        decay["params"] = [p for p in decay["params"] if p is not bias]
        no_decay["params"] = [*no_decay["params"], bias]
        return [decay, no_decay]

    def forward(self, batch: dict, step: int, generator: torch.Generator, max_steps: int) -> dict[str, Tensor]:
        audio = batch["audio"][:, 0]  # (B, S); one crop per file
        with torch.no_grad():
            x, lengths = self.frontend(audio, batch.get("lengths"))  # waveform (B, S) or log-mel (B, F, T)
        if "lengths" not in batch:  # whole crops: no padding, nothing for the encoder to check
            lengths, padding = None, None
        else:
            padding = self.encoder.token_padding(lengths, x.shape)  # (B, T)
        mask = self.masker(self.encoder.token_grid(x.shape), x.shape[0], padding, generator)
        out = self.encoder(x, lengths, mask=mask)  # masked frames replaced by the mask embedding
        # the masked valid frames, utterance by utterance (the order of x[sel]); gathered with
        # indices the span masker built on the host, so no count is read from the device
        rows, counts = mask.hidden_rows(padding)
        feats, tokens = out.features.flatten(0, 1)[rows], out.tokens.flatten(0, 1)[rows]
        q = self.quantizer(self.dropout_features(feats), self.temperature(step), generator)
        y = self.project_q(q.codes)  # (M, final_dim)
        pred = self.final_proj(tokens)  # (M, final_dim)
        neg_idx = sample_negatives(counts, self.cfg.num_negatives, generator).to(pred.device)
        contrastive, terms = losses.wav2vec2_contrastive(pred, y, neg_idx, self.cfg.logit_temp)
        pen = out.features_pen if out.features_pen is not None else contrastive.new_zeros(())
        loss = contrastive + self.cfg.diversity_weight * q.diversity + self.cfg.feature_pen_weight * pen
        if self.training:
            with torch.no_grad():
                collapsed = q.code_perplexity < self.cfg.collapse_perplexity * self.cfg.latent_groups
                self.collapse_steps.copy_(torch.where(collapsed, self.collapse_steps + 1, 0.0))
        return {"loss": loss, "contrastive": contrastive.detach(), "diversity": q.diversity.detach(),
                "feature_pen": pen.detach().float(), "acc": terms["acc"],
                "code_ppl": q.code_perplexity.detach(), "prob_ppl": q.prob_perplexity.detach(),
                "temp": torch.full((), self.temperature(step), device=loss.device),
                "masked_pct": torch.full((), rows.shape[0] / max(mask.masked.numel(), 1), device=loss.device),
                "codebook_collapse": self.collapse_steps.clone(), **embedding_signals(self.encoder.pool(out))}
