"""Memory and time probes, run inside a fresh worker process.

Memory on CUDA is ``torch.cuda.max_memory_allocated``. On CPU: the activation peak of a forward+backward from
torch.profiler's allocation events (gradients excluded, ``benchmarks.breakdown``), MemTracker's peak tensor memory of
a training step, and the process's peak RSS (the parent sets MALLOC_ENV, so glibc returns freed memory at once and
RSS follows live tensors). Step times are medians of steps taken round-robin over the compared models in one process,
so their ratios share the machine's noise. ``breakdown_main``: which tensors hold the peak of one forward+backward.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

from .env import environment
from .models import (
    Spec,
    build_model,
    forward_backward,
    make_optimizer,
    param_stats,
    random_ids,
    synchronize,
    train_step,
)
from .runner import emit


def proc_status(key: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memtracker(*tracked: Any) -> Any:
    """A MemTracker that counts `tracked` modules and optimizers by category (parameters, gradients, state...)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*tracked)
    return tracker


def memtracker_peak(tracker: Any) -> dict[str, int]:
    """MemTracker's peak CPU tensor bytes by category, 'Total' included."""
    import torch

    snapshot = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return {str(getattr(k, "value", k)): int(v) for k, v in snapshot.items()}


def max_relative_error(grads: dict[str, Any], reference: dict[str, Any]) -> float:
    """max over parameters of max|g - g_ref| / max|g_ref| (the measure of tests/conftest.py)."""
    return max(((grads[n] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item() for n, ref in reference.items())


def interleaved_times(steps: dict[Hashable, Callable[[], Any]], repeats: int, warmup: int = 0,
                      device: str = "cpu") -> dict[Hashable, list[float]]:
    """Wall seconds of each callable, called round-robin `warmup + repeats` times (the first `warmup` rounds not
    kept), so that load from other processes hits all of them alike."""
    times: dict[Hashable, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def setup_worker(spec: Spec) -> None:
    import torch
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.set_num_threads(spec.threads)
    # Deep models drive some Adam moments into denormals, which are ~100x slower on x86: flush them to zero.
    torch.set_flush_denormal(True)


def memory_worker(spec: Spec, budget: int | None, warmup_len: int, with_optimizer: bool = True) -> None:
    """Peak memory of one training step at `spec.seq_len`, after a short warm-up step that creates the optimizer
    state; without the optimizer (`with_optimizer=False`), of one forward+backward from zeroed (None) gradients, so
    optimizer state cannot hide activations. CPU: MemTracker (where it works) and peak RSS; a watchdog stops the
    step once RSS passes `budget`. CUDA: max_memory_allocated; out-of-memory is caught and reported."""
    import torch

    setup_worker(spec)
    cuda = spec.device.startswith("cuda")
    record: dict[str, Any] = {"mode": "memory", "spec": dataclasses.asdict(spec), "with_optimizer": with_optimizer}
    record.update(environment(spec.device, spec.threads))
    model = build_model(spec)
    optimizer = make_optimizer(model) if with_optimizer else None
    warmup_ids = random_ids(spec, min(spec.seq_len, warmup_len))
    if optimizer is not None:
        train_step(model, optimizer, warmup_ids, spec.device, spec.dtype)
    else:
        forward_backward(model, warmup_ids, spec.device, spec.dtype)
        model.zero_grad(set_to_none=True)
    stats = param_stats(model, optimizer)
    step = (lambda: train_step(model, optimizer, ids, spec.device, spec.dtype)) if optimizer else (
        lambda: float(forward_backward(model, ids, spec.device, spec.dtype)))
    record.update(stats, budget_bytes=budget)
    resident = stats["param_bytes"] + stats["optimizer_state_bytes"]  # alive before the step starts
    ids = random_ids(spec)

    # A forward+backward on CPU is profiled (breakdown.activation_timeline): its activation peak leaves out the
    # gradients, including those the reversible engine holds before autograd accumulates them, which MemTracker
    # counts as activations. A training step keeps MemTracker.
    profiled = not cuda and optimizer is None
    tracker, done = None, threading.Event()
    if cuda:
        synchronize(spec.device)
        torch.cuda.reset_peak_memory_stats()
    else:
        if spec.model != "reformer" and not profiled:  # MemTracker asserts on Reformer's custom autograd Function
            tracker = memtracker(*(m for m in (model, optimizer) if m is not None))
        rss_before = proc_status("VmRSS")
        reset_peak_rss()
        if budget is not None:

            def watchdog() -> None:  # stop a step that will not fit instead of running it to the end
                while not done.wait(0.02):
                    used = proc_status("VmHWM") - rss_before + resident
                    if used > budget:
                        record.update(ok=False, over_budget=True, stopped_early=True, rss_peak_bytes=used,
                                      peak_bytes=used, peak_source="rss")
                        emit(record)
                        os._exit(0)

            threading.Thread(target=watchdog, daemon=True).start()

    start = time.perf_counter()
    profile: dict[str, Any] = {}
    try:
        if tracker is not None:
            with tracker:
                loss = step()
        elif profiled:
            from .breakdown import activation_timeline

            losses: list[float] = []
            profile = activation_timeline(lambda: losses.append(step()), params=model.parameters(), top=10,
                                          tokens=spec.batch_size * spec.seq_len, hidden_size=spec.hidden_size)
            loss = losses[0]
        else:
            loss = step()
        synchronize(spec.device)
    except torch.OutOfMemoryError:
        record.update(ok=False, over_budget=True, oom=True)
        emit(record)
        return
    finally:
        done.set()
    record.update(ok=True, loss=loss, step_s_tracked=time.perf_counter() - start)
    if cuda:
        record.update(peak_bytes=torch.cuda.max_memory_allocated(), peak_source="cuda_max_memory_allocated")
    else:
        record["rss_peak_bytes"] = proc_status("VmHWM") - rss_before + resident
        record["rss_hwm_bytes"] = proc_status("VmHWM")
        if tracker is not None:
            parts = memtracker_peak(tracker)
            record.update(memtracker_peak_bytes=parts["Total"], memtracker_breakdown=parts)
            record.update(peak_bytes=parts["Total"], peak_source="memtracker")
        elif profile:
            record.update(activation_peak_bytes=profile["peak_activation_bytes"],
                          activation_categories=profile["categories"], activation_peak=profile.get("peak"),
                          peak_bytes=resident + profile["peak_total_bytes"], peak_source="profiler")
        else:
            record.update(peak_bytes=record["rss_peak_bytes"], peak_source="rss")
    record["activation_bytes"] = record["peak_bytes"] - stats["static_bytes"]
    record["growth_bytes"] = record["peak_bytes"] - resident  # what the step added: activations (+ gradients)
    judged = record["peak_bytes"] if cuda else record["rss_peak_bytes"]
    record["over_budget"] = budget is not None and judged > budget
    emit(record)


def time_worker(specs: list[Spec], warmup: int, steps: int) -> None:
    """Median step time of each spec; all models live in this process and are stepped round-robin."""
    setup_worker(specs[0])
    env = environment(specs[0].device, specs[0].threads)
    runs = []
    for spec in specs:
        model = build_model(spec)
        optimizer = make_optimizer(model)
        runs.append((spec, model, optimizer, random_ids(spec)))

    def stepper(spec: Spec, model: Any, optimizer: Any, ids: Any) -> Callable[[], float]:
        return lambda: train_step(model, optimizer, ids, spec.device, spec.dtype)

    times = interleaved_times({i: stepper(*run) for i, run in enumerate(runs)}, steps, warmup, specs[0].device)
    for i, (spec, model, optimizer, _) in enumerate(runs):
        median = statistics.median(times[i])
        emit({"mode": "time", "spec": dataclasses.asdict(spec), **env, **param_stats(model, optimizer), "ok": True,
              "step_s": median, "step_times_s": times[i], "tokens_per_s": spec.batch_size * spec.seq_len / median,
              "warmup_steps": warmup})


def memory_main(payload: dict[str, Any]) -> None:
    """Worker mode `memory`."""
    memory_worker(Spec(**payload["spec"]), payload.get("budget"), payload.get("warmup_len", 256),
                  payload.get("with_optimizer", True))


def time_main(payload: dict[str, Any]) -> None:
    """Worker mode `time`."""
    time_worker([Spec(**s) for s in payload["specs"]], payload["warmup"], payload["steps"])


def breakdown_worker(spec: Spec, warmup_len: int, top: int) -> None:
    """Which tensors hold the peak of one forward+backward at `spec.seq_len` (`breakdown.activation_timeline`),
    after a warm-up forward+backward at `warmup_len` tokens that creates any lazily built state, from zeroed (None)
    gradients, so that only what the step itself allocates is counted."""
    import torch

    from .breakdown import activation_timeline

    setup_worker(spec)
    record: dict[str, Any] = {"mode": "breakdown", "spec": dataclasses.asdict(spec)}
    record.update(environment(spec.device, spec.threads))
    model = build_model(spec)
    forward_backward(model, random_ids(spec, min(spec.seq_len, warmup_len)), spec.device, spec.dtype)
    model.zero_grad(set_to_none=True)
    record.update(param_stats(model))
    ids = random_ids(spec)
    losses: list[float] = []

    def step() -> None:
        losses.append(float(forward_backward(model, ids, spec.device, spec.dtype)))

    start = time.perf_counter()
    try:
        result = activation_timeline(step, params=model.parameters(), tokens=spec.batch_size * spec.seq_len,
                                     hidden_size=spec.hidden_size, device=spec.device, top=top)
    except torch.OutOfMemoryError:
        record.update(ok=False, oom=True)
        emit(record)
        return
    record.update(result, ok=True, loss=losses[0], profiled_s=round(time.perf_counter() - start, 1),
                  peak_bytes=result["peak_activation_bytes"], peak_source="profiler: activations")
    emit(record)


def breakdown_main(payload: dict[str, Any]) -> None:
    """Worker mode `breakdown`."""
    breakdown_worker(Spec(**payload["spec"]), payload.get("warmup_len", 256), payload.get("top", 30))
