"""revformer's measurement harness: peer models, fresh-process workers, memory and time probes, reports, suites.

Not part of the revformer wheel (``pyproject.toml`` packages ``revformer*`` only): it runs from a checkout, as
``python -m benchmarks SUITE [options]`` from the checkout root (``python -m benchmarks --help`` lists the suites).

- ``suites/``: one module per suite, all following one protocol (``benchmarks.suites``: ``NAME``, ``arguments``,
  ``run``); ``suites/compare/`` holds the parts of the compare suite (depth, core, length, longseq, quality, memory,
  cost), which share one results folder and README;
- ``models``: the compared models (revformer and its variants, Llama +/- checkpointing, HF Reformer) and one step;
- ``runner`` / ``worker``: every measurement in a fresh process (``python -m benchmarks.worker '<json>'``), its
  records printed as JSON lines and collected by the parent;
- ``probes``: peak memory (MemTracker, RSS, CUDA) and step time inside a worker;
- ``corpus``: the byte-level stdlib corpus of ``revformer.data``, validation bits per byte, and the training run of
  the quality measurements (revformer.trainer's schedule);
- ``env``: what every record says about the machine; ``report``: JSON lines, Markdown and plot writers.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
