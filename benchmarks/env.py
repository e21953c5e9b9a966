"""What every benchmark records about the machine and the software it ran on."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

from . import REPO

# Every field `environment` knows, in the order the records store them.
FIELDS = ("device", "torch", "transformers", "python", "cpu", "cpu_count", "threads", "gpu", "cuda")


def cpu_name() -> str:
    """The CPU model as Linux names it (e.g. 'Intel(R) Xeon(R) Processor'), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str, threads: int, fields: tuple[str, ...] = FIELDS) -> dict[str, Any]:
    """Versions and hardware of this process, stored with every measurement; `fields` picks the keys a suite has
    always recorded (`gpu` and `cuda` only on a CUDA device)."""
    import torch
    import transformers

    env: dict[str, Any] = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
                           "threads": threads}
    if device.startswith("cuda"):
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return {k: env[k] for k in fields if k in env}


def device_tag(device: str) -> str:
    """Results folder name of the compare suite: `cpu`, or `cuda-<gpu name>`."""
    if not device.startswith("cuda"):
        return "cpu"
    return "cuda-" + gpu_slug()


def gpu_slug() -> str:
    """The first GPU's name as a folder name ('NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3')."""
    import torch

    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


def git_commit() -> str | None:
    """The checkout's commit, so a result names the code that produced it."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
