"""Sequence parallelism: one sequence over the P ranks of an `sp` group, Ulysses style (head parallel attention).

Each rank holds a contiguous slice of every sequence, T / P tokens, for everything position-wise: the embedding,
the norms, the feed-forward, both residual streams and the chunked loss. Attention is the one place where tokens
meet, so around its kernel an all-to-all turns (my tokens, all heads) into (all tokens, my heads); the kernel
(`full`, `local`, `lsh`, with padding, packed documents and grouped-query heads) runs unchanged on the whole sequence
for H / P heads, and a second all-to-all turns its output back. The all-to-all is an autograd Function whose
backward sends each gradient back the way its value came, so the reversible engine stays per rank: its re-run in
backward repeats both, as it repeats every other op of the sublayer.

What attention needs of the whole sequence (padding mask, positions, packed-document ids) is gathered once per
forward: small integer tensors. Labels are shifted on the whole sequence before each rank takes its slice, and each
rank's loss is P x (its summed loss) / (the group's token count), so that the mean over the group's ranks, which the
gradient reduction of DDP or FSDP2 over all (dp x sp) ranks takes, is the mean over the whole sequence.

The model code does not import this file (the model files go to the Hub alone): the model, its attention layers
and its LM head each have a `sequence_parallel` attribute, None by default, which `set_sequence_parallel` fills.
Without it the model is the ordinary single-device model (generation, pipelines, evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .loss import IGNORE_INDEX

__all__ = [
    "SequenceParallel",
    "all_to_all",
    "build_mesh",
    "check_heads",
    "sequence_parallel_off",
    "set_sequence_parallel",
]


def _exchange(send: Tensor, group: dist.ProcessGroup) -> Tensor:
    """send (P, ...), send[r] for rank r -> received (P, ...), received[r] from rank r (gloo has only this form)."""
    send = send.contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return received


class _AllToAll(torch.autograd.Function):
    # The exchange is its own adjoint: the gradient of what rank r received from rank s goes back from r to s.
    @staticmethod
    def forward(ctx, send: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return _exchange(send, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _exchange(grad, ctx.group), None


def all_to_all(send: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Differentiable all-to-all over `group`: send (P, ...) whose send[r] goes to rank r -> (P, ...) whose [r] came
    from rank r."""
    return _AllToAll.apply(send, group)


def check_heads(num_heads: int, num_kv_heads: int, size: int) -> None:
    """Ulysses gives every rank num_heads / P query heads; key/value heads are split likewise, or replicated when
    their count does not divide by P (grouped-query attention with fewer key/value heads than ranks)."""
    if num_heads % size:
        raise ValueError(
            f"num_attention_heads={num_heads} is not divisible by sequence_parallel_size={size}: each rank of the "
            f"sp group attends with num_attention_heads / sequence_parallel_size heads. Use a sequence_parallel_size "
            f"that divides {num_heads} (and put the other ranks in data parallelism)."
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}.")


