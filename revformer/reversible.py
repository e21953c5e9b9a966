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

A sublayer may also scale the stream it updates: returning `(out, keep)` makes the join `y = keep * x + out`
(the `bdia` coupling, with keep = +-2^-m drawn per sample), whose inverse `x = (y - out) / keep` the engine uses
instead, with `dL/dx = keep * dL/dy`.

How a sublayer output joins a stream is the stream arithmetic's (`StreamArithmetic`). With float streams
`(x + out) - out != x` in general and the rebuilt inputs drift from the true ones, more so with depth, low-precision
compute and large weights. With `FixedPointArithmetic` the streams live on a grid of 2^-k and every output is
rounded to it before the add, so the subtraction undoes the addition bit for bit and the reversible gradients equal
those of plain backprop.

The engine calls each sublayer exactly once per pass and knows nothing else about it. A sublayer that bounds its own
memory does so inside that call: `chunked` runs a position-wise function a chunk of the sequence at a time, and
because the engine announces the gradient each re-run's output will receive (`upstream_gradient`), the chunks
compute their outputs and gradients together, with no recompute. While a re-run's backward runs, the engine holds
no more than it must: the stream the sublayer read is parked (`StreamArithmetic.park`: a fixed-point stream as the
fp32 copy the sublayer reads anyway plus an int32 correction), and the sublayer's output, once the stream below has
been rebuilt from it, is freed unless autograd saved it (`SavedStorages`). The gradient of the newest stream is
carried in place through the backward, in a copy that a hook makes of the gradient arriving there (autograd holds the
arriving one until the backward returns); in the forward, the encoded input streams are the first joins' to overwrite.

Parameters are inputs of the Function and their gradients are its outputs (computed with `torch.autograd.grad`,
never `.backward()` inside backward). Autograd therefore accumulates each parameter's gradient exactly once, through
its ordinary `AccumulateGrad` node, which is what DDP's reducer expects with `find_unused_parameters` True or False.
Under FSDP2 the sublayers' parameters are sharded and gathered only around each call, so they cannot be inputs:
there the re-run is back-propagated with an ordinary (nested) backward, whose gradients FSDP's own hooks
reduce-scatter once per re-run; FSDP has no reducer that a nested backward could confuse.

Pure torch: this file goes to the Hub beside the model code and must not import revformer or transformers.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

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
        self.residue: Any = None  # what a scaled join's inverse needs beyond the streams (fixed point), if any

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


class StreamArithmetic:
    """How a sublayer's output joins a residual stream: `y = x + out` and its inverse `x = y - out`.

    Streams are kept in fp32 (or whatever dtype they arrive in) even when F and G compute in bf16/fp16 under
    autocast, so the reconstruction error is that of one fp32 add/subtract per sublayer.
    """

    # Streams must stay below this magnitude for `subtract` to undo `add` exactly; inf: nothing to check.
    limit: float = math.inf

    def encode(self, x: Tensor) -> Tensor:
        """A float activation as a stream (where the embedding enters)."""
        return x.float()

    def decode(self, stream: Tensor) -> Tensor:
        """A stream as a float activation (where the streams are merged for the LM head)."""
        return stream

    # `inplace`: the result may be written into the stream's own memory (the engine passes it for streams it owns).
    def add(self, stream: Tensor, out: Tensor, inplace: bool = False) -> Tensor:
        return stream.add_(out.to(stream.dtype)) if inplace else stream + out.to(stream.dtype)

    def subtract(self, stream: Tensor, out: Tensor, inplace: bool = False) -> Tensor:
        return stream.sub_(out.to(stream.dtype)) if inplace else stream - out.to(stream.dtype)

    def join(self, stream: Tensor, out: Tensor, keep: Tensor | None = None, invertible: bool = True,
             inplace: bool = False) -> tuple[Tensor, Any]:
        """`y = keep * stream + out` (`keep=None`: `stream + out`), and what `unjoin` needs beyond y, out and keep
        to rebuild `stream`. `invertible=False`: nothing will be rebuilt (the plain path), so nothing is kept.
        `inplace`: y may overwrite `stream` (never on a path that differentiates through the join)."""
        if keep is None:
            return self.add(stream, out, inplace), None
        return self.scaled_join(stream, out, keep, invertible, inplace)

    def unjoin(self, y: Tensor, out: Tensor, keep: Tensor | None = None, residue: Any = None,
               inplace: bool = False) -> Tensor:
        """The `stream` of `y, residue = join(stream, out, keep)`; `inplace`: written over `y`."""
        if keep is None:
            return self.subtract(y, out, inplace)
        return self.scaled_unjoin(y, out, keep, residue, inplace)

    # With float streams the division in the inverse is merely rounded, and nothing is kept beside the streams.
    def scaled_join(self, stream: Tensor, out: Tensor, keep: Tensor, invertible: bool, inplace: bool = False
                    ) -> tuple[Tensor, Any]:
        return self.add(stream.mul_(keep) if inplace else keep * stream, out, inplace=True), None

    def scaled_unjoin(self, y: Tensor, out: Tensor, keep: Tensor, residue: Any, inplace: bool = False) -> Tensor:
        return self.subtract(y, out, inplace).div_(keep)

    def read(self, stream: Tensor) -> Tensor:
        """The value a sublayer sees when it reads `stream`: a cast at most, since the engine differentiates with
        respect to this value and treats `read`'s own gradient as the identity."""
        return stream

    def check_range(self, peak: Tensor) -> None:
        """Raise if a stream reached `peak` = max |value|, which this arithmetic cannot hold exactly."""

    # While a sublayer re-runs, the stream it read is needed only after its backward. A stream whose `read` is a copy
    # can meanwhile be held as that copy and whatever the copy lost: `park` frees the stream's memory and returns
    # what `unpark` needs, with `read`, to rebuild it bit for bit. Float streams are read as they are: nothing to do.
    def park(self, stream: Tensor, read: Tensor) -> Any:
        return None

    def unpark(self, stream: Tensor, read: Tensor, parked: Any) -> None:
        """Restore `stream`'s values after `park` (in its own memory, which `park` freed)."""


