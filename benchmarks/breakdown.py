"""Which tensors hold the peak memory of one forward+backward step, from torch.profiler's allocation events.

`activation_timeline` runs the step under ``torch.profiler.profile(profile_memory=True, with_stack=True,
record_shapes=True)`` and replays every allocation and free of the chosen device in time order. Only what the step
allocates counts: parameters (and anything else alive before it) never appear in the trace. Allocations that are
some parameter's ``.grad`` when the step ends are gradients; everything else is activations and temporaries. Each
allocation is labelled by where it was made: its Python frames (revformer/, benchmarks/, transformers/,
torch.utils.checkpoint) and nn.Modules, its innermost aten op and, for an allocation made by an autograd node in
backward, the frames of the forward op that created that node (matched by sequence number).
`RULES` maps those to categories; the first rule that matches wins, and what none matches is "other". One label
goes by lifetime instead: a tensor of the stream's shape that a reversible re-run made and that outlives it is the
gradient the re-run hands back for the stream it read ("stream gradients"), whichever sublayer made it.

The figure of merit is bytes per token and hidden unit: peak activation bytes / (batch x tokens x hidden size), and
the same for the peak of the flat part, everything but the loss chunk (whose size does not grow with the sequence):
what a longer sequence costs per token. The two peaks can fall at different moments of the step.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

MiB = 2**20
LOSS_CHUNK = "loss chunk"
LOSS_HIDDEN_GRADIENT = "loss: hidden-state gradient"  # a (tokens x hidden) tensor the loss makes: it is flat
OTHER = "other"

_RERUN = r"^revformer/reversible\.py:_rerun$"
_ATTENTION = r"module:(RevformerAttention|LlamaAttention)$|revformer/attention\.py:"
_FEED_FORWARD = r"module:(RevformerFeedForward|LlamaMLP)$|reversible\.py:(_chunked_vjp|_in_chunks|chunked)$"
_LOSS = r"revformer/loss\.py:|benchmarks/models\.py:chunked_causal_lm_loss$|transformers/loss/"
_MASK = r"transformers/masking_utils\.py:|revformer/attention\.py:(attention_inputs|\w*allowed)$"
_STREAM_ARITHMETIC = (r"^revformer/reversible\.py:(add|subtract|join|unjoin|scaled_join|scaled_unjoin|encode|decode|"
                      r"read|to_grid|grid_steps|_residue_steps|_scaled_join_by_rows|rows|by_rows|forward_blocks|"
                      r"park|unpark)$")
STREAM_GRADIENTS = "stream gradients"

# (category, innermost-frame pattern or None, patterns that must each match some entry of the allocation's context).
# Context entries, innermost first: "path/file.py:function" frames, "module:Class" nn.Modules, "op:name" ops; the
# forward op of the autograd node that made it, if any, adds the same entries prefixed "fwd:" (so "^..." patterns
# match the allocation's own context only).
RULES: tuple[tuple[str, str | None, tuple[str, ...]], ...] = (
    # the LM-head loss, chunk by chunk (revformer's ChunkedLMHeadLoss, the benchmarks' checkpointed chunks)
    (LOSS_CHUNK, None, (r"^revformer/loss\.py:", r"^op:ChunkedLMHeadLoss|^revformer/loss\.py:_chunk_loss$")),
    (LOSS_CHUNK, None, (r"benchmarks/models\.py:chunk_loss$",)),
    ("loss (full logits)", None, (_LOSS, r"op:aten::\w*(softmax|nll_loss|entropy)")),
    ("loss: other", None, (_LOSS,)),  # targets, the sum, the chunks' gradients assembled
    # revformer's reversible engine: the bits a scaled (bdia) join keeps, the streams, the re-run sublayers
    ("bdia residue", None, (r"^revformer/reversible\.py:pack_residue$",)),
    ("streams", _STREAM_ARITHMETIC, ()),
    # query-chunked attention's whole-sequence keys and values, and their gradients
    ("re-run: attention keys, values", r"^revformer/modeling_revformer\.py:_key_value_buffers$", (_RERUN,)),
    ("re-run: attention", None, (_RERUN, _ATTENTION)),
    ("re-run: feed-forward", None, (_RERUN, _FEED_FORWARD)),
    ("re-run: bdia layer sum", None, (_RERUN, r"module:RevformerBDIALayer$|modeling_revformer\.py:update$")),
    (STREAM_GRADIENTS, r"^revformer/reversible\.py:(backward|_rerun)$", (r"^op:ReversibleStackBackward",)),
    (STREAM_GRADIENTS, r"^revformer/reversible\.py:_own_copy$", ()),  # the engine's copy of the arriving gradient
    ("re-run: other", None, (_RERUN,)),
    ("saved RNG states", r"^revformer/reversible\.py:__init__$|^torch/utils/checkpoint\.py:", ()),
    # Llama + activation checkpointing
    ("layer recompute", None, (r"^torch/utils/checkpoint\.py:(recompute_fn|unpack_hook)$",)),
    ("layer backward", None, (r"^fwd:module:LlamaDecoderLayer$",)),
    ("checkpointed layer inputs", None, (r"^torch/utils/checkpoint\.py:checkpoint$", r"^module:LlamaDecoderLayer$")),
    ("layer activations", None, (r"^module:LlamaDecoderLayer$",)),
    # either model, outside the engine and the checkpoints (the plain path, forward transients)
    ("attention mask", None, (_MASK,)),
    ("attention", None, (_ATTENTION,)),
    ("feed-forward", None, (_FEED_FORWARD,)),
    ("embedding", None, (r"module:Embedding$",)),
    ("rotary tables", None, (r"module:(Revformer|Llama)RotaryEmbedding$",)),
    ("final norm / head", None, (r"module:(RevformerRMSNorm|LlamaRMSNorm|Linear)$",)),
)

_FRAME = re.compile(r"(?:^|/)((?:revformer|benchmarks|transformers|torch/utils)/[^()]*\.py)\(\d+\): (.+)$")
_ENGINE = "autograd::engine::evaluate_function: "


def categorize(context: Sequence[str], rules: Iterable[tuple[str, str | None, tuple[str, ...]]] = RULES) -> str:
    """The category of an allocation from its context entries (innermost first): the first rule whose innermost-frame
    pattern matches the innermost frame and each of whose patterns matches some entry."""
    innermost = next((c for c in context if not c.startswith(("module:", "op:", "fwd:"))), "")
    for category, inner, patterns in rules:
        if inner is not None and not re.search(inner, innermost):
            continue
        if all(any(re.search(p, c) for c in context) for p in patterns):
            return category
    return OTHER


def _tree(roots: Iterable[Any]) -> Iterable[Any]:
    stack = list(roots)
    while stack:
        event = stack.pop()
        yield event
        stack.extend(event.children)


def _own_context(event: Any) -> list[str]:
    """Frames, modules and ops above `event`, innermost first."""
    from torch._C._profiler import _EventType

    entries = []
    parent = event.parent
    while parent is not None:
        if parent.tag == _EventType.TorchOp:
            entries.append("op:" + parent.name)
        elif parent.tag == _EventType.PyCall:
            if parent.name.startswith("nn.Module: "):
                entries.append("module:" + parent.name[len("nn.Module: "):].rsplit("_", 1)[0])
            elif match := _FRAME.search(parent.name):
                entries.append(f"{match[1]}:{match[2]}")
        parent = parent.parent
    return entries


def _frame_name(name: str) -> str:
    """"path/file.py:function" for a Python call event's name, else ""."""
    match = _FRAME.search(name)
    return f"{match[1]}:{match[2]}" if match else ""


