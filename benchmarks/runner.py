"""Every measurement in a fresh process: launch ``python -m benchmarks.worker '<json>'``, collect the JSON records
it prints, append them to the suite's JSON lines.

A fresh process per measurement keeps one run's memory (allocator caches, peak RSS, compiled kernels) out of the
next; a worker past its timeout is abandoned and leaves a failure record instead of its results.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import REPO
from .report import append_jsonl

RESULT_PREFIX = "BENCH_RESULT "
MiB = 2**20
# glibc: serve allocations above 128 KiB with mmap and trim the heap above 128 KiB, so that freed tensor memory
# leaves the process at once and peak RSS tracks live tensor memory (several times slower: memory runs only).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def emit(record: dict[str, Any]) -> None:
    """Print one result record for the parent (workers only)."""
    print(RESULT_PREFIX + json.dumps(record), flush=True)


def parse_records(lines: list[str]) -> list[dict[str, Any]]:
    """The records among a worker's output lines."""
    return [json.loads(line[len(RESULT_PREFIX):]) for line in lines if line.startswith(RESULT_PREFIX)]


def worker_command(payload: dict[str, Any]) -> list[str]:
    """The command of one worker (run it with cwd=REPO, so that `benchmarks` and `revformer` import)."""
    return [sys.executable, "-m", "benchmarks.worker", json.dumps(payload)]


@dataclass
class Finished:
    """What a worker left: its records, its output and how it ended."""

    records: list[dict[str, Any]]
    stdout: str
    stderr: str
    returncode: int | None  # None: timed out
    wall_s: float


def run_worker(payload: dict[str, Any], timeout: float | None = None, env: dict[str, str] | None = None) -> Finished:
    """Run one worker to its end (or `timeout` seconds), its output captured."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(worker_command(payload), check=False, capture_output=True, text=True, env=env,
                              timeout=timeout, cwd=REPO)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, err, rc = exc.stdout or "", f"timed out after {timeout} s", None
        out = out.decode() if isinstance(out, bytes) else out
    return Finished(parse_records(out.splitlines()), out, err or "", rc, time.perf_counter() - start)


def run_command(cmd: list[str], console: Callable[[str], None], timeout: float, env: dict[str, str] | None = None,
                log: Path | None = None) -> dict[str, Any]:
    """Run `cmd` in its own process group, streaming its output lines to `console` (and `log`); past `timeout` the
    whole group is killed (a benchmark's worker processes with it). Returns rc, timed_out and wall seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    sink = open(log, "a") if log else None

    def pump() -> None:
        for line in proc.stdout:
            console("    " + line.rstrip())
            if sink:
                sink.write(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=5)
    if sink:
        sink.close()
    return {"rc": proc.returncode, "timed_out": timed_out, "wall_s": round(time.perf_counter() - start, 1)}


@dataclass
class Runner:
    """Launches workers and appends their records to the suite's JSON-lines file `out/<suite>.jsonl`."""

    out: Path
    timeout: float
    log: list[str] = field(default_factory=list)

    def launch(self, payload: dict[str, Any], suite: str, memory: bool, **tags: Any) -> list[dict[str, Any]]:
        """One worker; `memory`: with MALLOC_ENV on CPU, so that its peak RSS follows live tensors. Every record is
        tagged with the suite, the worker's wall time, a timestamp and `tags`."""
        env = dict(os.environ)
        spec = payload.get("spec") or payload["specs"][0]
        env["OMP_NUM_THREADS"] = str(spec["threads"])
        if memory and spec["device"] == "cpu":
            env.update(MALLOC_ENV)
        done = run_worker(payload, self.timeout, env)
        records = done.records or [{"mode": payload["mode"], "spec": spec, "ok": False, "returncode": done.returncode,
                                    "error": done.stderr[-2000:]}]
        for record in records:
            record.update(suite=suite, worker_wall_s=round(done.wall_s, 2),
                          timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          **tags)
        append_jsonl(self.out / f"{suite}.jsonl", records)  # whole lines when runners share a file
        for record in records:
            self.log.append(describe(record))
            print(self.log[-1], file=sys.stderr, flush=True)
        return records

    def memory(self, spec: Any, suite: str, budget: int | None = None, with_optimizer: bool = True,
               **tags: Any) -> dict[str, Any]:
        """Peak memory of one training step (or forward+backward) of `spec` (probes.memory_worker)."""
        payload = {"mode": "memory", "spec": dataclasses.asdict(spec), "budget": budget,
                   "with_optimizer": with_optimizer}
        return self.launch(payload, suite, True, **tags)[0]

    def time(self, specs: list[Any], suite: str, steps: int, warmup: int = 1, **tags: Any) -> list[dict[str, Any]]:
        """Median step time of each spec, all stepped round-robin in one worker (probes.time_worker)."""
        payload = {"mode": "time", "specs": [dataclasses.asdict(s) for s in specs], "warmup": warmup, "steps": steps}
        return self.launch(payload, suite, False, **tags)


def describe(r: dict[str, Any]) -> str:
    """One log line per record: what ran and what it measured."""
    s = r.get("spec", {})
    head = (f"[{r.get('suite')}] {r.get('mode')} {r.get('variant') or s.get('model')} L={s.get('num_layers')} "
            f"T={s.get('seq_len')}")
    if s.get("attention", "full") != "full" or s.get("chunk"):
        head += f" attn={s.get('attention')} chunk={s.get('chunk')}"
    if not r.get("ok") and not r.get("over_budget"):
        return f"{head}: FAILED rc={r.get('returncode')} {r.get('error', '')[-300:]}"
    parts = [head + ":"]
    if "peak_bytes" in r:
        parts.append(f"peak {r['peak_bytes'] / MiB:.1f} MiB ({r.get('peak_source')})")
    if "rss_peak_bytes" in r:
        parts.append(f"rss {r['rss_peak_bytes'] / MiB:.1f} MiB")
    if r.get("over_budget"):
        parts.append("OVER BUDGET" + " (stopped early)" * bool(r.get("stopped_early")) + " OOM" * bool(r.get("oom")))
    if "step_s" in r:
        parts.append(f"step {r['step_s']:.3f} s")
    if "val_bpb" in r:
        parts.append(f"val bpb {r['val_bpb']:.4f} ({r['tokens']} tokens, {r['train_s']:.0f} s)")
    return " ".join(parts) + f" [{r.get('worker_wall_s')} s]"