class SequenceParallel:
    """The `sp` group a model runs over, and the collectives the model calls on it."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def __repr__(self) -> str:
        return f"SequenceParallel(rank {self.rank} of {self.size})"

    def local(self, x: Tensor | None, dim: int = 1) -> Tensor | None:
        """This rank's contiguous slice of a whole-sequence tensor (the sequence along `dim`)."""
        if x is None:
            return None
        if x.shape[dim] % self.size:
            raise ValueError(f"A sequence of {x.shape[dim]} tokens does not split into {self.size} equal slices; "
                             f"use a length divisible by sequence_parallel_size={self.size}.")
        return x.chunk(self.size, dim=dim)[self.rank]

    def gather(self, x: Tensor | None, dim: int = 1) -> Tensor | None:
        """The whole sequence of a sliced, non-differentiable tensor (masks, positions, labels), in rank order."""
        if x is None:
            return None
        x = x.contiguous()
        wire = x.long() if x.dtype == torch.bool else x  # gloo has no bool
        parts = [torch.empty_like(wire) for _ in range(self.size)]
        dist.all_gather(parts, wire, group=self.group)
        return torch.cat(parts, dim=dim).to(x.dtype)

    def scatter_heads(self, qkv: Tensor, split: list[int]) -> tuple[Tensor, list[int]]:
        """(B, t, heads, D), the heads of queries, keys, values side by side as `split` says -> (B, T, heads / P, D)
        and the local split: this rank's heads of each, for the whole sequence. Key/value heads that do not divide by
        P are first replicated (each serves fewer query heads), as few times as makes them divide."""
        p = self.size
        parts = list(qkv.split(split, dim=2))
        if parts[-1].shape[2] % p:  # grouped-query heads: repeat each kv head r times (r divides the group)
            r = p // math.gcd(parts[-1].shape[2], p)
            parts = parts[:1] + [x.repeat_interleave(r, dim=2) for x in parts[1:]]
        local = [x.shape[2] // p for x in parts]
        # (P, B, t, heads / P, D): rank r's queries, keys and values in [r] (one copy, the buffer sent).
        send = torch.cat([x.unflatten(2, (p, -1)).movedim(2, 0) for x in parts], dim=3)
        received = all_to_all(send, self.group)  # [r]: rank r's tokens
        return received.movedim(0, 1).flatten(1, 2), local  # a view of what was received when B == 1

    def gather_heads(self, out: Tensor) -> Tensor:
        """(B, T, H / P, D) -> (B, t, H, D): the attention output of this rank's tokens, every head."""
        received = all_to_all(out.unflatten(1, (self.size, -1)).movedim(1, 0), self.group)  # [r]: rank r's heads
        return received.permute(1, 2, 0, 3, 4).flatten(2, 3)

    def shift_labels(self, labels: Tensor) -> Tensor:
        """This rank's slice of the next-token targets: shifted on the whole sequence, so a slice's last position
        predicts the next slice's first token."""
        whole = self.gather(labels)
        return self.local(F.pad(whole[:, 1:], (0, 1), value=IGNORE_INDEX))

    def loss_denominator(self, shift_labels: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
        """(tokens predicted in the whole sequences) / P: each rank's loss is then P x its share of the mean, and the
        mean over the group is the mean over every token. `num_items_in_batch`, when given, counts the whole
        sequences' tokens."""
        if num_items_in_batch is None:
            count = (shift_labels != IGNORE_INDEX).sum().to(torch.float32)
            dist.all_reduce(count, group=self.group)
        else:
            count = torch.as_tensor(num_items_in_batch, dtype=torch.float32)
        return count / self.size


def build_mesh(sp_size: int, device_type: str) -> dist.DeviceMesh:
    """A (dp, sp) DeviceMesh of the whole world: rank = dp_rank * sp_size + sp_rank, so an sp group is consecutive
    ranks (one node's devices, for the all-to-alls) and the dp rank, which picks the batch, is rank // sp_size."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if sp_size < 1 or world % sp_size:
        raise ValueError(f"sequence_parallel_size={sp_size} does not divide the {world} processes; launch a multiple "
                         f"of it (processes = data-parallel size x sequence_parallel_size).")
    return init_device_mesh(device_type, (world // sp_size, sp_size), mesh_dim_names=("dp", "sp"))


def set_sequence_parallel(model: nn.Module, sp: SequenceParallel | None) -> SequenceParallel | None:
    """Run `model` (a revformer model, possibly wrapped by DDP or FSDP2) over `sp`, or on whole sequences with None;
    returns what it ran over before. Checks the attention heads against the group size."""
    previous = None
    for module in model.modules():
        if not hasattr(module, "sequence_parallel"):
            continue
        if sp is not None and hasattr(module, "num_kv_heads"):
            check_heads(module.num_heads, module.num_kv_heads, sp.size)
        previous = module.sequence_parallel
        module.sequence_parallel = sp
    return previous


@contextmanager
def sequence_parallel_off(model: nn.Module) -> Iterator[None]:
    """Whole sequences on each rank inside the block (evaluation, the reconstruction check), as before after it."""
    previous = set_sequence_parallel(model, None)
    try:
        yield
    finally:
        set_sequence_parallel(model, previous)
