"""revformer's measurement harness: peer models, fresh-process workers, memory and time probes, reports, suites.

Not part of the revformer wheel (``pyproject.toml`` packages ``revformer*`` only): it runs from a checkout, through
the thin entry points ``scripts/benchmark*.py`` and ``scripts/gpu_check.py``, or as ``python -m benchmarks.cli``.

- ``models``: the compared models (revformer, its plain path, Llama +/- checkpointing, HF Reformer) and one step;
- ``runner`` / ``worker``: every measurement in a fresh process (``python -m benchmarks.worker '<json>'``), its
  records printed as JSON lines and collected by the parent;
- ``probes``: peak memory (MemTracker, RSS, CUDA) and step time inside a worker;
- ``corpus``: the byte-level stdlib corpus of ``revformer.data`` and validation bits per byte;
- ``env``: what every record says about the machine; ``report``: JSON lines, Markdown and plot writers;
- ``cli``: ``scripts/benchmark.py`` (its suites in ``suites/``); ``suites/``: one module per benchmark.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
