"""The reversible engine: additive coupling over two residual streams, run as one autograd Function.

One block, with F = attention sublayer and G = feed-forward sublayer::

    y1 = x1 + F(x2)
    y2 = x2 + G(y1)
    # inverse, used in backward:
    x2 = y2 - G(y1)
    x1 = y1 - F(x2)

`ReversibleStack.apply` runs every block under `no_grad` and saves only the top outputs. Its backward walks the
blocks in reverse and re-runs G, then F, once each with grad enabled: the same re-run rebuilds the block's inputs
and yields its gradients, so the price is one extra forward per sublayer and activation memory does not depend on
depth.

Parameters are inputs of the Function and their gradients are its outputs (computed with `torch.autograd.grad`,
never `.backward()` inside backward). Autograd therefore accumulates each parameter's gradient exactly once, through
its ordinary `AccumulateGrad` node, which is what DDP's reducer expects with `find_unused_parameters` True or False.

Pure torch: this file goes to the Hub beside the model code and must not import revformer or transformers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn


class ForwardContext:
    """Everything that can make a sublayer's re-run differ from its first run, captured just before the first run.

    That is the RNG state (dropout masks, LSH rotations) of the CPU and of the stream's CUDA device, and the
    autocast state. `replay()` restores both inside a forked RNG scope, so the caller's RNG stream is left exactly
    where the forward pass left it.
    """

    def __init__(self, device: torch.device, capture_rng: bool) -> None:
        self.device_type = device.type
        self.cuda_device = device if device.type == "cuda" else None
        self.capture_rng = capture_rng
        if capture_rng:
            self.cpu_rng = torch.get_rng_state()
            self.cuda_rng = torch.cuda.get_rng_state(device) if self.cuda_device is not None else None
        self.autocast_enabled = torch.is_autocast_enabled(self.device_type)
        self.autocast_dtype = torch.get_autocast_dtype(self.device_type)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        devices = [self.cuda_device] if self.cuda_device is not None else []
        with torch.random.fork_rng(devices=devices, enabled=self.capture_rng):
            if self.capture_rng:
                torch.set_rng_state(self.cpu_rng)
                if self.cuda_device is not None:
                    torch.cuda.set_rng_state(self.cuda_rng, self.cuda_device)
            with torch.autocast(self.device_type, dtype=self.autocast_dtype, enabled=self.autocast_enabled):
                yield


class StreamCoupling:
    """How a sublayer's output joins a residual stream: `y = x + out` and its exact inverse `x = y - out`.

    Streams are kept in fp32 (or whatever dtype they arrive in) even when F and G compute in bf16/fp16 under
    autocast, so the reconstruction error is that of one fp32 add/subtract per sublayer.
    """

    def encode(self, x: Tensor) -> Tensor:
        """A float activation as a stream (where the embedding enters)."""
        return x.float()

    def decode(self, stream: Tensor) -> Tensor:
        """A stream as a float activation (where the streams are merged for the LM head)."""
        return stream

    def add(self, stream: Tensor, out: Tensor) -> Tensor:
        return stream + out.to(stream.dtype)

    def subtract(self, stream: Tensor, out: Tensor) -> Tensor:
        return stream - out.to(stream.dtype)

    def read(self, stream: Tensor) -> Tensor:
        """The value a sublayer sees when it reads `stream`."""
        return stream


def _sublayer_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _grads_or_zeros(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> list[Tensor]:
    # A parameter that did not influence this sublayer still gets a (zero) gradient, so every parameter handed to the
    # Function receives one and DDP's reducer never waits on a missing hook.
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _rerun_feed_forward(
    g: nn.Module, g_ctx: ForwardContext, coupling: StreamCoupling, y1: Tensor, y2: Tensor, dy2: Tensor
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Re-run G on y1 with grad; return (x2 = y2 - G(y1), (dG/dy1)^T dy2, parameter gradients).

    G is position-wise, so when it declares `chunk_size` > 0 the re-run goes chunk by chunk along the sequence and
    its intermediate activation never exists for the whole sequence, in backward as in forward. The chunks run in
    forward order inside one RNG replay, so dropout draws match the forward pass.
    """
    params = _sublayer_params(g)
    seq_len = y1.shape[1]
    chunk = getattr(g, "chunk_size", 0) or seq_len
    x2_parts, dy1_parts = [], []
    param_grads: list[Tensor | None] = [None] * len(params)
    with g_ctx.replay():
        for start in range(0, seq_len, chunk):
            piece = slice(start, start + chunk)
            with torch.enable_grad():
                y1_leaf = y1[:, piece].detach().requires_grad_()
                g_out = g(coupling.read(y1_leaf))
            grads = torch.autograd.grad(
                g_out, (y1_leaf, *params), dy2[:, piece].to(g_out.dtype), allow_unused=True
            )
            with torch.no_grad():
                x2_parts.append(coupling.subtract(y2[:, piece], g_out))
            dy1_parts.append(grads[0].to(dy2.dtype))
            param_grads = [a if b is None else (b if a is None else a + b) for a, b in zip(param_grads, grads[1:])]
            del g_out
    return torch.cat(x2_parts, dim=1), torch.cat(dy1_parts, dim=1), _grads_or_zeros(param_grads, params)


