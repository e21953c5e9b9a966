"""Training step time with `torch.compile` of each sublayer (`train.compile: true`) against eager, and whether the
compiled sublayers still give the reversible engine the same gradients.

    python -m benchmarks compile                      # CPU; results in benchmarks/results/compile_cpu.*
    python -m benchmarks compile --device cuda --dtype bf16
    python -m benchmarks compile --tiny --out DIR/compile_cpu   # a tiny model: the test's run

What `train.compile` does in revformer/trainer.py is reproduced here exactly: `block.attention.compile()` and
`block.feed_forward.compile()` for every block. The reversible engine then calls the compiled sublayers under
`no_grad` in forward and with grad (inside an RNG-replay scope) in backward's re-run.

For every configuration: an eager model and a compiled copy with the same weights; (1) correctness: one step of
each, every parameter's gradient compared (max |g_c - g_e| / max |g_e|), and with dropout the compiled reversible
model against the compiled plain one under the same seed (the re-run must replay the compiled kernels' random
draws); (2) compile cost: the first compiled steps' wall time, recompilations and graph breaks; (3) speed: steps
interleaved eager / compiled / eager / ..., so both share the machine's noise; median step time of each.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

from .. import RESULTS
from ..env import environment
from ..models import forward_backward, synchronize, train_step
from ..probes import interleaved_times, max_relative_error
from ..report import write_jsonl
from . import command

NAME = "compile"

CONFIGS = {
    # the README's tiny recipe (configs/tiny.yaml): 4 x 128, 8 x 256 tokens, BPE 4096
    "tiny_recipe": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                        vocab_size=4096, batch=8, seq=256),
    # wider, longer sequences, local + full attention
    "d256_T1024": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                       vocab_size=4096, batch=2, seq=1024, attention_layers=["local", "full"] * 2),
}
# --tiny: the same steps on a model that compiles in seconds; it checks the pipeline, it measures nothing.
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=128, batch=1,
            seq=32)
# The recompile-limit demo's model (d=64, 2 layers), and its --tiny one.
DEMO = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512, batch=2,
            seq=128)


def build(sizes: dict[str, Any], device: str, reversible: bool, dropout: float = 0.0) -> Any:
    import torch

    from revformer import RevformerConfig, RevformerForCausalLM

    keys = {k: v for k, v in sizes.items() if k not in ("batch", "seq")}
    config = RevformerConfig(**keys, max_position_embeddings=sizes["seq"], reversible=reversible,
                             hidden_dropout=dropout, attention_dropout=dropout, use_cache=False)
    torch.manual_seed(0)
    return RevformerForCausalLM(config).to(device).train()


BACKEND = {"backend": "inductor"}  # torch.compile's default; --backend changes it (a quick rehearsal: aot_eager)


def compile_sublayers(model: Any) -> Any:
    """What revformer/trainer.py does for `train.compile: true`."""
    for block in model.model.layers:
        block.attention.compile(**BACKEND)
        block.feed_forward.compile(**BACKEND)
    return model


def step(model: Any, optimizer: Any | None, ids: Any, dtype: str, seed: int | None = None) -> float:
    """One training step (forward+backward alone without an optimizer), seeded when `seed` is given."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    if optimizer is None:
        return float(forward_backward(model, ids, ids.device.type, dtype))
    return train_step(model, optimizer, ids, ids.device.type, dtype)


