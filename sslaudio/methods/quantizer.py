"""Product quantizer with a Gumbel-softmax choice of codeword per group: wav2vec 2.0 and NPC.

wav2vec 2.0 (Baevski et al. 2020, section 2; fairseq `modules/gumbel_vector_quantizer.py`): the
conv features (N, C) go through one Linear to G x V logits (weights N(0, 1), bias 0); in training
each group picks a codeword with a straight-through hard Gumbel-softmax at temperature tau, at
evaluation the argmax; the chosen codewords (each C_out / G wide, uniform(0, 1) init) are
concatenated. The diversity loss is (G V - perplexity) / (G V) of the softmax probabilities averaged
over the rows (`prob_perplexity`); `code_perplexity` is the same over the hard choices.
tau = max(start * decay ** step, end) (fairseq `latent_temp` (2, 0.5, 0.999995), updated per update).

NPC (Liu et al. 2021; s3prl `upstream/npc/vq.py`, after VQ-APC): `split_input`: group g reads only
its slice of the input (VQLayer(input_size=code_dim)), torch's default Linear initialisation,
a constant temperature (1.0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslaudio.config import ConfigError


@dataclass
class QuantOut:
    codes: Tensor  # (N, code_dim): the concatenated codewords (straight-through in training)
    indices: Tensor  # (N, G) long: the chosen entry per group
    prob_perplexity: Tensor  # scalar: sum over groups of exp(entropy of the row-averaged softmax)
    code_perplexity: Tensor  # scalar: the same of the row-averaged hard choices
    diversity: Tensor  # scalar: (G V - prob_perplexity) / (G V), the wav2vec 2.0 diversity loss


def gumbel_temperature(step: int, start: float, end: float, decay: float) -> float:
    """fairseq `set_num_updates`: max(start * decay ** step, end)."""
    return max(start * decay ** step, end)


def _perplexity(probs: Tensor) -> Tensor:
    """(G, V) distributions -> sum over groups of exp(entropy) (fairseq's 1e-7 guard)."""
    return torch.exp(-torch.sum(probs * torch.log(probs + 1e-7), dim=-1)).sum()


class GumbelQuantizer(nn.Module):
    def __init__(self, in_dim: int, groups: int, entries: int, code_dim: int, split_input: bool = False,
                 init: str = "fairseq"):
        super().__init__()
        if groups < 1 or entries < 2:
            raise ConfigError(f"quantizer: groups must be >= 1 and entries >= 2, found {groups} and {entries}")
        if code_dim % groups or (split_input and in_dim % groups):
            raise ConfigError(f"quantizer: the code width {code_dim}{' and input width ' + str(in_dim) if split_input else ''}"
                              f" must be divisible by the {groups} groups")
        if init not in ("fairseq", "torch"):
            raise ConfigError(f"quantizer: init must be 'fairseq' or 'torch', found {init!r}")
        self.groups, self.entries, self.split_input = groups, entries, split_input
        in_g = in_dim // groups if split_input else in_dim
        self.weight = nn.Parameter(torch.empty(groups, entries, in_g))  # logits = x W^T + b per group
        self.bias = nn.Parameter(torch.zeros(groups, entries))
        self.codebook = nn.Parameter(torch.empty(groups, entries, code_dim // groups))
        if init == "fairseq":  # weight_proj normal(0, 1), bias 0; codevectors uniform(0, 1)
            nn.init.normal_(self.weight, 0.0, 1.0)
            nn.init.uniform_(self.codebook)
        else:  # nn.Linear(in_g, V) and nn.Linear(V, code_g, bias=False) defaults, per group
            bound = 1 / math.sqrt(in_g)
            nn.init.uniform_(self.weight, -bound, bound)
            nn.init.uniform_(self.bias, -bound, bound)
            nn.init.uniform_(self.codebook, -1 / math.sqrt(entries), 1 / math.sqrt(entries))

    def logits(self, x: Tensor) -> Tensor:
        """(N, in_dim) -> (N, G, V)."""
        G, V = self.groups, self.entries
        if self.split_input:
            return torch.einsum("ngi,gvi->ngv", x.unflatten(-1, (G, -1)), self.weight) + self.bias
        return (x @ self.weight.reshape(G * V, -1).t() + self.bias.reshape(-1)).unflatten(-1, (G, V))

    def forward(self, x: Tensor, tau: float, generator: torch.Generator | None = None) -> QuantOut:
        """x (N, in_dim) -> QuantOut. Training: hard Gumbel-softmax samples with straight-through
        gradients (noise from `generator`, so a resumed run draws the same codes); evaluation: argmax."""
        if x.dim() != 2:
            raise ValueError(f"quantizer: expected (N, D) rows, found {tuple(x.shape)}")
        logits = self.logits(x).float()
        idx = logits.argmax(-1)
        hard = F.one_hot(idx, self.entries).to(logits.dtype)
        code_ppl = _perplexity(hard.mean(0)) if x.shape[0] else logits.new_zeros(())
        soft = logits.softmax(-1)
        prob_ppl = _perplexity(soft.mean(0)) if x.shape[0] else logits.new_zeros(())
        if self.training:
            u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
            gumbels = -torch.log((-torch.log(u.clamp_min(1e-10))).clamp_min(1e-10))  # F.gumbel_softmax's noise
            y = ((logits + gumbels) / tau).softmax(-1)
            idx = y.argmax(-1)
            choice = F.one_hot(idx, self.entries).to(y.dtype)
            choice = choice - y.detach() + y  # straight-through
        else:
            choice = hard
        codes = torch.einsum("ngv,gvc->ngc", choice.to(self.codebook.dtype), self.codebook).flatten(1)
        n_vars = self.groups * self.entries
        return QuantOut(codes=codes, indices=idx, prob_perplexity=prob_ppl, code_perplexity=code_ppl,
                        diversity=(n_vars - prob_ppl) / n_vars)
