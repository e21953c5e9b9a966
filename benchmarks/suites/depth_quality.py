"""Quality against depth: revformer (reversible) and a Llama of equal parameters on the same tokens, at several depths.

Usage: python -m benchmarks depth_quality [--tiny] [--jobs 2] [--out DIR] [run|ablate|bdia|seed|llama_scaled|report]

The models have the same width, depth, heads, SwiGLU width, byte vocabulary and tied embeddings; their parameter
counts are equal (printed per run). `run` sweeps and trains revformer as shipped, Llama, and revformer whose hidden
state is the mean of its two top streams (`revformer_mean`, the ablations' base; benchmarks.topologies.MeanMerge): for
each depth and model the learning rate is picked on a short sweep (`sweep_steps`, validation bpb on an evenly spaced
sample of the validation split), then the best one trains for `steps` steps, logging validation bpb every
`eval_every` steps on the split's first `curve_blocks` blocks and scoring the whole validation split at the end.
revformer's plain path (`reversible=False`) trains once at `plain_depth` with revformer's learning rate as a check
that the reversible engine changes nothing. The reversible runs report the reconstruction error of their trained
weights (float32 streams; 0 would mean bit-exact).

`ablate`: one controlled run per hypothesis on the deepest mean-merge model, stopped at `ablation_steps` on the
main runs' schedule (the learning rate, then each of benchmarks.models.ABLATIONS at the best rate). `bdia`: the bdia
coupling from scratch at Llama's rates. `seed`: Llama's deepest main run again with another seed.

A second baseline, Llama with GPT-2's depth-scaled initialisation (o_proj and down_proj weights at std
0.02 / sqrt(2 * layers), the rest transformers' default; benchmarks.models.scale_output_init), is swept and trained by
`run` like the other models at `llama_scaled_depths`; `llama_scaled` runs only it, to add it to recorded results.

Data: the stdlib byte corpus of `revformer.data` (files held out by hash for validation), as in `compare --suite
quality`; revformer.trainer's learning-rate schedule (5% warm-up, cosine to 10%), AdamW (0.9, 0.95) with weight decay
0.1, gradients clipped at norm 1.0 (benchmarks.corpus). Every run is a fresh process (`python -m benchmarks.worker`),
`--jobs` of them at once, one thread each. Results are appended run by run to
`benchmarks/results/depth_quality/<phase>.jsonl`, so a stopped sweep resumes where it stopped; README.md,
depth_quality.png and ablations.png are re-rendered after every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import RESULTS
from ..models import ABLATIONS, LABELS, Spec, depth_scaled_std
from ..report import model_style, pyplot, read_records, save_figure
from ..runner import Runner
from . import command

NAME = "depth_quality"

OUT = RESULTS / "depth_quality"
# The ablations' base: revformer whose hidden state is the mean of its top streams (its sweep and main runs are kept
# under this name); against it the ablations measured the newest-stream output, revformer's own.
ABLATION_BASE = "revformer_mean"
SWEPT = ("revformer", "llama", ABLATION_BASE)  # swept and trained by `run`
SCALED_LLAMA = "llama_scaled_init"  # swept and trained by `run` (and `llama_scaled` alone) at `llama_scaled_depths`


@dataclass
class Sizes:
    hidden_size: int = 128
    num_heads: int = 4
    seq_len: int = 256
    batch_size: int = 8
    depths: list[int] = field(default_factory=lambda: [4, 12, 24])
    lrs: list[float] = field(default_factory=lambda: [1e-3, 2e-3, 4e-3])
    sweep_steps: int = 200
    steps: int = 1000
    eval_every: int = 100
    curve_blocks: int = 128
    sweep_val_blocks: int = 512
    val_blocks: int = 10**9  # the whole validation split
    plain_depth: int = 4
    # Controlled ablations of the deepest revformer: one change each against its main run, on the same schedule,
    # stopped after `ablation_steps` and compared with the main runs' curves at that step.
    ablation_depth: int = 24
    ablation_lrs: list[float] = field(default_factory=lambda: [1e-3, 2e-3])
    ablation_steps: int = 500
    # The structural hypotheses (benchmarks.models.ABLATIONS), each at the rate best at `ablation_steps` among the
    # main run and the rate ablations, so that each differs from that run in its one change.
    ablation_models: list[str] = field(default_factory=lambda: list(ABLATIONS))
    # The bdia coupling from scratch (`bdia` command): main runs at these depths, at Llama's swept rate (out of
    # training bdia is a Llama block stack); and the smaller gamma at `bdia_gamma64_depths`.
    bdia_depths: list[int] = field(default_factory=lambda: [4, 12, 24])
    bdia_gamma64_depths: list[int] = field(default_factory=lambda: [24])
    # Run-to-run noise (`seed` command): Llama's main run at these depths again with another seed (weights and
    # batch order), which sizes the differences the tables can resolve.
    seed_depths: list[int] = field(default_factory=lambda: [24])
    seed: int = 1
    # Llama with GPT-2's depth-scaled initialisation: swept over `lrs` and trained like the other `run` models at these
    # depths (`llama_scaled`: these runs alone).
    llama_scaled_depths: list[int] = field(default_factory=lambda: [12, 24])


# --tiny: every phase at one depth, a few steps per run (the test's run); nothing it measures means anything.
TINY = Sizes(hidden_size=32, num_heads=2, seq_len=64, batch_size=2, depths=[1], lrs=[3e-3, 1e-2], sweep_steps=3,
             steps=4, eval_every=2, curve_blocks=4, sweep_val_blocks=8, val_blocks=16, plain_depth=1,
             ablation_depth=1, ablation_lrs=[1e-3], ablation_steps=2, bdia_depths=[1], bdia_gamma64_depths=[1],
             seed_depths=[1], llama_scaled_depths=[1])


def spec(sizes: Sizes, model: str, layers: int) -> Spec:
    return Spec(model=model, hidden_size=sizes.hidden_size, num_layers=layers, num_heads=sizes.num_heads,
                  seq_len=sizes.seq_len, batch_size=sizes.batch_size, threads=1)


def key(record: dict[str, Any]) -> tuple[str, int, float]:
    return record["spec"]["model"], record["spec"]["num_layers"], record["lr"]


def done(out: Path, phase: str) -> dict[tuple[str, int, float], dict[str, Any]]:
    return {key(r): r for r in read_records(out / f"{phase}.jsonl") if r.get("mode") == "train" and r.get("ok")}


def best_lrs(out: Path) -> dict[tuple[str, int], float]:
    """(model, depth) -> the swept learning rate with the lowest validation bpb."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for (model, layers, _), r in done(out, "sweep").items():
        if (model, layers) not in best or r["val_bpb"] < best[(model, layers)]["val_bpb"]:
            best[(model, layers)] = r
    return {k: r["lr"] for k, r in best.items()}


