"""``compare --suite quality``: validation bits per byte of revformer (reversible and plain, and its local / lsh / mixed
attention) and a Llama of equal parameter count, trained on the same bytes for the same tokens."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ...models import LABELS, Spec
from ...report import model_style, pyplot, save_figure
from ...runner import Runner
from .common import base_spec

CPU = {"hidden_size": 128, "num_heads": 4, "num_layers": 4, "seq_len": 256, "batch_size": 8, "steps": 250,
       "lr": 3e-3, "eval_every": 50, "val_blocks": 512}
CUDA = {"hidden_size": 256, "num_heads": 8, "num_layers": 6, "seq_len": 512, "batch_size": 16, "steps": 2000,
        "lr": 2e-3, "eval_every": 200, "val_blocks": 2048}
ATTENTION_VARIANTS = ("local", "lsh", "local/lsh")


def run(runner: Runner, args: argparse.Namespace, sizes: dict[str, Any]) -> None:
    """Same data, same tokens: revformer with `local`, `lsh` and alternating `local`/`lsh` layers (records tagged
    `attention_variant`; same parameters as `full`; `attention_variants` picks some), then revformer reversible
    (`full`), plain, and a Llama with the same parameter count. Only the models in `--models` run; the attention
    variants need `revformer`."""

    def train(spec: Spec, **tags: Any) -> None:
        payload = {"mode": "train", "spec": dataclasses.asdict(spec), "steps": sizes["steps"], "lr": sizes["lr"],
                   "eval_every": sizes["eval_every"], "val_blocks": sizes["val_blocks"], "data": args.data}
        runner.launch(payload, "quality", False, **tags)

    if "revformer" in args.models:
        layers = base_spec(args, sizes).num_layers
        mixed = ["local", "lsh"] * (layers // 2) + ["local"] * (layers % 2)  # a list of kinds: one per layer
        for variant, attention in (("local", "local"), ("lsh", "lsh"), ("local/lsh", mixed)):
            if variant in sizes.get("attention_variants", ATTENTION_VARIANTS):
                train(base_spec(args, sizes, "revformer", attention=attention), attention_variant=variant)
    for model in ("revformer", "revformer_plain", "llama"):
        if model in args.models:
            train(base_spec(args, sizes, model), attention_variant="full")


def _trained(res: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [r for r in res.get("quality", []) if r.get("mode") == "train" and r.get("ok")]


def targets(res: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, str]]:
    """Validation bpb of the reversible model within 2% of the plain path and of Llama."""
    out: list[tuple[str, str, str]] = []
    bpb = {r["spec"]["model"]: r["val_bpb"] for r in _trained(res)}
    for other in ("revformer_plain", "llama"):
        if "revformer" in bpb and other in bpb:
            rel = bpb["revformer"] / bpb[other] - 1
            out.append((f"Validation bpb within 2% of {LABELS[other]} (equal params and tokens)",
                        f"{bpb['revformer']:.4f} vs {bpb[other]:.4f} ({rel:+.2%}; lower is better)",
                        "met" if abs(rel) <= 0.02 else "missed"))
    return out


def markdown(res: dict[str, list[dict[str, Any]]]) -> list[str]:
    quality = _trained(res)
    if not quality:
        return []
    s = quality[0]["spec"]
    lines = [(f"## Quality at equal parameters and tokens (d={s['hidden_size']}, {s['num_layers']} layers, "
              f"T={s['seq_len']}, batch {s['batch_size']}; data: {quality[0]['data']})"), "",
             "| model | params | tokens | final train loss | val bpb |", "|---|---|---|---|---|"]
    for r in quality:
        tail = r["train_losses"][-20:]
        lines.append(f"| {LABELS[r['spec']['model']]} | {r['params']:,} | {r['tokens']:,} | "
                     f"{sum(tail) / len(tail):.4f} | {r['val_bpb']:.4f} |")
    return lines + [""]


def plot(out: Path, res: dict[str, list[dict[str, Any]]]) -> None:
    quality = _trained(res)
    if not quality:
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in quality:
        tokens_per_step = r["spec"]["batch_size"] * r["spec"]["seq_len"]
        losses = r["train_losses"]
        k = max(1, len(losses) // 40)
        windows = [losses[max(0, i - k + 1) : i + 1] for i in range(len(losses))]
        kw = model_style(r["spec"]["model"])
        axes[0].plot([(i + 1) * tokens_per_step for i in range(len(losses))], [sum(w) / len(w) for w in windows],
                     **{**kw, "marker": None})
        curve = r["val_bpb_curve"]
        axes[1].plot([s * tokens_per_step for s, _ in curve], [b for _, b in curve], **kw)
    axes[0].set(xlabel="training tokens", ylabel="train loss (nats/token, smoothed)", title="training loss")
    axes[1].set(xlabel="training tokens", ylabel="bits per byte", title="validation bpb (subset)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, out / "loss_curves.png")