class Fp32Gradient(torch.autograd.Function):
    """The identity, whose gradient is rounded to fp32: on the plain path, a float64 fixed-point stream's gradient
    is what the reversible engine carries for it (fp32, the dtype the sublayers read), so both paths agree."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.float().to(grad.dtype)


class FixedPointArithmetic(StreamArithmetic):
    """Streams on a fixed-point grid of 2^-k (k = `fraction_bits`): exactly invertible at any compute precision.

    A stream is a float64 tensor holding integer multiples of 2^-k below `limit` = 2^(53-k) in magnitude, i.e. a
    signed integer count of grid steps that fits float64's 53-bit significand. The sum of two such values is again
    such an integer, so float64 adds and subtracts them exactly (an integer adder); each sublayer output is rounded to
    the grid before it joins a stream, and `(x + q) - q == x` bit for bit. Float64 rather than int64 because
    autograd needs floats: the plain path and the engine's inputs share one representation.

    Gradients pass through the rounding unchanged (straight-through). F and G read the stream rounded to fp32, as
    with float32 streams, and a stream's gradient is fp32 too: the engine carries fp32 gradients (half the bytes of
    float64 ones), and the plain path rounds each stream's gradient to fp32 (`Fp32Gradient`), so the reversible
    path's gradients equal the plain path's run on the same streams.

    k = 32 (the default) gives a step of 2.3e-10, finer than fp32's spacing for any |x| > 2^-8, and a limit of
    2^21 ~ 2.1e6, far above realistic activations. Only the reversible engine checks the limit (`check_range`, once
    per forward): the plain path does not rely on exactness, and past the limit it merely rounds like float64.
    """

    def __init__(self, fraction_bits: int = 32, keep_bits: int = 1) -> None:
        if not 1 <= keep_bits <= 8:
            raise ValueError(f"keep_bits must be in [1, 8] (scaled joins keep +-2^-keep_bits), got {keep_bits}")
        self.keep_bits = keep_bits
        if not 1 <= fraction_bits <= 52:
            raise ValueError(
                f"fraction_bits must be in [1, 52] (float64 has a 53-bit significand), got {fraction_bits}"
            )
        self.fraction_bits = fraction_bits
        self.scale = 2.0**fraction_bits
        self.step = 2.0**-fraction_bits
        self.limit = 2.0 ** (53 - fraction_bits)

    def _straight_through(self, x: Tensor) -> bool:
        return x.requires_grad and torch.is_grad_enabled()

    def grid_steps(self, x: Tensor) -> Tensor:
        """round(x * 2^k): the nearest grid point to `x`, counted in steps of 2^-k (integer-valued, no gradient)."""
        # In fp32 (fp64 for fp64 input): scaling by 2^k is exact there and the rounded value is exactly
        # representable, while fp16 would overflow at 2^k. A copy, since mul_/round_ must not touch `x` itself.
        wide = x.detach().to(torch.promote_types(x.dtype, torch.float32), copy=True)
        return wide.mul_(self.scale).round_()

    def to_grid(self, x: Tensor) -> Tensor:
        """`x` rounded to the nearest multiple of 2^-k, as float64; its gradient is the identity (straight-through)."""
        grid = self.grid_steps(x).double().mul_(self.step)  # q = round(x * 2^k) * 2^-k, exact
        if self._straight_through(x):
            # x - x.detach() is exactly 0, so the value stays q while autograd sees dq/dx = 1; the float64 gradient
            # is cast straight to x's dtype, as the engine casts dL/dy for its re-run.
            grid = grid + (x - x.detach()).double()
        return grid

    def encode(self, x: Tensor) -> Tensor:
        return self.to_grid(x)

    def decode(self, stream: Tensor) -> Tensor:
        return stream.float()

    # Without grad (the engine) the add is one fused pass, stream + grid_steps * 2^-k in float64; with grad (the plain
    # path) it goes through to_grid for the straight-through gradient. Both are exact, hence bit-identical.
    def add(self, stream: Tensor, out: Tensor, inplace: bool = False) -> Tensor:
        if self._straight_through(out):
            return Fp32Gradient.apply(stream + self.to_grid(out))
        if self._straight_through(stream):
            return Fp32Gradient.apply(torch.add(stream, self.grid_steps(out), alpha=self.step))
        # y = x + round(out * 2^k) * 2^-k
        return by_rows(stream, inplace, lambda p: torch.add(stream[:, p], self.grid_steps(out[:, p]), alpha=self.step))

    def subtract(self, stream: Tensor, out: Tensor, inplace: bool = False) -> Tensor:
        if self._straight_through(out):
            return stream - self.to_grid(out)
        # x = y - round(out * 2^k) * 2^-k
        return by_rows(stream, inplace, lambda p: torch.sub(stream[:, p], self.grid_steps(out[:, p]), alpha=self.step))

    # A scaled join `y = keep * x + out`, keep = +-2^-m (m = keep_bits) or 0, stays exact by splitting x (n grid
    # steps) into n - r and the residue r = n mod 2^m: keep * (n - r) steps is again a whole number of steps, and r,
    # m bits per element that the division would lose, is kept packed beside the top streams (m/8 bytes per element
    # and scaled join, against 4 for a stored fp32 activation).
    def _residue_steps(self, stream: Tensor) -> Tensor:
        return torch.remainder(stream.detach() * self.scale, 2.0**self.keep_bits)

    def scaled_join(self, stream: Tensor, out: Tensor, keep: Tensor, invertible: bool, inplace: bool = False
                    ) -> tuple[Tensor, Any]:
        if not (self._straight_through(stream) or self._straight_through(out)):
            return self._scaled_join_by_rows(stream, out, keep, invertible, inplace)
        residue = self._residue_steps(stream)
        kept = keep.to(stream.dtype) * (stream - residue * self.step)  # exact; gradient keep (straight-through)
        return self.add(kept, out), pack_residue(residue, self.keep_bits) if invertible else None

    def _scaled_join_by_rows(self, stream: Tensor, out: Tensor, keep: Tensor, invertible: bool, inplace: bool
                             ) -> tuple[Tensor, Any]:
        """The same join without autograd, a block of rows at a time: y = (n - r) * keep * 2^-k + round(out * 2^k)
        * 2^-k for n = x * 2^k, every step exact, so no whole-stream float64 temporary exists."""
        residue = torch.empty(stream.shape, dtype=torch.uint8, device=stream.device) if invertible else None
        factor = keep.to(stream.dtype) * self.step

        def rows(p: slice) -> Tensor:
            n = stream[:, p] * self.scale
            r = torch.remainder(n, 2.0**self.keep_bits)
            if residue is not None:
                residue[:, p] = r
            return n.sub_(r).mul_(factor).add_(self.grid_steps(out[:, p]), alpha=self.step)

        y = by_rows(stream, inplace, rows)
        return y, pack_residue(residue, self.keep_bits) if invertible else None

    def scaled_unjoin(self, y: Tensor, out: Tensor, keep: Tensor, residue: Any, inplace: bool = False) -> Tensor:
        if residue is None:
            raise ValueError("Inverting a scaled fixed-point join needs the residue that join() returned.")
        r, factor = unpack_residue(residue), keep.to(y.dtype)
        # A block of rows at a time, each step exact: (y - q) / keep + r * 2^-k.
        return by_rows(y, inplace, lambda p: torch.sub(y[:, p], self.grid_steps(out[:, p]), alpha=self.step)
                       .div_(factor).add_(r[:, p], alpha=self.step))

    def read(self, stream: Tensor) -> Tensor:
        return stream.float()

    # A float64 stream x on the grid and its fp32 rounding f differ by x - f, a whole number of grid steps below 2^29
    # in magnitude (|x - f| <= ulp_fp32(x) / 2 <= 2^(29 - k) under the limit 2^(53 - k)), so an int32 holds it
    # exactly: parked, the stream costs 4 bytes per element beside the read copy the sublayer holds anyway, not 8.
    def park(self, stream: Tensor, read: Tensor) -> Any:
        if stream.dtype != torch.float64 or read.dtype != torch.float32 or read.shape != stream.shape:
            return None
        correction = torch.empty(stream.shape, dtype=torch.int32, device=stream.device)
        for p in _pieces(stream.shape[1], _rows_per_block(stream)):
            correction[:, p] = (stream[:, p] - read[:, p].double()).mul_(self.scale)
        nbytes = stream.untyped_storage().nbytes()
        stream.untyped_storage().resize_(0)
        return correction, nbytes

    def unpark(self, stream: Tensor, read: Tensor, parked: Any) -> None:
        if parked is None:
            return
        correction, nbytes = parked
        stream.untyped_storage().resize_(nbytes)
        for p in _pieces(stream.shape[1], _rows_per_block(stream)):
            stream[:, p] = torch.add(read[:, p].double(), correction[:, p].double(), alpha=self.step)

    def check_range(self, peak: Tensor) -> None:
        value = peak.item()
        k = self.fraction_bits
        if not math.isfinite(value):
            raise FloatingPointError(
                f"Fixed-point residual stream received a non-finite sublayer output (max |stream| = {value}): the "
                f"model diverged or the compute dtype overflowed. Fewer stream_fraction_bits will not help; lower the "
                f"learning rate or check the inputs."
            )
        if value >= self.limit:
            raise OverflowError(
                f"Fixed-point residual stream out of range: max |stream| = {value:.6g} reached the limit "
                f"{self.limit:.6g} = 2^{53 - k} of a 2^-{k} grid (stream_fraction_bits={k}), beyond which the "
                f"reversible coupling is no longer exact. Use fewer stream_fraction_bits (each bit fewer doubles the "
                f"limit), e.g. stream_fraction_bits={max(1, 52 - math.ceil(math.log2(value)))}."
            )


ROW_BLOCK_ELEMENTS = 2**20  # what `by_rows` computes at a time: 8 MiB of float64


def by_rows(y: Tensor, inplace: bool, compute: Any) -> Tensor:
    """A tensor shaped like `y` (y itself when `inplace`) filled with `compute(p)` for blocks `p` of dim 1, so that
    the temporaries behind it exist for one block. `compute` may read y's block: it runs before the block is written.
    Streams are (batch, tokens, ...): blocks of tokens."""
    result = y if inplace else torch.empty_like(y)
    for p in _pieces(y.shape[1], _rows_per_block(y)):
        result[:, p] = compute(p)
    return result


def _rows_per_block(y: Tensor) -> int:
    return max(1, ROW_BLOCK_ELEMENTS // max(1, y[:, :1].numel()))


def _extremes(stream: Tensor) -> Tensor:
    """(min, max) of `stream` as a 2-element float64 tensor on its device; NaN if any element is NaN."""
    # aminmax: one fused reduction without an |x| temporary (on CPU 2x faster than abs().amax(), 5x than norm(inf)).
    return torch.stack(torch.aminmax(stream)).double()


class PackedResidue(NamedTuple):
    """Integers in [0, 2^bits) of a given shape, as `bits` bit planes packed 8 elements per byte."""

    planes: Tensor  # (bits, ceil(numel / 8)) uint8
    shape: torch.Size


_BIT_WEIGHTS: dict[torch.device, Tensor] = {}


def _bit_weights(device: torch.device) -> Tensor:
    if device not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[device] = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)
    return _BIT_WEIGHTS[device]


def pack_residue(residue: Tensor, bits: int) -> PackedResidue:
    """`residue` (integer-valued, in [0, 2^bits)) packed to `bits` / 8 bytes per element."""
    flat = residue.reshape(-1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8)).view(-1, 8)
    weights = _bit_weights(flat.device)
    planes = torch.stack([((flat >> b) & 1).mul_(weights).sum(-1, dtype=torch.uint8) for b in range(bits)])
    return PackedResidue(planes, residue.shape)


def unpack_residue(packed: PackedResidue) -> Tensor:
    """The residue that `pack_residue` packed, as uint8 (one byte per element; integers below 2^bits <= 256)."""
    weights = _bit_weights(packed.planes.device)
    values = torch.zeros(packed.planes.shape[1], 8, dtype=torch.uint8, device=packed.planes.device)
    for b, plane in enumerate(packed.planes):
        values |= ((plane.unsqueeze(-1) & weights) != 0).to(torch.uint8) << b
    return values.reshape(-1)[: packed.shape.numel()].view(packed.shape)


def split_output(result: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
    """A sublayer's `out`, or `(out, keep)` when it also scales the stream it updates."""
    return result if isinstance(result, tuple) else (result, None)


