"""TRL's SFTTrainer fine-tunes a saved revformer model the way users run it: padded, packed (padding-free rows of
several examples, longer than the model's context) and padding-free, at max_length = max_position_embeddings, with
the default coupling and with bdia (what convert.py makes)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from conftest import tiny_config
from revformer import RevformerForCausalLM

CONTEXT = 64


@pytest.fixture(scope="module")
def texts():
    """Lines of this file's source of mixed lengths, some longer than the context (in bytes = tokens)."""
    source = Path(__file__).read_text()
    rng = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(source) - 120, (64,), generator=rng).tolist()
    lengths = torch.randint(12, 110, (64,), generator=rng).tolist()
    return [source[s : s + n] for s, n in zip(starts, lengths, strict=True)]


@pytest.fixture(params=["sublayer"])
def saved_model(request, tmp_path, byte_tokenizer):
    """A saved model with the coupling `request.param`: sublayer, or bdia on fixed-point streams (convert.py's)."""
    torch.manual_seed(0)
    bdia = dict(coupling="bdia", stream_dtype="fixed_point", bdia_gamma=1 / 16) if request.param == "bdia" else {}
    # Attention in query chunks shorter than the context, as the default 256 is for a long-context model.
    model = RevformerForCausalLM(tiny_config(vocab_size=len(byte_tokenizer), max_position_embeddings=CONTEXT,
                                             chunk_size_attention=CONTEXT // 4, **bdia))
    model.save_pretrained(tmp_path / "model")
    byte_tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def sft(saved_model, tokenizer, texts, tmp_path, **options):
    model = RevformerForCausalLM.from_pretrained(saved_model)
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=12, per_device_train_batch_size=4, learning_rate=3e-3,
                     lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no",
                     use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0, **options)  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tokenizer)
    trainer.train()
    return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("saved_model", ["sublayer", "bdia"], indirect=True)
@pytest.mark.parametrize("mode", ["padded", "packing", "padding_free"])
def test_sft_trainer_trains_at_the_models_context(saved_model, byte_tokenizer, texts, tmp_path, mode):
    if mode == "padded":
        options = dict(max_length=CONTEXT)
    elif mode == "packing":  # TRL's default packing ("bfd") runs padding-free: rows of 4 x 64 tokens
        options = dict(max_length=CONTEXT, packing=True)
    else:  # TRL requires max_length=None here: the examples are truncated beforehand
        options = dict(max_length=None, padding_free=True)
        texts = [t[: CONTEXT - 1] for t in texts]  # + EOS = CONTEXT tokens at most
    trainer, losses = sft(saved_model, byte_tokenizer, texts, tmp_path, **options)
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    if mode != "padded":
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[1] > CONTEXT  # one row, many examples
        assert int(batch["position_ids"].max()) < CONTEXT


def test_padding_free_batch_loss_equals_the_padded_batch(saved_model, byte_tokenizer, texts):
    """The same 4 examples, flattened into one row with restarting position_ids or padded into 4 rows: the same
    loss (TRL's collator, both ways) and the same gradients, through the reversible engine."""
    model = RevformerForCausalLM.from_pretrained(saved_model).train()
    examples = [{"input_ids": byte_tokenizer(t[: CONTEXT - 1])["input_ids"] + [byte_tokenizer.eos_token_id]}
                for t in texts[:4]]  # fmt: skip
    results = {}
    for padding_free in (False, True):
        batch = DataCollatorForLanguageModeling(byte_tokenizer.pad_token_id, padding_free=padding_free)(examples)
        model.zero_grad()
        loss = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids",
                                                                 "labels")}).loss
        loss.backward()
        results[padding_free] = (loss.detach(), model.lm_head.weight.grad.clone())
    flat_rows = sum(len(e["input_ids"]) for e in examples)
    assert flat_rows > CONTEXT
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-4, atol=1e-6)