def sweep_and_train(runner: Runner, out: Path, sizes: Sizes, workers: int, runs: list[tuple[str, int]]) -> None:
    """Each (model, depth) of `runs`: the learning-rate sweep over `sizes.lrs`, then the main run at the best rate;
    with revformer at `plain_depth` among them, its plain path at revformer's rate too. Recorded runs are skipped."""
    jobs = [(spec(sizes, m, d), lr) for m, d in runs for lr in sizes.lrs]
    run_phase(runner, out, "sweep", jobs, sizes.sweep_steps, sizes.sweep_val_blocks, sizes, workers)
    lrs = best_lrs(out)
    missing = [k for k in runs if k not in lrs]
    if missing:
        raise SystemExit(f"the sweep left no result for {missing}; see {out / 'sweep.jsonl'}")
    jobs = [(spec(sizes, m, d), lrs[(m, d)]) for m, d in runs]
    if ("revformer", sizes.plain_depth) in runs:
        jobs.append((spec(sizes, "revformer_plain", sizes.plain_depth), lrs[("revformer", sizes.plain_depth)]))
    run_phase(runner, out, "main", jobs, sizes.steps, sizes.val_blocks, sizes, workers)


def run_phase(runner: Runner, out: Path, phase: str, jobs: list[tuple[Spec, float]], steps: int,
              val_blocks: int, sizes: Sizes, workers: int, stop_after: int | None = None) -> None:
    """Train the jobs not yet recorded, longest (deepest) first, `workers` at a time."""
    finished = done(out, phase)
    todo = [(s, lr) for s, lr in jobs if (s.model, s.num_layers, lr) not in finished]
    todo.sort(key=lambda job: -job[0].num_layers)

    def train(job: tuple[Spec, float]) -> None:
        s, lr = job
        payload = {"mode": "train", "spec": dataclasses.asdict(s), "steps": steps, "lr": lr,
                   "eval_every": sizes.eval_every, "val_blocks": val_blocks, "data": "project",
                   "curve_blocks": sizes.curve_blocks, "stop_after": stop_after}
        runner.launch(payload, phase, False, sizes=dataclasses.asdict(sizes))
        report(out)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(train, todo))