def _sublayer_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _grads_or_zeros(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> list[Tensor]:
    # A parameter that did not influence this sublayer still gets a (zero) gradient, so every parameter handed to the
    # Function receives one and DDP's reducer never waits on a missing hook.
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def is_sharded(blocks: Sequence[nn.Module]) -> bool:
    """Whether FSDP2 (`fully_shard`) manages the sublayers: their parameters are then gathered per call."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed
        return False
    # A sublayer may hold its shard units inside it (a whole Transformer layer whose attention and feed-forward
    # are the units): its parameters are gathered per call all the same.
    return any(isinstance(m, FSDPModule) for block in blocks for sub in (block.f, block.g) for m in sub.modules())


def _backprop(
    out: Tensor, inp: Tensor, params: Sequence[Tensor], grad_out: Tensor, accumulate: bool
) -> tuple[Tensor, list[Tensor | None]]:
    """dL/d(inp) of a re-run sublayer and, unless `accumulate`, dL/d(params).

    `accumulate` (FSDP2): gradients go into `.grad` of the gathered parameters by an ordinary backward through the
    re-run, which is what FSDP's post-backward hook (registered on the sublayer's input) reduce-scatters into the
    shards, exactly once per re-run. Otherwise they are returned, to leave the Function as its outputs (DDP-safe).
    """
    if accumulate:
        torch.autograd.backward(out, grad_out)
        return inp.grad, []
    grads = torch.autograd.grad(out, (inp, *params), grad_out, allow_unused=True)
    return grads[0], list(grads[1:])


class UpstreamGradient:
    """The gradient that the engine will back-propagate into the output of the sublayer it is about to call.

    `to(dtype)` caches its casts, so the tensor the engine finally back-propagates is the very object a sublayer was
    shown: a sublayer that computed its gradients early checks that identity before it trusts them.
    """

    def __init__(self, grad: Tensor) -> None:
        self.grad = grad
        self._casts = {grad.dtype: grad}

    def to(self, dtype: torch.dtype) -> Tensor:
        if dtype not in self._casts:
            self._casts[dtype] = self.grad.to(dtype)
        return self._casts[dtype]


_pending = threading.local()  # autograd may run a backward on a device thread of its own: one hint per thread


@contextlib.contextmanager
def upstream_gradient(grad: Tensor) -> Iterator[UpstreamGradient]:
    """Announce `grad` as the gradient of the output of the sublayer called inside this block (see `chunked`)."""
    hint = UpstreamGradient(grad)
    previous, _pending.hint = getattr(_pending, "hint", None), hint
    try:
        yield hint
    finally:
        _pending.hint = previous


def _take_upstream_gradient() -> UpstreamGradient | None:
    """The announced gradient, taken at most once (by the first chunked piece of the sublayer's call)."""
    hint = getattr(_pending, "hint", None)
    _pending.hint = None
    return hint


def take_upstream_gradient(output_shape: Sequence[int]) -> UpstreamGradient | None:
    """The gradient announced for the output of the sublayer being called, if there is one and it is for an output
    of `output_shape`'s (batch, tokens): a function that computes the sublayer's output a chunk at a time can then
    compute its gradients with it (`chunked` does). Taken at most once per call."""
    hint = _take_upstream_gradient()
    return hint if hint is not None and tuple(hint.grad.shape[:2]) == tuple(output_shape[:2]) else None


def chunk_slices(length: int, chunk_size: int) -> list[slice]:
    """The pieces `chunked` splits `length` positions into (one piece when `chunk_size` <= 0)."""
    return _pieces(length, chunk_size if chunk_size > 0 else max(1, length))


class ChunkedFunction(torch.autograd.Function):
    """`fn(x, *aligned)` computed `chunk_size` positions at a time along dim 1, so that `fn`'s intermediate
    activations exist for one chunk at a time, in forward and in backward. `fn` must be position-wise; `aligned` are
    tensors without gradient sliced along dim 1 with `x` (rotary tables: (B|1, T, D)).

    Call as `ChunkedFunction.apply(fn, chunk_size, fuse, num_aligned, x, into, *aligned, *params)`, `params` being
    every tensor `fn` differentiates in (its module's parameters). `into` (or None): a tensor shaped like the output
    that the output is added to in place and returned, `into + fn(x)` without a separate output buffer. Two ways to
    the gradients, neither of which holds whole-sequence activations:
    - fused: when `fuse` and the output's gradient was announced (`upstream_gradient`, as the reversible engine does
      for every re-run), each chunk's output and its gradients are computed together in forward and backward returns
      them: no extra compute (`x` is kept all the same, for a gradient that arrives cast).
    - recompute: otherwise (the plain path, a function whose output is not the sublayer's, or when the gradient that
      arrives is not the announced one), backward re-runs each chunk under the forward's RNG and autocast state and
      back-propagates it: one extra forward of `fn`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, fn: Any, chunk_size: int, fuse: bool, num_aligned: int, x: Tensor, into: Tensor | None,
        *aligned_and_params: Tensor,
    ) -> Tensor:
        aligned, params = aligned_and_params[:num_aligned], aligned_and_params[num_aligned:]
        ctx.fn, ctx.chunk_size, ctx.num_aligned = fn, chunk_size, num_aligned
        ctx.replay_ctx = ForwardContext(x.device, capture_rng=True)
        hint = take_upstream_gradient(x.shape) if fuse else None  # None if announced for another shape: not ours
        wanted = ctx.needs_input_grad[4:5] + ctx.needs_input_grad[6 + num_aligned :]
        if into is not None:
            ctx.mark_dirty(into)
        if hint is None:
            out, ctx.grads = _in_chunks(fn, x, aligned, chunk_size, into), None
        else:
            out, ctx.grads = _chunked_vjp(fn, chunk_size, x, aligned, params, wanted, hint, into)
        ctx.save_for_backward(x, *aligned, *params)  # fused too: a recompute if another gradient arrives (a cast)
        ctx.hint = hint
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        if ctx.hint is not None and grad_out is ctx.hint.to(grad_out.dtype):
            grads = ctx.grads  # computed in forward for exactly this grad_out
        else:
            x, aligned, params = saved[0], saved[1 : 1 + ctx.num_aligned], saved[1 + ctx.num_aligned :]
            wanted = ctx.needs_input_grad[4:5] + ctx.needs_input_grad[6 + ctx.num_aligned :]
            with ctx.replay_ctx.replay():  # the forward's dropout draws and autocast, chunk by chunk in order
                _, grads = _chunked_vjp(ctx.fn, ctx.chunk_size, x, aligned, params, wanted, UpstreamGradient(grad_out))
        ctx.hint = ctx.grads = None
        x_grad, *param_grads = grads
        into_grad = grad_out if ctx.needs_input_grad[5] else None  # d(into + fn(x))/d into is the identity
        return (None, None, None, None, x_grad, into_grad, *(None,) * ctx.num_aligned, *param_grads)


def _pieces(length: int, chunk_size: int) -> list[slice]:
    return [slice(start, start + chunk_size) for start in range(0, length, chunk_size)]


class _Assembly:
    """A whole-sequence tensor written chunk by chunk along dim 1 (allocated at the first chunk): no list of chunks
    beside a concatenated copy. With `into`, the chunks are added to that tensor in place instead."""

    def __init__(self, length: int, into: Tensor | None = None) -> None:
        self.length, self.tensor, self.accumulate = length, into, into is not None

    def put(self, piece: slice, value: Tensor, dtype: torch.dtype | None = None) -> None:
        if self.accumulate:
            self.tensor[:, piece] += value
            return
        if self.tensor is None:
            shape = (value.shape[0], self.length, *value.shape[2:])
            self.tensor = value.new_empty(shape, dtype=dtype or value.dtype)
        self.tensor[:, piece] = value


def _in_chunks(fn: Any, x: Tensor, aligned: Sequence[Tensor], chunk_size: int, into: Tensor | None = None) -> Tensor:
    """`fn(x, *aligned)` (added to `into` in place, if given) one chunk of dim 1 at a time, recording nothing for
    backward."""
    out, x = _Assembly(x.shape[1], into), x.detach()  # slices of a detached x: no autograd views without a graph
    for piece in _pieces(x.shape[1], chunk_size):
        out.put(piece, fn(x[:, piece], *(a[:, piece] for a in aligned)))
    return out.tensor


def _chunked_vjp(
    fn: Any, chunk_size: int, x: Tensor, aligned: Sequence[Tensor], params: Sequence[Tensor], wanted: Sequence[bool],
    grad: UpstreamGradient, into: Tensor | None = None,
) -> tuple[Tensor, list[Tensor | None]]:
    """`fn(x, *aligned)` chunk by chunk (added to `into` in place, if given), and the gradients of <fn(x), grad> with
    respect to x and params (None where unwanted).

    One chunk's graph is alive at a time; the output and dL/dx are assembled from the chunks, dL/dparams summed.
    """
    out, x_grad = _Assembly(x.shape[1], into), _Assembly(x.shape[1])
    param_grads: list[Tensor | None] = [None] * len(params)
    wanted_params = [p for p, w in zip(params, wanted[1:]) if w]
    for piece in _pieces(x.shape[1], chunk_size):
        with torch.enable_grad():
            x_piece = x[:, piece].detach().requires_grad_(wanted[0])
            piece_out = fn(x_piece, *(a[:, piece] for a in aligned))
        inputs = ([x_piece] if wanted[0] else []) + wanted_params
        if inputs:
            found = iter(torch.autograd.grad(piece_out, inputs, grad.to(piece_out.dtype)[:, piece], allow_unused=True))
            if wanted[0]:
                x_grad.put(piece, next(found), x.dtype)
            for i, w in enumerate(wanted[1:]):
                g = next(found) if w else None
                if g is not None:
                    param_grads[i] = g if param_grads[i] is None else param_grads[i].add_(g)
        out.put(piece, piece_out.detach())
        del piece_out
    return out.tensor, [x_grad.tensor, *param_grads]


def chunked(
    fn: Any, x: Tensor, chunk_size: int, params: Sequence[Tensor], aligned: Sequence[Tensor] = (), fuse: bool = True,
    into: Tensor | None = None,
) -> Tensor:
    """`fn(x, *aligned)` with `fn`'s activation memory bounded by `chunk_size` positions (dim 1), also in backward.

    `fn` must be position-wise (each output position depends on that input position only) and `params` must hold
    every tensor it differentiates in; `aligned` (no gradient) are sliced along dim 1 with `x`. `fuse=False` when
    `fn`'s output is not the sublayer's output, whose gradient the engine announces (see `ChunkedFunction`). Short
    inputs (<= chunk_size) and `chunk_size` <= 0 run `fn` directly. `into`: return `into + fn(x, *aligned)`, chunked
    runs writing it over `into` (which the caller then no longer uses) rather than into a buffer of their own.
    """
    if into is not None and (into._is_view() or chunk_size <= 0 or x.shape[1] <= chunk_size):
        # Out of place for short inputs, and for a view (FSDP2 hands a module's inputs on as views of one
        # function's outputs, which autograd forbids writing in place).
        return into + chunked(fn, x, chunk_size, params, aligned, fuse)
    if chunk_size <= 0 or x.shape[1] <= chunk_size:
        return fn(x, *aligned)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)
                                              or (into is not None and into.requires_grad))
    if not needs_grad:
        return _in_chunks(fn, x, aligned, chunk_size, into)
    return ChunkedFunction.apply(fn, chunk_size, fuse, len(aligned), x, into, *aligned, *params)


def _rerun(
    sublayer: nn.Module,
    replay: ForwardContext,
    arithmetic: StreamArithmetic,
    inp: Tensor,
    out_stream: Tensor,
    grad_out: Tensor,
    aux: Sequence[Tensor | None],
    sharded: bool,
    inplace: bool = False,
) -> tuple[Tensor, Tensor, list[Tensor], Tensor | None]:
    """Re-run one sublayer S on the stream `inp` with grad, once; return the stream S updated, rebuilt from
    `out_stream` (`out_stream - S(inp)`, or `(out_stream - S(inp)) / keep` for a scaled join), (dS/dinp)^T grad_out,
    the parameter gradients and S's `keep` (None for a plain add).

    The call happens inside `upstream_gradient(grad_out)`: a sublayer that bounds its own memory (`chunked`) computes
    its gradients chunk by chunk during this very call, since the gradient its output will receive is already known.
    Any other sublayer ignores the hint. Either way the engine makes one call and one backward per re-run, which is
    all that DDP's reducer and FSDP's per-module hooks see.
    """
    params = [] if sharded else _sublayer_params(sublayer)
    saved = SavedStorages()
    with torch.enable_grad(), replay.replay(), upstream_gradient(grad_out) as hint, saved:
        # Differentiate with respect to what S reads: `read` is a cast, whose gradient is the identity.
        s_in = arithmetic.read(inp).detach().requires_grad_()
        # `inplace`: the engine owns both streams. The one S read is then parked until the backward is done.
        parked = arithmetic.park(inp, s_in) if inplace else None
        s_out, keep = split_output(sublayer(s_in, *aux))
    rebuilt = None
    if inplace:  # over out_stream, which the engine owns: S's output is then no longer needed unless the graph is
        with torch.no_grad():  # holding it, and its memory goes back before the backward's peak
            rebuilt = arithmetic.unjoin(out_stream, s_out, keep, replay.residue, inplace=True)
        saved.release_unless_saved(s_out, s_in)
    s_in_grad, grads = _backprop(s_out, s_in, params, hint.to(s_out.dtype), sharded)
    if rebuilt is None:
        with torch.no_grad():
            rebuilt = arithmetic.unjoin(out_stream, s_out, keep, replay.residue)
    arithmetic.unpark(inp, s_in, parked)
    return rebuilt, s_in_grad.to(grad_out.dtype), _grads_or_zeros(grads, params), keep


class SavedStorages(torch.autograd.graph.saved_tensors_hooks):
    """Records the storage of every tensor autograd saves for backward inside the block, so that a tensor none of
    them shares can have its memory freed before the backward that never reads it (`release_unless_saved`)."""

    def __init__(self) -> None:
        self.pointers: set[int] = set()

        def pack(t: Tensor) -> Tensor:
            self.pointers.add(t.untyped_storage().data_ptr())
            return t

        super().__init__(pack, lambda t: t)

    def __enter__(self) -> SavedStorages:  # noqa: PYI034 (typing.Self needs Python 3.11; this file goes to the Hub)
        super().__enter__()
        return self

    def release_unless_saved(self, t: Tensor, *keep: Tensor) -> None:
        """Free `t`'s memory (its shape stays: autograd only checks gradients against it) unless a saved tensor or
        one of `keep` shares it."""
        pointer = t.untyped_storage().data_ptr()
        if pointer not in self.pointers and all(k.untyped_storage().data_ptr() != pointer for k in keep):
            t.untyped_storage().resize_(0)


Contexts = list[tuple[ForwardContext, ForwardContext]]  # (F, G) forward contexts, one pair per block


def forward_blocks(
    x1: Tensor,
    x2: Tensor,
    blocks: Sequence[nn.Module],
    aux: Sequence[Tensor | None],
    arithmetic: StreamArithmetic,
    capture_rng: bool,
) -> tuple[Tensor, Tensor, Contexts]:
    """Run `blocks` without grad: the top streams `(y1, y2)` and each sublayer's context for replaying it.

    With an arithmetic of finite `limit` (fixed point) it raises when a stream leaves the exactly representable range.
    """
    return _forward_blocks([x1, x2], [False, False], blocks, aux, arithmetic, capture_rng)


def _forward_blocks(
    streams: list[Tensor],
    owned: list[bool],
    blocks: Sequence[nn.Module],
    aux: Sequence[Tensor | None],
    arithmetic: StreamArithmetic,
    capture_rng: bool,
) -> tuple[Tensor, Tensor, Contexts]:
    """`forward_blocks` taking the two streams out of `streams` (which it empties, so the caller holds no reference
    to them), `owned[i]` saying whether stream i is only the caller's copy, which the joins may then overwrite."""
    x1, x2 = streams
    streams.clear()
    own1, own2 = owned
    # A stream fed to both (x1 is x2) is not overwritten by the first join: its partner still reads it. Once that
    # join has replaced x1, the second may overwrite it.
    own1 = own1 and x1 is not x2
    contexts: Contexts = []
    # The extremes of every stream value are gathered on the device and checked once after the loop: one host sync
    # per forward, not one per sublayer. An inexact add can only yield a value >= limit, so checking results suffices.
    check = math.isfinite(arithmetic.limit)
    extremes = [_extremes(x1), _extremes(x2)] if check else []
    with torch.no_grad():
        for block in blocks:
            f_ctx = ForwardContext(x1.device, capture_rng)
            # y1 = x1 + F(x2), then y2 = x2 + G(y1)
            out = split_output(block.f(arithmetic.read(x2), *aux))
            x1, f_ctx.residue = arithmetic.join(x1, *out, inplace=own1)
            g_ctx = ForwardContext(x1.device, capture_rng)
            out = split_output(block.g(arithmetic.read(x1), *aux))
            x2, g_ctx.residue = arithmetic.join(x2, *out, inplace=own2)
            del out
            own1 = own2 = True  # from here on, streams the joins made
            contexts.append((f_ctx, g_ctx))
            if check:
                extremes += [_extremes(x1), _extremes(x2)]
    if check:
        arithmetic.check_range(torch.cat(extremes).abs().max())
    return x1, x2, contexts


@torch.no_grad()
def reconstruct_inputs(
    y1: Tensor,
    y2: Tensor,
    blocks: Sequence[nn.Module],
    aux: Sequence[Tensor | None] = (),
    arithmetic: StreamArithmetic | None = None,
    contexts: Contexts | None = None,
) -> tuple[Tensor, Tensor]:
    """The stack's input `(x1, x2)` rebuilt from its output by inverting every block, as backward does.

    Pass the `contexts` from `forward_blocks` when sublayers draw random numbers (dropout, LSH), so each re-run
    replays its forward draws; without them the sublayers run under the current RNG and autocast state.
    """
    arithmetic = arithmetic or StreamArithmetic()

    def replay(i: int, sublayer: int) -> contextlib.AbstractContextManager:
        return contexts[i][sublayer].replay() if contexts is not None else contextlib.nullcontext()

    def residue(i: int, sublayer: int) -> Any:
        return contexts[i][sublayer].residue if contexts is not None else None

    for i in reversed(range(len(blocks))):
        with replay(i, 1):
            x2 = arithmetic.unjoin(y2, *split_output(blocks[i].g(arithmetic.read(y1), *aux)), residue(i, 1))  # y2-G(y1)
        with replay(i, 0):
            x1 = arithmetic.unjoin(y1, *split_output(blocks[i].f(arithmetic.read(x2), *aux)), residue(i, 0))  # y1-F(x2)
        y1, y2 = x1, x2
    return y1, y2


class ReversibleStack(torch.autograd.Function):
    """`(x1, x2) -> (y1, y2)` through `blocks`, each with `.f` (attention) and `.g` (feed-forward) sublayers.

    Call as `ReversibleStack.apply(x1, x2, blocks, arithmetic, capture_rng, encode, num_aux, *aux, *params)`: `aux` are
    extra tensors every F and G receives (rotary cos/sin, padding mask; no gradient flows to them), `params` are all
    trainable parameters of `blocks` in `reversible_params(blocks)` order. Streams go in in the arithmetic's
    representation (float64 on the grid for fixed point), or as float activations that the Function encodes itself
    (`encode`: then the caller never holds encoded copies), and come out decoded (fp32), so the gradients that reach backward and those
    it carries are fp32; the exact top streams stay inside, and backward frees each pair once it has rebuilt the
    pair below.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x1: Tensor,
        x2: Tensor,
        blocks: Sequence[nn.Module],
        arithmetic: StreamArithmetic,
        capture_rng: bool,
        encode: bool,
        num_aux: int,
        *aux_and_params: Tensor,
    ) -> tuple[Tensor, Tensor]:
        aux = aux_and_params[:num_aux]
        streams = [arithmetic.encode(x1) if encode else x1]
        streams.append(streams[0] if x2 is x1 else arithmetic.encode(x2) if encode else x2)
        # The encoded copies are the engine's own: the first joins may write over them, and nothing else keeps them.
        owned = [s is not x for s, x in zip(streams, (x1, x2))]
        y1, y2, contexts = _forward_blocks(streams, owned, blocks, aux, arithmetic, capture_rng)
        ctx.blocks, ctx.arithmetic, ctx.contexts = blocks, arithmetic, contexts
        ctx.num_aux = num_aux
        ctx.sharded = is_sharded(blocks)  # then no parameters were handed in: FSDP reduces their gradients
        ctx.save_for_backward(*aux)
        # The top streams, from which every other activation is rebuilt. Held by the context rather than saved, so
        # that backward can drop each pair of streams as soon as the pair below it is rebuilt (saved tensors live
        # until backward returns); detached aliases, since an output kept on its own node would be a cycle.
        ctx.streams = [y1.detach(), y2.detach()]
        ctx.versions = [y1._version, y2._version]
        # Unused outputs get no zero-filled gradient; the outputs leave decoded (fp32), so the gradients that arrive,
        # and those the backward carries, are fp32 whatever the streams are.
        ctx.set_materialize_grads(False)
        out1, out2 = arithmetic.decode(y1), arithmetic.decode(y2)
        ctx.grad_dtype = out2.dtype
        ctx.owned = out1 is not y1 and out2 is not y2  # decoded copies: the top streams are the engine's alone
        ctx.owned_gradients: set[int] = set()  # data pointers of arriving gradients that are the engine's own copies
        return out1, out2

    @staticmethod
    def backward(ctx: Any, dy1: Tensor | None, dy2: Tensor | None) -> tuple[Tensor | None, ...]:
        if ctx.streams is None:
            raise RuntimeError("The reversible stack's backward ran twice: its streams are freed as it goes, so "
                               "retain_graph=True cannot back-propagate through it a second time.")
        (y1, y2), ctx.streams = ctx.streams, None
        if [y1._version, y2._version] != ctx.versions:
            raise RuntimeError("An output of the reversible stack was modified in place after the forward; the "
                               "backward rebuilds every activation from it. Apply the change out of place.")
        aux = ctx.saved_tensors
        arithmetic: StreamArithmetic = ctx.arithmetic
        dtype = ctx.grad_dtype
        arrived = dy2
        dy2 = dy2.to(dtype) if dy2 is not None else torch.zeros_like(y2, dtype=dtype)
        dy1 = dy1.to(dtype) if dy1 is not None else None
        # dL/dy2 is updated in place when its memory is the engine's: a cast or zeros made here, or the copy that
        # `reversible_stack`'s hook made of the arriving gradient (autograd holds the gradient it passes in until this
        # backward returns, so a copy made here would sit beside it). Anything else may be read by someone else.
        own_dy2 = dy2 is not arrived or dy2.data_ptr() in ctx.owned_gradients
        param_grads: list[list[Tensor]] = []
        owned = ctx.owned  # rebuild each stream over the one above it, unless that one is an output's memory
        for block, (f_ctx, g_ctx) in zip(reversed(ctx.blocks), reversed(ctx.contexts)):
            # G: x2 = y2 - G(y1);  dL/dy1 += (dG/dy1)^T dL/dy2
            x2, dy1_from_g, g_grads, keep_g = _rerun(block.g, g_ctx, arithmetic, y1, y2, dy2, aux, ctx.sharded, owned)
            del y2
            dy1 = dy1_from_g if dy1 is None else dy1 + dy1_from_g
            del dy1_from_g
            # F: x1 = y1 - F(x2);  dL/dx2 = dL/dy2 + (dF/dx2)^T dL/dy1
            x1, dx2_from_f, f_grads, keep_f = _rerun(block.f, f_ctx, arithmetic, x2, y1, dy1, aux, ctx.sharded, owned)
            del y1
            owned = True
            param_grads.append(f_grads + g_grads)
            # y1 = x1 + F(x2) passes dL/dy1 through to x1 (times keep for a scaled join y1 = keep * x1 + F(x2))
            dx1 = dy1 if keep_f is None else dy1 * keep_f.to(dtype)
            # Over dL/dy2, which nothing reads any more, unless autograd handed it back as another gradient.
            if own_dy2 and not _aliases(dy2, dx2_from_f, dx1, *f_grads, *g_grads):
                dx2 = (dy2 if keep_g is None else dy2.mul_(keep_g.to(dtype))).add_(dx2_from_f)
            else:
                passed = dy2 if keep_g is None else dy2 * keep_g.to(dtype)
                # In place on the re-run's fresh gradient, unless autograd handed back a gradient it was given.
                dx2 = dx2_from_f + passed if _aliases(dx2_from_f, dy1, dy2) else dx2_from_f.add_(passed)
                del passed
            own_dy2 = True  # from here on dL/dy2 is a gradient the engine made
            y1, y2, dy1, dy2 = x1, x2, dx1, dx2
            del x1, x2, dx1, dx2, dx2_from_f

        flat_param_grads = [g for block_grads in reversed(param_grads) for g in block_grads]
        no_grads = (None,) * (5 + ctx.num_aux)  # blocks, arithmetic, capture_rng, encode, num_aux, *aux
        del y1, y2  # autograd casts the fp32 gradients to the inputs' dtype
        return (dy1 if dy1 is not None else torch.zeros_like(dy2), dy2, *no_grads, *flat_param_grads)


def _aliases(t: Tensor, *others: Tensor) -> bool:
    return any(t.untyped_storage().data_ptr() == o.untyped_storage().data_ptr() for o in others)


def stream_arithmetic(stream_dtype: str = "float32", fraction_bits: int = 32, keep_bits: int = 1) -> StreamArithmetic:
    """The arithmetic for `RevformerConfig.stream_dtype` (`fraction_bits` is `stream_fraction_bits`; scaled joins keep
    +-2^-keep_bits of the stream, as the `bdia` coupling's gamma)."""
    if stream_dtype == "float32":
        return StreamArithmetic()
    if stream_dtype == "fixed_point":
        return FixedPointArithmetic(fraction_bits, keep_bits)
    raise ValueError(f"Unknown stream_dtype {stream_dtype!r}; choose 'float32' or 'fixed_point'.")


def reversible_params(blocks: Sequence[nn.Module]) -> list[nn.Parameter]:
    """The parameters `ReversibleStack` takes, in the order its backward returns their gradients."""
    return [p for block in blocks for sub in (block.f, block.g) for p in _sublayer_params(sub)]


def reversible_stack(
    x1: Tensor,
    x2: Tensor,
    blocks: Sequence[nn.Module],
    aux: Sequence[Tensor | None] = (),
    arithmetic: StreamArithmetic | None = None,
    capture_rng: bool = True,
    encode: bool = False,
) -> tuple[Tensor, Tensor]:
    """Run `blocks` reversibly: activation memory independent of `len(blocks)`.

    `capture_rng=False` skips the RNG snapshots when no sublayer draws random numbers (no dropout, no LSH).
    `encode`: x1, x2 are float activations, encoded into streams inside (`arithmetic.encode`).
    """
    # FSDP2 swaps gathered parameters in and out of the sublayers around each call, so sharded blocks keep theirs.
    params = [] if is_sharded(blocks) else reversible_params(blocks)
    y1, y2 = ReversibleStack.apply(
        x1, x2, tuple(blocks), arithmetic or StreamArithmetic(), capture_rng, encode, len(aux), *aux, *params
    )
    if y2.requires_grad:
        y2.register_hook(functools.partial(_own_copy, y2.grad_fn.owned_gradients))
    return y1, y2


def _own_copy(owned: set[int], grad: Tensor) -> Tensor:
    """A copy of the gradient arriving at the stack's output, which autograd passes on instead of the original (then
    freed): the engine may update it in place through the backward (see `ReversibleStack.backward`)."""
    copy = grad.clone()
    owned.add(copy.data_ptr())
    return copy