class _Origins:
    """The forward op that created an autograd node, by the node's sequence number: the latest op carrying that
    number that started before the node ran (sequence numbers count per thread; the CPU runs backward on the
    forward's thread, so there they are unique)."""

    def __init__(self, ops: Iterable[Any]) -> None:
        from torch._C._profiler import RecordScope

        self.by_seq: dict[int, list[Any]] = {}
        for op in ops:
            seq = op.extra_fields.sequence_number
            if seq >= 0 and op.extra_fields.scope == RecordScope.FUNCTION and not op.name.startswith(_ENGINE):
                self.by_seq.setdefault(seq, []).append(op)
        for ops_ in self.by_seq.values():
            ops_.sort(key=lambda e: e.start_time_ns)

    def of(self, event: Any) -> Any | None:
        """The forward op of the innermost autograd node above `event`, if any."""
        from torch._C._profiler import _EventType

        parent = event.parent
        while parent is not None and not (parent.tag == _EventType.TorchOp and parent.name.startswith(_ENGINE)):
            parent = parent.parent
        if parent is None:
            return None
        found = None
        for op in self.by_seq.get(parent.extra_fields.sequence_number, ()):
            if op.start_time_ns > parent.start_time_ns:
                break
            found = op
        return found


def context_of(event: Any, origins: _Origins) -> tuple[list[str], str | None]:
    """An allocation's context entries (its own, then "fwd:" ones of its autograd node's forward op) and that node."""
    own = _own_context(event)
    node = next((c[len("op:" + _ENGINE):] for c in own if c.startswith("op:" + _ENGINE)), None)
    forward = origins.of(event) if node else None
    if forward is None:
        return own, node
    return own + ["fwd:op:" + forward.name] + ["fwd:" + c for c in _own_context(forward)], node


