"""Loss, perplexity and bits per byte of a saved revformer model on a test set; the training split is never tokenized.

    python scripts/evaluate.py runs/tiny/model                       # the validation split the run held out
    python scripts/evaluate.py runs/tiny/model --data.dataset test.txt   # a file or folder: all of its text
    python scripts/evaluate.py runs/tiny/model --data.dataset texts/ --data.validation_fraction 0.2
                                                                     # the part training would hold out
    python scripts/evaluate.py runs/tiny/model --data.validation_split test   # a named split of the run's dataset
    python scripts/evaluate.py runs/tiny/model --train-mode          # the network training runs (dropout, bdia)
    accelerate launch scripts/evaluate.py runs/tiny/model ...        # several processes

The run's own `train_config.yaml` (saved beside the model) gives the data section unless --config names
another; the same model and data give the number the trainer's final evaluation reported.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from revformer.config import ConfigError, config_help, load_run_config, parse_overrides
from revformer.data import DataError, check_block_size, load_test_texts, pack_texts
from revformer.tokenizer import load_tokenizer
from revformer.trainer import evaluate, sample_blocks

# The options that change what or how evaluate.py scores; any other key has no effect here and is refused.
ACCEPTED = {"data": {"dataset", "dataset_config", "validation_split", "validation_fraction", "text_column",
                     "streaming", "block_size", "num_proc", "cache_dir", "train_split", "document_attention"},
            "train": {"batch_size", "mixed_precision", "eval_batches", "seed"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False, epilog=(
        "Overrides accepted: " + ", ".join(f"--{s}.{k}" for s, keys in ACCEPTED.items() for k in sorted(keys))
        + ". --train.eval_batches N scores a fixed random sample of N batches.\n\n" + config_help()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="save_pretrained folder or hub id (its tokenizer is used)")
    parser.add_argument("--config", help="run YAML whose data section names the corpus (default: the "
                                         "train_config.yaml saved beside the model)")
    parser.add_argument("--train-mode", action="store_true",
                        help="score the network training runs (dropout on, the bdia coupling's gamma drawn; seeded "
                             "by --train.seed): how far it is from the one evaluation and generation run")
    args, overrides = parser.parse_known_args()
    try:
        given = parse_overrides(overrides)
        for section, values in given.items():
            refused = sorted(set(values) - ACCEPTED.get(section, set()))
            if refused:
                raise ConfigError(f"evaluate.py does not use --{section}.{refused[0]}; it accepts "
                                  + ", ".join(f"--{s}.{k}" for s, keys in ACCEPTED.items() for k in sorted(keys)))
        config = args.config
        if config is None and (Path(args.model) / "train_config.yaml").is_file():
            config = Path(args.model) / "train_config.yaml"
        run = load_run_config(config, overrides)
        # What to score: a split named on the command line, a file/folder named on it (all of it, unless a
        # validation_fraction is named too), or else the validation split exactly as training holds it out.
        if "validation_split" in given["data"]:
            split, what = run.data.validation_split, f"split {run.data.validation_split!r} of {run.data.dataset}"
        elif "dataset" in given["data"] and "validation_fraction" not in given["data"]:
            split, what = "*", f"all of {run.data.dataset}"
        else:
            split, what = None, f"the validation split held out from {run.data.dataset}"
            if "validation_fraction" in given["data"]:
                what += (f" as training splits it (validation_fraction={run.data.validation_fraction} of its "
                         "documents, or its own validation split where it has one)")
        accelerator = Accelerator(mixed_precision=run.train.mixed_precision)
        tokenizer = load_tokenizer(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
        check_block_size(run.data.block_size, model.config.max_position_embeddings)
        with accelerator.main_process_first():
            texts = load_test_texts(run.data, split)
            blocks = pack_texts(texts, tokenizer, run.data.block_size, with_bytes=True,
                                num_proc=run.data.num_proc, cache_dir=run.data.cache_dir)
        if "eval_batches" in given["train"] and run.train.eval_batches is not None:
            blocks = sample_blocks(blocks, run.train.eval_batches * run.train.batch_size, seed=run.train.seed)
            what += f", a fixed random sample of {run.train.eval_batches} batches"
        model = accelerator.prepare(model)
        if args.train_mode:
            torch.manual_seed(run.train.seed + accelerator.process_index)
            what += ", in training mode"
        metrics = evaluate(model, blocks, accelerator, run.train.batch_size,
                           document_attention=run.data.document_attention, train_mode=args.train_mode)
    except (ConfigError, DataError) as err:
        sys.exit(f"error: {err}")
    if accelerator.is_main_process:
        print(f"scored: {what}; {len(blocks)} blocks of {run.data.block_size} tokens", file=sys.stderr)
        print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
