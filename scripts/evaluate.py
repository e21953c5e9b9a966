"""Validation loss, perplexity and bits per byte of a saved revformer model on a corpus.

    accelerate launch scripts/evaluate.py runs/tiny/model --config configs/tiny.yaml [--data.key value ...]
"""

import argparse
import json
import sys

from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from revformer.config import ConfigError, load_run_config
from revformer.data import DataError, check_block_size, prepare_datasets
from revformer.tokenizer import load_tokenizer
from revformer.trainer import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("model", help="save_pretrained folder or hub id (its tokenizer is used)")
    parser.add_argument("--config", help="run YAML whose data section names the corpus")
    args, overrides = parser.parse_known_args()
    try:
        run = load_run_config(args.config, overrides)
        run.train.eval_batches = run.train.eval_batches if "--train.eval_batches" in " ".join(overrides) else None
        accelerator = Accelerator(mixed_precision=run.train.mixed_precision)
        tokenizer = load_tokenizer(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
        check_block_size(run.data.block_size, model.config.max_position_embeddings)
        with accelerator.main_process_first():
            _, val_blocks = prepare_datasets(run.data, tokenizer)
        model = accelerator.prepare(model)
        metrics = evaluate(model, val_blocks, run, accelerator)
    except (ConfigError, DataError) as err:
        sys.exit(f"error: {err}")
    if accelerator.is_main_process:
        print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