def grads_of(model: Any, ids: Any, dtype: str, seed: int) -> dict[str, Any]:
    model.zero_grad(set_to_none=True)
    step(model, None, ids, dtype, seed)
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def measure(name: str, sizes: dict[str, Any], reversible: bool, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    device = args.device
    ids = torch.randint(3, sizes["vocab_size"], (sizes["batch"], sizes["seq"]),
                        generator=torch.Generator().manual_seed(1)).to(device)
    eager = build(sizes, device, reversible)
    compiled = compile_sublayers(copy.deepcopy(eager))
    record: dict[str, Any] = {"config": name, "reversible": reversible, **{k: v for k, v in sizes.items()
                                                                            if k != "attention_layers"},
                              "attention_layers": sizes.get("attention_layers", "full"), "dtype": args.dtype}

    # (2) compile cost: the first steps of the compiled model (correctness steps included) are compilation.
    start = time.perf_counter()
    try:
        error = max_relative_error(grads_of(compiled, ids, args.dtype, 0), grads_of(eager, ids, args.dtype, 0))
    except Exception as exc:  # report how compile breaks instead of dying
        record.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:2000]}")
        return record
    record["grad_rel_error_compiled_vs_eager"] = error
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-4, fused=True)
    opt_c = torch.optim.AdamW(compiled.parameters(), lr=1e-4, fused=True)
    for _ in range(2):
        step(compiled, opt_c, ids, args.dtype)
    synchronize(device)
    record["compile_warmup_s"] = time.perf_counter() - start
    for _ in range(2):
        step(eager, opt_e, ids, args.dtype)

    # (3) interleaved timing
    times = interleaved_times({"eager": lambda: step(eager, opt_e, ids, args.dtype),
                               "compiled": lambda: step(compiled, opt_c, ids, args.dtype)}, args.steps, 0, device)
    eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    record.update(ok=True, eager_step_s=eager_s, compiled_step_s=compiled_s, speedup=eager_s / compiled_s,
                  eager_times_s=times["eager"], compiled_times_s=times["compiled"],
                  frames_compiled=int(counters["stats"]["unique_graphs"]),
                  graph_breaks=int(sum(counters["graph_break"].values())),
                  recompiles=int(sum(v for k, v in counters["recompiles"].items())) if "recompiles" in counters else None)

    # (1b) dropout: compiled reversible vs compiled plain, same seed (the re-run must replay compiled RNG draws)
    if reversible and args.dropout_check:
        torch._dynamo.reset()  # fresh compile caches: the variants compiled above must not count towards the limit
        rev = compile_sublayers(build(sizes, device, True, dropout=0.1))
        plain = compile_sublayers(build(sizes, device, False, dropout=0.1))
        plain.load_state_dict(rev.state_dict())
        try:
            record["dropout_grad_rel_error_compiled_rev_vs_plain"] = max_relative_error(
                grads_of(rev, ids, args.dtype, 5), grads_of(plain, ids, args.dtype, 5))
            eager_plain = build(sizes, device, False, dropout=0.1)
            eager_plain.load_state_dict(rev.state_dict())
            record["dropout_grad_rel_error_compiled_vs_eager_plain"] = max_relative_error(
                grads_of(rev, ids, args.dtype, 5), grads_of(eager_plain, ids, args.dtype, 5))
        except Exception as exc:
            record["dropout_error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
    return record


def recompile_limit_demo(args: argparse.Namespace) -> dict[str, Any]:
    """With dropout, the forward pass (no_grad) and the re-run (grad) are different compiled graphs. When dynamo's
    recompile limit is reached (default 8 variants per code object: attention kinds x grad mode x train/eval x
    shapes), the variant past it silently runs eager, whose dropout masks differ from the compiled graph's: the
    re-run no longer replays the forward pass. Forced here with recompile_limit=1, against the default."""
    import torch

    sizes = TINY if args.tiny else DEMO
    ids = torch.randint(3, sizes["vocab_size"], (sizes["batch"], sizes["seq"]),
                        generator=torch.Generator().manual_seed(1)).to(args.device)
    record: dict[str, Any] = {"config": "recompile_limit_demo", **sizes, "dropout": 0.1}
    default = torch._dynamo.config.recompile_limit
    for limit in (default, 1):
        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = limit
        try:
            rev = compile_sublayers(build(sizes, args.device, True, dropout=0.1))
            plain = compile_sublayers(build(sizes, args.device, False, dropout=0.1))
            plain.load_state_dict(rev.state_dict())
            record[f"grad_rel_error_rev_vs_plain_limit_{limit}"] = max_relative_error(
                grads_of(rev, ids, args.dtype, 5), grads_of(plain, ids, args.dtype, 5))
        finally:
            torch._dynamo.config.recompile_limit = default
    return record


def render(records: list[dict[str, Any]], env: dict[str, Any], argv: list[str], wall: float) -> str:
    lines = ["# torch.compile of the sublayers vs eager", "",
             (f"`{command(NAME, *argv)}`" +
              f" ({wall:.0f} s): {env.get('gpu') or env['cpu']}, {env['threads']} torch thread(s), torch "
              f"{env['torch']}, transformers {env['transformers']}, {records[0]['dtype'] if records else ''}. "
              "One training step = forward, backward, fused AdamW. Steps interleaved eager / compiled, "
              "median reported; compile = the first three compiled steps (two gradient checks + one step)."), "",
             "| config | path | batch x tokens | eager step (s) | compiled step (s) | speedup | compile (s) | "
             "grad error vs eager | dropout: rev vs plain (compiled) |", "|---|---|---|---|---|---|---|---|---|"]
    demo = next((r for r in records if r["config"] == "recompile_limit_demo"), None)
    records = [r for r in records if r["config"] != "recompile_limit_demo"]
    for r in records:
        path = "reversible" if r["reversible"] else "plain"
        if not r.get("ok"):
            lines.append(f"| {r['config']} | {path} | | error: {r.get('error', '')[:200]} | | | | | |")
            continue
        drop = r.get("dropout_grad_rel_error_compiled_rev_vs_plain")
        lines.append(f"| {r['config']} | {path} | {r['batch']} x {r['seq']} | {r['eager_step_s']:.3f} | "
                     f"{r['compiled_step_s']:.3f} | {r['speedup']:.2f}x | {r['compile_warmup_s']:.0f} | "
                     f"{r['grad_rel_error_compiled_vs_eager']:.1e} | "
                     f"{'–' if drop is None else f'{drop:.1e}'} |")
    wins = [r for r in records if r.get("ok") and r["reversible"]]
    if wins:
        speedups = ", ".join(f"{r['config']} {r['speedup']:.2f}x" for r in wins)
        verdict = "wins by more than 10%" if min(r["speedup"] for r in wins) > 1.1 else "does not win by more than 10%"
        lines += ["", f"Reversible path: compile {verdict} on every configuration here ({speedups})."]
    if demo:
        errors = {k.rsplit("_", 1)[-1]: v for k, v in demo.items() if k.startswith("grad_rel_error_rev_vs_plain_limit")}
        lines += ["", "Recompile limit and dropout (d=64, 2 layers, dropout 0.1, compiled reversible vs compiled plain "
                  "gradients, same seed): " + ", ".join(f"recompile_limit={k}: {v:.1e}" for k, v in errors.items())
                  + ". Past the limit a variant runs eager, whose dropout masks differ from the compiled forward's."]
    return "\n".join(lines) + "\n"


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per model (interleaved)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--paths", default="reversible", help="comma-separated: reversible, plain")
    p.add_argument("--no-dropout-check", dest="dropout_check", action="store_false",
                   help="skip the dropout check (it compiles two more models)")
    p.add_argument("--out", type=Path, default=None, help="prefix of the .jsonl/.md results")
    p.add_argument("--backend", default="inductor",
                   help="torch.compile backend (inductor, as train.compile; aot_eager skips code generation)")
    p.add_argument("--tiny", action="store_true", help="one tiny model, 2 timed steps (the test's run)")


def run(args: argparse.Namespace) -> None:
    BACKEND["backend"] = args.backend
    configs = {"tiny": TINY} if args.tiny else CONFIGS
    if args.tiny:
        args.configs, args.steps = "tiny", min(args.steps, 2)
    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    env = environment(args.device, args.threads, ("device", "torch", "transformers", "python", "cpu", "threads",
                                                  "gpu"))
    print(json.dumps(env), flush=True)
    out = args.out or RESULTS / f"compile_{'cpu' if args.device == 'cpu' else 'cuda'}"
    start = time.perf_counter()
    records = []
    for name in args.configs.split(","):
        for path in args.paths.split(","):
            record = {**measure(name, configs[name], path == "reversible", args), **env}
            records.append(record)
            print(json.dumps({k: v for k, v in record.items() if not k.endswith("times_s")}), flush=True)
    demo = {**recompile_limit_demo(args), **env}
    print(json.dumps(demo), flush=True)
    records.append(demo)
    text = render(records, env, args.argv, time.perf_counter() - start)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out.with_suffix(".jsonl"), records)
    out.with_suffix(".md").write_text(text)
    print(text)