def _tensor_shapes(ops: Iterable[Any], wanted: dict[int, int]) -> dict[int, tuple[str, list[int]]]:
    """(dtype, shape) of the allocations `wanted` ({allocation id: bytes}), from the first op that reads a tensor
    filling the whole allocation, else from the first that reads one inside it: the profiler records the inputs of
    ops, not their outputs."""
    from torch._C._profiler import _TensorMetadata

    found: dict[int, tuple[str, list[int], bool]] = {}
    for op in ops:
        stack = list(op.extra_fields.inputs)
        while stack:
            item = stack.pop()
            if isinstance(item, list):
                stack.extend(item)
            elif isinstance(item, _TensorMetadata) and item.allocation_id in wanted and item.dtype is not None:
                size = math.prod(item.sizes) * item.dtype.itemsize
                whole = size == wanted[item.allocation_id]
                if item.allocation_id not in found or (whole and not found[item.allocation_id][2]):
                    found[item.allocation_id] = (str(item.dtype).removeprefix("torch."), list(item.sizes), whole)
    return {k: (dtype, shape) for k, (dtype, shape, _) in found.items()}


def _innermost_frame(context: Sequence[str]) -> str:
    return next((c for c in context if not c.startswith(("module:", "op:", "fwd:"))), "?")


def _describe_origin(context: Sequence[str]) -> str | None:
    forward = [c[4:] for c in context if c.startswith("fwd:")]
    if not forward:
        return None
    frame = _innermost_frame(forward)
    module = next((c[len("module:"):] for c in forward if c.startswith("module:")), None)
    op = next((c[3:] for c in forward if c.startswith("op:")), "?")
    return f"{op} in {frame}" + (f" ({module})" if module else "")


def _replay(allocations: Sequence[Any], key: Callable[[Any], int], stop: int | None = None) -> dict[int, Any]:
    """Live allocations {key: allocation event} after the first `stop` events (all by default). A free that sorts
    before its own allocation (the same timestamp) cancels it."""
    live: dict[int, Any] = {}
    early: set[int] = set()
    for event in allocations[:stop]:
        k = key(event)
        if event.extra_fields.alloc_size > 0:
            if k in early:
                early.discard(k)
            else:
                live[k] = event
        elif live.pop(k, None) is None:
            early.add(k)
    return live


