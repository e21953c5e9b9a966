"""Convert a pretrained Llama-family causal LM (Hub id or local folder) into a reversible revformer model folder.

    python scripts/convert.py HuggingFaceTB/SmolLM2-135M runs/smollm2-rev
    accelerate launch scripts/finetune.py --config configs/finetune.yaml --train.init_from runs/smollm2-rev \
        --data.dataset my_texts/
    # --coupling sublayer changes the function: heal it by distillation from the source first
    accelerate launch scripts/finetune.py --config configs/heal.yaml --train.init_from runs/smollm2-rev \
        --train.distill_from HuggingFaceTB/SmolLM2-135M --data.dataset my_texts/
"""

import argparse
import sys

from revformer.configuration_revformer import COUPLINGS
from revformer.conversion import ConversionError, convert_to_revformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="Hub id or local folder of a Llama/Mistral/Qwen2/Qwen3 causal LM")
    parser.add_argument("output_dir", help="where to write the revformer folder")
    parser.add_argument("--coupling", choices=COUPLINGS, default="bdia",
                        help="how the source's layers join the two streams (default: bdia, the source itself out of "
                             "training)")
    parser.add_argument("--bdia-gamma", type=float, default=None,
                        help="gamma of the bdia coupling, a power of two (default: 1/16, which training barely "
                             "perturbs)")
    parser.add_argument("--dtype", default=None, help="weights dtype, e.g. float32 or bfloat16 (default: the source's)")
    args = parser.parse_args()
    try:
        model = convert_to_revformer(args.source, args.output_dir, coupling=args.coupling, dtype=args.dtype,
                                     **({} if args.bdia_gamma is None else {"bdia_gamma": args.bdia_gamma}))
    except ConversionError as err:
        sys.exit(f"error: {err}")
    count = sum(p.numel() for p in model.parameters())
    print(f"Converted {args.source} -> {args.output_dir}: {model.config.num_hidden_layers} layers, "
          f"{model.config.coupling} coupling, {count / 1e6:.1f}M parameters. "
          + ("Out of training it is the source; fine-tune it as it is." if model.config.coupling == "bdia"
             else "Heal it with train.distill_from."))


if __name__ == "__main__":
    main()
