"""The README's quick start, run as written (at reduced steps), so that the front page cannot drift from the code."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, env

# Fewer steps and a smaller BPE sample; everything else is the command as the README prints it.
REDUCED = ["--train.max_steps", "6", "--train.warmup_steps", "2", "--train.eval_every", "3", "--train.eval_batches", "2",
           "--train.checkpoint_every", "3", "--data.tokenizer_train_max_bytes", "1000000"]  # fmt: skip


def quick_start_commands() -> tuple[str, str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)
    assert len(blocks) == 2, "the quick start has two copy-paste commands: the main job and the tests"
    return blocks[0].strip(), blocks[1].strip()


def test_readme_test_command_is_what_ci_runs():
    _, tests = quick_start_commands()
    assert tests == 'pip install -e ".[dev]" && python -m pytest -q'
    assert tests.replace("pip", "python -m pip install --quiet", 1).replace("install -e", "-e", 1) in (
        ROOT / ".ci" / "run"
    ).read_text()


@pytest.mark.slow
def test_readme_main_job_runs_as_written(tmp_path):
    main_job, _ = quick_start_commands()
    steps = [shlex.split(step) for step in main_job.split("&&")]
    assert steps[0] == ["pip", "install", "-e", "."]  # done: the tests run from an installed checkout
    outputs = []
    for argv in steps[1:]:
        argv = [str(ROOT / a) if a.startswith(("scripts/", "configs/")) else a for a in argv]
        if argv[:2] == ["accelerate", "launch"]:
            argv = [sys.executable, "-m", "accelerate.commands.launch", *argv[2:], *REDUCED]
        else:
            assert argv[0] == "python", argv
            argv = [sys.executable, *argv[1:]]
        result = subprocess.run(argv, cwd=tmp_path, env=env(tmp_path), capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        outputs.append(result.stdout)
    model = tmp_path / "runs" / "tiny" / "model"
    assert (model / "model.safetensors").exists() and (model / "tokenizer.json").exists()
    assert "final:" in outputs[0] and "bpb" in outputs[0]
    assert outputs[-1].strip().startswith("def ")  # generate.py prints the prompt and its continuation


def test_links_of_the_readme_and_docs_resolve():
    """Every relative link of the README and of docs/ names a file that exists (and an anchor its page has)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 5
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)", page.read_text()):
            path, anchor = target
            if path.startswith(("http://", "https://")):
                continue
            resolved = (page.parent / path).resolve()
            assert resolved.exists(), f"{page.name} links to {path}, which does not exist"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", resolved.read_text(), flags=re.M)
                slugs = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
                assert anchor in slugs, f"{page.name} links to {path}#{anchor}, a heading it lacks"