# ---------------------------------------------------------------------------------------------------- report


def pct(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+.1f}%"


def gap(r: dict[str, Any] | None, base: dict[str, Any] | None) -> str:
    """Run `r`'s final bpb against `base`'s, or "" where either is missing."""
    return pct(r["val_bpb"], base["val_bpb"]) if r and base else ""


def cell(r: dict[str, Any] | None) -> str:
    """A main run's final bpb and its rate, or "running" where it has no record yet."""
    return f"{r['val_bpb']:.4f} ({r['lr']:g})" if r else "running"


def render(out: Path) -> str:
    sweep, main = done(out, "sweep"), done(out, "main")
    lrs = best_lrs(out)
    depths = sorted({layers for _, layers, _ in [*sweep, *main]})
    any_record = next(iter([*main.values(), *sweep.values()]), None)
    lines = ["# Quality against depth: revformer vs Llama at equal parameters and tokens", ""]
    if any_record is None:
        return "\n".join([*lines, "No runs recorded yet."])
    s, env = any_record["sizes"], any_record
    lines += [
        (f"Byte-level stdlib corpus ({any_record['data']}), d={s['hidden_size']}, {s['num_heads']} heads, blocks of "
         f"{s['seq_len']} tokens x {s['batch_size']}; AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, 5% warm-up, "
         f"cosine to 10%. Learning rate per architecture and depth: best of {s['lrs']} after {s['sweep_steps']} "
         f"steps (validation bpb on {s['sweep_val_blocks']} evenly spaced blocks); then {s['steps']} steps "
         f"({s['steps'] * s['batch_size'] * s['seq_len'] / 1e6:.2f}M tokens) at that rate. Final bpb: the whole "
         f"validation split. Equal parameter counts: same width, depth, heads, SwiGLU width and tied embeddings."),
        *scaled_note(main),
        "",
        (f"Machine: {env.get('cpu') or env.get('device_name', '?')}, torch {env.get('torch')}, transformers "
         f"{env.get('transformers')}, one thread per run. Reproduce: `{command(NAME)}`."),
        "",
        ("| layers | params | Llama bpb (lr) | revformer bpb (lr) | revformer vs Llama "
         "| Llama, depth-scaled init bpb (lr) | revformer vs depth-scaled Llama "
         "| mean merge (earlier default) bpb (lr) | mean merge vs Llama | reconstruction error "
         "| run time Llama / revformer |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in depths:
        llama = main.get(("llama", d, lrs.get(("llama", d))))
        rev = main.get(("revformer", d, lrs.get(("revformer", d))))
        mean = main.get((ABLATION_BASE, d, lrs.get((ABLATION_BASE, d))))
        scaled = main.get((SCALED_LLAMA, d, lrs.get((SCALED_LLAMA, d))))
        if not llama and not rev:
            continue
        scaled_cell = cell(scaled) if scaled or (SCALED_LLAMA, d) in lrs else ""  # "": not run at this depth
        recon = f"{rev['reconstruction_error']:.2e}" if rev and rev.get("reconstruction_error") is not None else ""
        params = f"{(llama or rev)['params'] / 1e6:.2f}M"
        times = " / ".join(f"{r['train_s'] / 60:.0f} min" if r else "-" for r in (llama, rev))
        lines.append(f"| {d} | {params} | {cell(llama)} | {cell(rev)} | {gap(rev, llama)} | {scaled_cell} | "
                     f"{gap(rev, scaled)} | {cell(mean) if mean else ''} | {gap(mean, llama)} | {recon} | {times} |")
    plain = [r for (m, _, _), r in main.items() if m == "revformer_plain"]
    for r in plain:
        d = r["spec"]["num_layers"]
        rev = main.get(("revformer", d, r["lr"]))
        vs = f" ({r['val_bpb'] - rev['val_bpb']:+.4f} vs the reversible run's {rev['val_bpb']:.4f})" if rev else ""
        lines += ["", (f"Check, revformer with `reversible=False` at {d} layers, lr {r['lr']:g}: "
                       f"{r['val_bpb']:.4f} bpb{vs}.")]
    lines += ["", "Learning-rate sweep (validation bpb after the short run):", "",
              "| layers | model | " + " | ".join(f"lr {lr:g}" for lr in s["lrs"]) + " |",
              "|---|---|" + "---|" * len(s["lrs"])]
    for d in depths:
        for m in (*SWEPT, SCALED_LLAMA):
            cells = [f"{sweep[(m, d, lr)]['val_bpb']:.4f}" if (m, d, lr) in sweep else "" for lr in s["lrs"]]
            if any(cells):
                lines.append(f"| {d} | {m} | " + " | ".join(cells) + " |")
    ablations = done(out, "ablation")
    if ablations:
        first = next(iter(ablations.values()))
        stop, d = first["stopped_at"], first["spec"]["num_layers"]  # from the ablation's own record

        def at(r: dict[str, Any] | None) -> str:
            bpb = bpb_at(r, stop) if r else None
            return f"{bpb:.4f}" if bpb is not None else ""

        llama = main.get(("llama", d, lrs.get(("llama", d))))
        reference = ablation_reference(out, Sizes(**{**s, "ablation_depth": d, "ablation_steps": stop}))
        lines += ["", f"Ablations of the {d}-layer revformer, one change each, same schedule, "
                      f"stopped after {stop} steps (validation bpb on the curve sample at that step; the main runs' "
                      "curves at the same step beside them). The structural changes run at the rate that was best "
                      f"at step {stop}" + (f" (lr {reference['lr']:g})" if reference else "") + ":", "",
                  f"| run | change | bpb at step {stop} | vs Llama |", "|---|---|---|---|"]

        def row(name: str, change: str, r: dict[str, Any] | None) -> str:
            bpb, base = (bpb_at(r, stop) if r else None), (bpb_at(llama, stop) if llama else None)
            return f"| {name} | {change} | {at(r)} | {pct(bpb, base) if bpb and base else ''} |"

        for m in (ABLATION_BASE, "llama", SCALED_LLAMA, "revformer"):
            r = main.get((m, d, lrs.get((m, d))))
            if r:
                lines.append(row(f"{m} main run", f"lr {r['lr']:g} (swept)", r))
        for (m, layers, lr), r in sorted(done(out, "bdia").items()):
            if layers == d:
                lines.append(row(f"{m} run", f"{LABELS[m].split(', ', 1)[1]}, lr {lr:g}", r))
        for (m, _, lr), r in sorted(ablations.items(), key=lambda kv: (kv[0][0] != ABLATION_BASE, kv[0])):
            change = f"lr {lr:g}" if m == ABLATION_BASE else f"{ABLATIONS[m]}, lr {lr:g}"
            lines.append(row(f"{m} ablation", change, r))
        lines += ["", "![ablations](ablations.png)"]
    bdia = done(out, "bdia")
    if bdia:
        lines += ["", ("The bdia coupling from scratch (fixed-point streams; a Llama block stack out of training): "
                       "main runs at Llama's swept rate, the same schedule and tokens:"), "",
                  ("| layers | gamma | Llama bpb | revformer (sublayer) bpb | revformer, bdia bpb | bdia vs Llama | "
                   "reconstruction error | run time |"), "|---|---|---|---|---|---|---|---|"]
    for (m, d, lr), r in sorted(bdia.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        llama = main.get(("llama", d, lrs.get(("llama", d))))
        rev = main.get(("revformer", d, lrs.get(("revformer", d))))
        recon, gamma = r.get("reconstruction_error"), LABELS[m].rsplit(" ", 1)[-1].rstrip(")")
        lines.append(f"| {d} | {gamma} | {llama['val_bpb']:.4f} | {rev['val_bpb']:.4f} | {r['val_bpb']:.4f} "
                     f"(lr {lr:g}) | {pct(r['val_bpb'], llama['val_bpb'])} | {recon if recon is not None else '-'} | "
                     f"{r['train_s'] / 60:.0f} min |" if llama and rev
                     else f"| {d} | {gamma} | | | {r['val_bpb']:.4f} | | | |")
    seeds = done(out, "seed")
    for (m, d, lr), r in sorted(seeds.items()):
        first = main.get((m, d, lr))
        vs = f" against seed {first['spec']['seed']}'s {first['val_bpb']:.4f} ({pct(r['val_bpb'], first['val_bpb'])})"
        lines += ["", f"Run-to-run spread: {m} at {d} layers, lr {lr:g}, seed {r['spec']['seed']} (other weights "
                      f"and batch order): {r['val_bpb']:.4f} bpb" + (vs if first else "") + "."]
    walls = [r["worker_wall_s"] for phase in (sweep, main, ablations, bdia, seeds) for r in phase.values()]
    lines += ["", (f"Runs recorded: {len(sweep)} sweep + {len(main)} main + {len(ablations)} ablation + {len(bdia)} "
                   f"bdia + {len(seeds)} seed, {sum(walls) / 3600:.2f} h of process time in all (the script runs "
                   "`--jobs` of them at once)."), "", "![curves](depth_quality.png)", ""]
    return "\n".join(lines)


def scaled_note(main: dict[tuple[str, int, float], dict[str, Any]]) -> list[str]:
    """The report's line on the depth-scaled Llama, where one has a main run (none in older results)."""
    runs = sorted((r for (m, _, _), r in main.items() if m == SCALED_LLAMA), key=lambda r: r["spec"]["num_layers"])
    if not runs:
        return []
    stds = ", ".join(f"{depth_scaled_std(r['spec']['num_layers']):.4f} at {r['spec']['num_layers']}" for r in runs)
    return ["", ("Llama, depth-scaled init: Llama whose o_proj and down_proj weights are drawn at std "
                 f"0.02 / sqrt(2 * layers) ({stds} layers; GPT-2's initialisation), everything else transformers' "
                 "default (normal, std 0.02); swept over the same rates and trained on the same schedule and tokens.")]


def plot(out: Path) -> None:
    main = {**done(out, "main"), **done(out, "bdia")}  # the bdia runs share the main runs' schedule
    depths = sorted({layers for _, layers, _ in main})
    if not depths:
        return
    fig, axes = pyplot().subplots(1, len(depths), figsize=(4.2 * len(depths), 3.6), squeeze=False)
    for ax, d in zip(axes[0], depths, strict=True):
        for (m, layers, _), r in sorted(main.items()):
            if layers == d:
                draw_curve(ax, r, model_style(m))
        label_axes(ax, f"{d} layers")
    save_figure(fig, out / "depth_quality.png")


def draw_curve(ax: Any, record: dict[str, Any], style: dict[str, Any], until: int | None = None) -> None:
    """One run's validation curve against training tokens, up to step `until` (all of it by default)."""
    tokens = record["spec"]["batch_size"] * record["spec"]["seq_len"]
    points = [(step * tokens / 1e6, bpb) for step, bpb in record["val_bpb_curve"] if until is None or step <= until]
    label = f"{LABELS[record['spec']['model']]}, lr {record['lr']:g}"
    ax.plot(*zip(*points), **{**style, "markersize": 4, "label": label})


def label_axes(ax: Any, title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation bpb (curve sample)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_ablations(out: Path) -> None:
    """The ablated depth's curves up to the ablations' stop: the main and bdia runs and every ablation."""
    ablations = done(out, "ablation")
    if not ablations:
        return
    first = next(iter(ablations.values()))
    stop, d = first["stopped_at"], first["spec"]["num_layers"]
    full = {**done(out, "main"), **done(out, "bdia")}
    runs = [r for (_, layers, _), r in full.items() if layers == d] + list(ablations.values())
    fig, ax = pyplot().subplots(figsize=(6.4, 4.2))
    rate_markers = iter("osDv")
    for r in runs:
        style = model_style(r["spec"]["model"])
        if r["spec"]["model"] == ABLATION_BASE:  # the rate runs of one model: one colour, a marker per rate
            style["marker"] = next(rate_markers)
        draw_curve(ax, r, style, until=stop)
    label_axes(ax, f"{d} layers: ablations, first {stop} steps")
    save_figure(fig, out / "ablations.png")


def report(out: Path) -> str:
    text = render(out)
    (out / "README.md").write_text(text)
    plot(out)
    plot_ablations(out)
    return text


def bpb_at(record: dict[str, Any], step: int) -> float | None:
    """Validation bpb on the curve sample at `step`, or None where the curve has no point there."""
    return next((bpb for s, bpb in record["val_bpb_curve"] if s == step), None)


def ablation_reference(out: Path, sizes: Sizes) -> dict[str, Any] | None:
    """The ablations' base at `ablation_depth` with the lowest bpb at `ablation_steps`: its main run or a rate
    ablation."""
    d, stop = sizes.ablation_depth, sizes.ablation_steps
    runs = [r for (m, layers, _), r in [*done(out, "main").items(), *done(out, "ablation").items()]
            if m == ABLATION_BASE and layers == d and bpb_at(r, stop) is not None]
    return min(runs, key=lambda r: bpb_at(r, stop), default=None)


def ablate(runner: Runner, out: Path, sizes: Sizes, workers: int) -> None:
    """The hypotheses, one controlled run each on the mean-merge model at `ablation_depth` and its main run's
    schedule, stopped at `ablation_steps`: the learning rate (the other swept rates), then each structural change
    at the best of those rates."""
    depth = sizes.ablation_depth
    jobs = [(spec(sizes, ABLATION_BASE, depth), lr) for lr in sizes.ablation_lrs]
    run_phase(runner, out, "ablation", jobs, sizes.steps, sizes.val_blocks, sizes, workers, sizes.ablation_steps)
    reference = ablation_reference(out, sizes)
    if reference is None:
        raise SystemExit(f"no {ABLATION_BASE} run at {depth} layers reached step {sizes.ablation_steps}; run the "
                         "main runs first (the `run` command)")
    jobs = [(spec(sizes, m, depth), reference["lr"]) for m in sizes.ablation_models]
    run_phase(runner, out, "ablation", jobs, sizes.steps, sizes.val_blocks, sizes, workers, sizes.ablation_steps)


def bdia_phase(runner: Runner, out: Path, sizes: Sizes, workers: int) -> None:
    """revformer with the bdia coupling at `bdia_depths` (and gamma 1/64 at `bdia_gamma64_depths`), at Llama's swept
    rate there, on the main runs' schedule."""
    lrs = best_lrs(out)
    jobs = [(spec(sizes, "revformer_bdia", d), lrs[("llama", d)]) for d in sizes.bdia_depths]
    jobs += [(spec(sizes, "revformer_bdia_gamma64", d), lrs[("llama", d)]) for d in sizes.bdia_gamma64_depths]
    run_phase(runner, out, "bdia", jobs, sizes.steps, sizes.val_blocks, sizes, workers)


def seed_phase(runner: Runner, out: Path, sizes: Sizes, workers: int) -> None:
    """Llama's main runs at `seed_depths` again with seed `sizes.seed`: the run-to-run spread."""
    lrs = best_lrs(out)
    jobs = [(dataclasses.replace(spec(sizes, "llama", d), seed=sizes.seed), lrs[("llama", d)])
            for d in sizes.seed_depths]
    run_phase(runner, out, "seed", jobs, sizes.steps, sizes.val_blocks, sizes, workers)


def scaled_runs(sizes: Sizes) -> list[tuple[str, int]]:
    """The depth-scaled Llama's (model, depth) pairs."""
    return [(SCALED_LLAMA, d) for d in sizes.llama_scaled_depths]


def llama_scaled_phase(runner: Runner, out: Path, sizes: Sizes, workers: int) -> None:
    """Only the depth-scaled Llama of `run` (its sweep and main runs at `llama_scaled_depths`): adds it to results
    that hold the other models."""
    sweep_and_train(runner, out, sizes, workers, scaled_runs(sizes))


# the commands after the main runs
PHASES = {"ablate": ablate, "bdia": bdia_phase, "seed": seed_phase, "llama_scaled": llama_scaled_phase}


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("command", nargs="?", default="run", choices=("run", *PHASES, "report"),
                   help="run: the sweep and the main runs; ablate: the ablations of the deepest revformer; bdia: the "
                        "bdia coupling from scratch; seed: Llama's deepest main run with another seed; llama_scaled: "
                        "Llama with GPT-2's depth-scaled initialisation alone (its sweep and main runs)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (the test's smoke run)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--worker-timeout", type=float, default=4 * 3600.0)


def run(args: argparse.Namespace) -> None:
    sizes = TINY if args.tiny else Sizes()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command == "report":
        print(report(args.out))
        return
    runner = Runner(args.out, args.worker_timeout)
    start = time.perf_counter()
    if args.command in PHASES:
        PHASES[args.command](runner, args.out, sizes, args.jobs)
        print(report(args.out))
        return
    runs = [(m, d) for d in sizes.depths for m in SWEPT]
    sweep_and_train(runner, args.out, sizes, args.jobs, [*runs, *scaled_runs(sizes)])
    print(report(args.out))
    print(f"== done in {(time.perf_counter() - start) / 60:.1f} min", file=sys.stderr)
    failed = [r for phase in ("sweep", "main") for r in read_records(args.out / f"{phase}.jsonl") if not r.get("ok")]
    if failed:
        raise SystemExit(f"{len(failed)} runs failed; their errors are in {args.out}/*.jsonl")
