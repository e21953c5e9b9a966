"""Train RevformerForCausalLM with transformers' own Trainer, default DDP settings; used by tests/test_hf_trainer.py.

    python tests/scripts/hf_trainer_run.py OUT_DIR [COUPLING]
    torchrun --nproc_per_node 2 tests/scripts/hf_trainer_run.py OUT_DIR [COUPLING]

COUPLING: sublayer (default) or bdia (on fixed-point streams, as convert.py makes it).
"""

import json
import sys

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from revformer import RevformerConfig, RevformerForCausalLM

out_dir, coupling = sys.argv[1], (sys.argv[2:] or ["sublayer"])[0]
torch.manual_seed(0)
bdia = dict(coupling="bdia", stream_dtype="fixed_point", bdia_gamma=1 / 16) if coupling == "bdia" else {}
config = RevformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=64, hidden_dropout=0.1, **bdia)
model = RevformerForCausalLM(config)
# A learnable stream: each row counts upward modulo 64 from a random start.
starts = torch.randint(0, 64, (64, 1))
ids = (starts + torch.arange(32)) % 64
dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
args = TrainingArguments(
    output_dir=out_dir, per_device_train_batch_size=4, max_steps=20, learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1,
    report_to="none", save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0,
)
trainer = Trainer(model=model, args=args, train_dataset=dataset)
result = trainer.train()
if trainer.is_world_process_zero():
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    ddp = getattr(trainer.model_wrapped, "find_unused_parameters", None)
    json.dump({"losses": losses, "world_size": args.world_size, "find_unused_parameters": ddp},
              open(f"{out_dir}/result.json", "w"))
# Every rank saves its weights: DDP must have kept them identical.
torch.save(model.state_dict(), f"{out_dir}/weights_rank{args.process_index}.pt")
# Every rank meets, then the process group goes down before exit: a gloo rank exiting with it alive, or tearing
# it down while its peer still runs, was seen to abort (SIGABRT) after a complete run.
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