class ReversibleStack(torch.autograd.Function):
    """`(x1, x2) -> (y1, y2)` through `blocks`, each with `.f` (attention) and `.g` (feed-forward) sublayers.

    Call as `ReversibleStack.apply(x1, x2, blocks, coupling, capture_rng, num_aux, *aux, *params)`: `aux` are extra
    tensors every F receives (rotary cos/sin, padding mask; no gradient flows to them), `params` are all trainable
    parameters of `blocks` in `reversible_params(blocks)` order.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x1: Tensor,
        x2: Tensor,
        blocks: Sequence[nn.Module],
        coupling: StreamCoupling,
        capture_rng: bool,
        num_aux: int,
        *aux_and_params: Tensor,
    ) -> tuple[Tensor, Tensor]:
        aux = aux_and_params[:num_aux]
        f_contexts, g_contexts = [], []
        with torch.no_grad():
            for block in blocks:
                f_contexts.append(ForwardContext(x1.device, capture_rng))
                y1 = coupling.add(x1, block.f(coupling.read(x2), *aux))  # y1 = x1 + F(x2)
                g_contexts.append(ForwardContext(x1.device, capture_rng))
                y2 = coupling.add(x2, block.g(coupling.read(y1)))  # y2 = x2 + G(y1)
                x1, x2 = y1, y2
        ctx.blocks, ctx.coupling = blocks, coupling
        ctx.f_contexts, ctx.g_contexts = f_contexts, g_contexts
        ctx.num_aux = num_aux
        ctx.save_for_backward(x1, x2, *aux)
        return x1, x2

    @staticmethod
    def backward(ctx: Any, dy1: Tensor, dy2: Tensor) -> tuple[Tensor | None, ...]:
        y1, y2, *aux = ctx.saved_tensors
        coupling: StreamCoupling = ctx.coupling
        param_grads: list[list[Tensor]] = []
        for block, f_ctx, g_ctx in zip(
            reversed(ctx.blocks), reversed(ctx.f_contexts), reversed(ctx.g_contexts)
        ):
            # --- G: x2 = y2 - G(y1); dL/dy1 += (dG/dy1)^T dL/dy2 ---
            x2, dy1_from_g, g_grads = _rerun_feed_forward(block.g, g_ctx, coupling, y1, y2, dy2)
            dy1 = dy1 + dy1_from_g

            # --- F: x1 = y1 - F(x2); dL/dx2 = dL/dy2 + (dF/dx2)^T dL/dy1 ---
            f_params = _sublayer_params(block.f)
            with torch.enable_grad(), f_ctx.replay():
                x2_leaf = x2.detach().requires_grad_()
                f_out = block.f(coupling.read(x2_leaf), *aux)
            grads = torch.autograd.grad(f_out, (x2_leaf, *f_params), dy1.to(f_out.dtype), allow_unused=True)
            with torch.no_grad():
                x1 = coupling.subtract(y1, f_out)
            del f_out
            dx2 = dy2 + grads[0].to(dy2.dtype)
            f_grads = _grads_or_zeros(grads[1:], f_params)

            param_grads.append(f_grads + g_grads)
            y1, y2, dy1, dy2 = x1, x2, dy1, dx2

        flat_param_grads = [g for block_grads in reversed(param_grads) for g in block_grads]
        no_grads = (None,) * (4 + ctx.num_aux)  # blocks, coupling, capture_rng, num_aux, *aux
        return (dy1, dy2, *no_grads, *flat_param_grads)


def make_coupling(stream_dtype: str = "float32", fraction_bits: int = 32) -> StreamCoupling:
    """The coupling for `RevformerConfig.stream_dtype`."""
    if stream_dtype == "float32":
        return StreamCoupling()
    raise NotImplementedError(f"stream_dtype={stream_dtype!r} is not implemented yet")


def reversible_params(blocks: Sequence[nn.Module]) -> list[nn.Parameter]:
    """The parameters `ReversibleStack` takes, in the order its backward returns their gradients."""
    return [p for block in blocks for sub in (block.f, block.g) for p in _sublayer_params(sub)]


def reversible_stack(
    x1: Tensor,
    x2: Tensor,
    blocks: Sequence[nn.Module],
    aux: Sequence[Tensor | None] = (),
    coupling: StreamCoupling | None = None,
    capture_rng: bool = True,
) -> tuple[Tensor, Tensor]:
    """Run `blocks` reversibly: activation memory independent of `len(blocks)`.

    `capture_rng=False` skips the RNG snapshots when no sublayer draws random numbers (no dropout, no LSH).
    """
    params = reversible_params(blocks)
    return ReversibleStack.apply(
        x1, x2, tuple(blocks), coupling or StreamCoupling(), capture_rng, len(aux), *aux, *params
    )
