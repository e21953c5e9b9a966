"""Coupling topologies of the measured revformer variants that no config field describes: how the hidden state is
read from the top two streams, and how the embedding enters them. Each is passed as
``RevformerForCausalLM(config, coupling=...)``; the sublayers themselves are revformer's ``sublayer`` blocks.

- ``MeanMerge``: the hidden state is the mean of the top streams, ``(y1 + y2) / 2`` (``revformer_mean``, the base
  of the depth-quality ablations);
- ``LearnedMerge``: ``w1 * y1 + w2 * y2`` with per-channel weights learned from 0.5, on top of the mean merge;
- ``EmbedOne``: the embedding feeds one stream (``x1 = 0, x2 = embedding``), on top of the mean merge.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from revformer.modeling_revformer import SublayerCoupling


class MeanMerge(SublayerCoupling):
    """The hidden state is the mean of the two top streams."""

    def output(self, x1: Tensor, x2: Tensor) -> Tensor:
        return (x1 + x2) / 2


class LearnedMerge(nn.Module, SublayerCoupling):
    """The hidden state is `weight1 * y1 + weight2 * y2`, per-channel weights from 0.5 (the mean) trained with the
    model."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight1 = nn.Parameter(torch.full((hidden_size,), 0.5))
        self.weight2 = nn.Parameter(torch.full((hidden_size,), 0.5))

    def output(self, x1: Tensor, x2: Tensor) -> Tensor:
        return self.weight1 * x1 + self.weight2 * x2


class EmbedOne(MeanMerge):
    """The embedding feeds the second stream only (attention reads it first); the first starts at zero."""

    def inputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(x), x


def topology(model: str, hidden_size: int) -> SublayerCoupling | None:
    """The coupling topology of the benchmark model `model` (a name of benchmarks.models), or None for the one its
    config names."""
    topologies = {
        "revformer_mean": MeanMerge,
        "revformer_merge_newest": SublayerCoupling,  # revformer's own output: the newest stream
        "revformer_merge_learned": lambda: LearnedMerge(hidden_size),
        "revformer_embed_one": EmbedOne,
        "revformer_scaled_init": MeanMerge,  # the initialisation differs (benchmarks.models.scale_output_init)
    }
    return topologies[model]() if model in topologies else None
