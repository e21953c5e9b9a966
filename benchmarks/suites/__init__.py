"""The benchmark suites, one module each, and the one way to run them: ``python -m benchmarks SUITE [options]`` from
the checkout root (``python -m benchmarks --help`` lists them).

Every suite module follows one protocol:

- ``NAME``: the suite's name on the command line (a key of ``SUITES``);
- its docstring: what it measures (the first paragraph is its summary; the whole is its ``--help`` text);
- ``arguments(parser)``: declares its command-line options on the ``argparse`` parser the entry point made;
- ``run(args) -> int | None``: measures, writes its results (JSON lines or JSON) and their report (Markdown, plots)
  under its output folder, prints the report, and returns the exit status (None: 0). ``args.argv`` holds the
  suite's own arguments as given, for the provenance some reports print.

Suites that re-render their report from recorded results do it through their own options: ``compare report``,
``depth_quality report``, ``conversion --stages report``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from types import ModuleType

# name -> module in this package, in the order `--help` lists them
SUITES = {
    "compare": "compare",  # revformer against Llama +/- checkpointing and HF Reformer: memory, time, length, quality
    "depth_quality": "depth_quality",
    "conversion": "conversion",
    "fixed_point": "fixed_point",
    "lsh": "lsh",
    "compile": "torch_compile",
    "fsdp": "fsdp",
    "documents": "documents",
    "data": "data",
    "gpu_check": "gpu_check",
    "breakdown": "breakdown",  # which tensors hold the peak of one forward+backward (torch.profiler)
}
ENTRY = "python -m benchmarks"


def command(suite: str, *args: str) -> str:
    """The command line that runs `suite` with `args`, as reports print it."""
    return " ".join([ENTRY, suite, *args])


def argv_of(suite: str, *args: str) -> list[str]:
    """The argument vector that runs `suite` with `args` in a fresh process (cwd: the checkout root)."""
    return [sys.executable, "-m", "benchmarks", suite, *args]


def load(name: str) -> ModuleType:
    """The module of suite `name`."""
    if name not in SUITES:
        raise SystemExit(f"unknown benchmark suite {name!r}; choose from {', '.join(SUITES)}")
    return importlib.import_module(f"{__name__}.{SUITES[name]}")


def summary(module: ModuleType) -> str:
    """The first paragraph of a suite's docstring, on one line."""
    return " ".join((module.__doc__ or "").strip().split("\n\n")[0].split())


def parser(name: str) -> argparse.ArgumentParser:
    """The command-line parser of suite `name`: its docstring as help text, its options as it declares them."""
    module = load(name)
    p = argparse.ArgumentParser(prog=f"{ENTRY} {name}", description=module.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    module.arguments(p)
    return p


def usage() -> str:
    lines = [f"usage: {ENTRY} SUITE [options]   ({ENTRY} SUITE --help: the suite's options)", "", "suites:"]
    for name in SUITES:
        lines += textwrap.wrap(summary(load(name)), 118, initial_indent=f"  {name:<15}", subsequent_indent=" " * 17)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one suite: `argv` = [SUITE, its options...]."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    args = parser(name).parse_args(rest)
    args.argv = rest
    return load(name).run(args) or 0
