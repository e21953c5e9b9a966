"""Export a `bdia` revformer model as the plain Llama / Mistral / Qwen2 / Qwen3 folder it computes out of training.

    python scripts/convert.py Qwen/Qwen3-0.6B runs/qwen3-rev
    accelerate launch scripts/finetune.py --config configs/finetune.yaml --train.init_from runs/qwen3-rev \
        --data.dataset my_texts/
    python scripts/export.py runs/finetune/model runs/qwen3-finetuned      # a plain Qwen3ForCausalLM folder

The folder loads with `AutoModelForCausalLM.from_pretrained(folder)` without revformer and without remote code, and
in the serving stacks that load the architecture. A model trained from scratch exports as Qwen3 with qk_norm, Qwen2
with qkv_bias, otherwise Llama; one whose function no standard architecture computes (sublayer coupling, local or
LSH attention) is refused with the reason.
"""

import argparse
import sys

from revformer.export import ExportError, export_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a revformer save_pretrained folder or Hub id (e.g. runs/finetune/model)")
    parser.add_argument("output_dir", help="where to write the exported folder")
    parser.add_argument("--dtype", default=None, help="weights dtype, e.g. bfloat16 (default: the model's)")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="also upload the folder to this Hub repo")
    parser.add_argument("--public", action="store_true", help="create the Hub repo public (default: private)")
    args = parser.parse_args()
    try:
        out = export_model(args.model, args.output_dir, dtype=args.dtype, push_to_hub=args.push_to_hub,
                           private=not args.public)
    except ExportError as err:
        sys.exit(f"error: {err}")
    import json

    config = json.loads((out / "config.json").read_text())
    print(f"Exported {args.model} -> {out}: {config['architectures'][0]} ({config['model_type']}), "
          f"{config['num_hidden_layers']} layers, {config['dtype']}."
          + (f" Pushed to {args.push_to_hub}." if args.push_to_hub else ""))


if __name__ == "__main__":
    main()