def _at(live: dict[int, Any], labels: dict[int, str], contexts: dict[int, tuple[list[str], str | None]],
        shapes: dict[int, tuple[str, list[int]]], top: int) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Bytes per category of the `live` allocations, and the largest of them grouped by category, function, op,
    backward node, dtype, shape and size."""
    categories: dict[str, int] = {}
    rows: dict[tuple, dict[str, Any]] = {}
    for k, event in live.items():
        size, category = event.extra_fields.alloc_size, labels[k]
        categories[category] = categories.get(category, 0) + size
        context, node = contexts[k]
        op = next((c[3:] for c in context if c.startswith("op:") and not c.startswith("op:" + _ENGINE)), None)
        dtype, shape = shapes.get(k, (None, None))
        row = rows.setdefault((category, _innermost_frame(context), op, node, dtype, str(shape), size), {
            "category": category, "function": _innermost_frame(context), "op": op, "node": node,
            "origin": _describe_origin(context), "dtype": dtype, "shape": shape, "bytes_each": size, "count": 0,
            "bytes": 0})
        row["count"] += 1
        row["bytes"] += size
    largest = sorted(rows.values(), key=lambda r: -r["bytes"])[:top]
    return dict(sorted(categories.items(), key=lambda kv: -kv[1])), largest


def activation_timeline(step: Callable[[], Any], *, params: Iterable[Any], tokens: int, hidden_size: int,
                        device: str = "cpu", top: int = 30) -> dict[str, Any]:
    """Run `step()` (one forward+backward) under the profiler and break its peak activation memory down.

    `params`: the model's parameters (their ``.grad`` after the step are the gradients, not counted as activations);
    `tokens`: batch x sequence length. Two peaks over the step: of all live activations and temporaries (gradients
    excluded), and of the flat part, everything but the loss chunk, which is what grows with the sequence (a loss
    allocation of tokens x hidden elements, the gradient of the hidden states, counts as flat: "loss: hidden-state
    gradient"). Returns a JSON-serialisable dict: peak_activation_bytes and categories {name: bytes} at that peak,
    flat_peak_bytes and flat_categories at the flat peak, flat_at_peak_bytes (the flat part at the activation peak),
    bytes_per_token_hidden and flat_bytes_per_token_hidden (the peaks / (tokens x hidden)), peak_total_bytes
    (activations and gradients), gradient_bytes (alive at the end), top and flat_top (the largest live allocations
    at each peak), peak and flat_peak (where each happened).
    """
    import torch
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    params = list(params)
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, profile_memory=True, with_stack=True, record_shapes=True) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    grad_ptrs = {p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}
    grad_sizes = sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None)

    allocations, ops, calls = [], [], []
    for event in _tree(prof.profiler.kineto_results.experimental_event_tree()):
        if event.tag == _EventType.Allocation:
            if event.extra_fields.device.type == torch.device(device).type:
                allocations.append(event)
        elif event.tag == _EventType.TorchOp:
            ops.append(event)
        elif event.tag == _EventType.PyCall:
            calls.append(event)
    allocations.sort(key=lambda e: e.start_time_ns)
    if not allocations:
        raise RuntimeError("the profiler recorded no allocation on " + device)

    def key(event: Any) -> int:  # pairs an allocation with its free; the pointer where ids are missing
        fields = event.extra_fields
        return fields.allocation_id if fields.allocation_id > 0 else -fields.ptr

    at_end = _replay(allocations, key)
    gradients = {k for k, e in at_end.items() if e.extra_fields.ptr in grad_ptrs}

    # Every allocation's context and category; the loss's allocations of tokens x hidden elements are flat.
    origins = _Origins(ops)
    contexts = {key(e): context_of(e, origins) for e in allocations if e.extra_fields.alloc_size > 0}
    labels = {k: categorize(context) for k, (context, _) in contexts.items()}
    sizes = {key(e): e.extra_fields.alloc_size for e in allocations if e.extra_fields.alloc_size > 0}
    loss = {k: sizes[k] for k, label in labels.items() if label.startswith("loss")}
    for k, (_, shape) in _tensor_shapes(ops, loss).items():
        if math.prod(shape) == tokens * hidden_size:
            labels[k] = LOSS_HIDDEN_GRADIENT
    # What a re-run makes and hands back to the engine is the gradient of the stream it read (its sublayer's input
    # gradient, made inside the sublayer): an allocation of a re-run, of the stream's shape, still alive when the
    # next re-run starts (its output, also made there, is gone by then).
    reruns = sorted((e.start_time_ns, e.end_time_ns) for e in calls if re.search(_RERUN, _frame_name(e.name)))
    starts = [start for start, _ in reruns]
    # the engine's backward: a `backward` of reversible.py that runs re-runs (ChunkedFunction's runs inside them)
    stack_ends = [e.end_time_ns for e in calls if _frame_name(e.name) == "revformer/reversible.py:backward"
                  and any(e.start_time_ns < start and end < e.end_time_ns for start, end in reruns)]
    # when the gradient of a re-run must still be alive: the next re-run's start, or the end of the engine's backward
    deadlines = [min([t for t in (*starts[i + 1:i + 2], *stack_ends) if t > end], default=math.inf)
                 for i, (_, end) in enumerate(reruns)]
    freed = {key(e): e.start_time_ns for e in allocations if e.extra_fields.alloc_size < 0}
    handed_back = {}
    for e in allocations:
        k = key(e)
        if e.extra_fields.alloc_size > 0 and labels.get(k, "").startswith("re-run:"):
            i = bisect.bisect_right(starts, e.start_time_ns) - 1  # the re-run it was made in
            if i >= 0 and freed.get(k, math.inf) > deadlines[i]:
                handed_back[k] = sizes[k]
    for k, (_, shape) in _tensor_shapes(ops, handed_back).items():
        if math.prod(shape) == tokens * hidden_size and shape[-1] == hidden_size:
            labels[k] = STREAM_GRADIENTS

    live_act = live_flat = live_grad = peak_act = peak_flat = peak_total = 0
    peak_index = flat_index = 0
    alive, early = set(), set()
    for i, event in enumerate(allocations):
        k = key(event)
        if event.extra_fields.alloc_size > 0:
            if k in early:
                early.discard(k)
                continue
            alive.add(k)
            size = sizes[k]
        else:
            if k not in alive:
                early.add(k)
                continue
            alive.discard(k)
            size = -sizes[k]
        if k in gradients:
            live_grad += size
        else:
            live_act += size
            if labels[k] != LOSS_CHUNK:
                live_flat += size
        if live_act > peak_act:
            peak_act, peak_index = live_act, i + 1
        if live_flat > peak_flat:
            peak_flat, flat_index = live_flat, i + 1
        peak_total = max(peak_total, live_act + live_grad)

    at_peak = {k: e for k, e in _replay(allocations, key, peak_index).items() if k not in gradients}
    at_flat = {k: e for k, e in _replay(allocations, key, flat_index).items() if k not in gradients}
    at_flat = {k: e for k, e in at_flat.items() if labels[k] != LOSS_CHUNK}
    shapes = _tensor_shapes(ops, {k: sizes[k] for k in {*at_peak, *at_flat}})
    categories, rows = _at(at_peak, labels, contexts, shapes, top)
    flat_categories, flat_rows = _at(at_flat, labels, contexts, shapes, top)

    span = max(1, allocations[-1].start_time_ns - allocations[0].start_time_ns)

    def where(index: int, live: dict[int, Any]) -> dict[str, Any]:
        """The allocation that set a peak: its category, function, backward node, phase and time in the step."""
        event = allocations[max(index - 1, 0)]
        context, node = contexts.get(key(event), ([], None))
        return {"category": labels.get(key(event), OTHER), "function": _innermost_frame(context), "node": node,
                "phase": "backward" if any(c.startswith("op:" + _ENGINE) for c in context) else "forward",
                "time_fraction": round((event.start_time_ns - allocations[0].start_time_ns) / span, 4),
                "live_allocations": len(live)}

    units = tokens * hidden_size
    first = allocations[0].extra_fields
    return {
        "peak_activation_bytes": peak_act,
        "flat_peak_bytes": peak_flat,
        "flat_at_peak_bytes": peak_act - categories.get(LOSS_CHUNK, 0),
        "peak_total_bytes": peak_total,
        "gradient_bytes": sum(at_end[k].extra_fields.alloc_size for k in gradients),
        "param_grad_bytes": grad_sizes,
        # the allocator's count before the step (CUDA; the CPU's reporter counts from the profiler's start: 0)
        "resident_bytes": first.total_allocated - first.alloc_size,
        "allocator_peak_bytes": max(e.extra_fields.total_allocated for e in allocations),
        "end_activation_bytes": sum(e.extra_fields.alloc_size for k, e in at_end.items() if k not in gradients),
        "tokens": tokens,
        "hidden_size": hidden_size,
        "bytes_per_token_hidden": peak_act / units,
        "flat_bytes_per_token_hidden": peak_flat / units,
        "categories": categories,
        "flat_categories": flat_categories,
        "top": rows,
        "flat_top": flat_rows,
        "peak": where(peak_index, at_peak),
        "flat_peak": where(flat_index, at_flat),
        "allocation_events": len(allocations),
    }
