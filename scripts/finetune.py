"""Fine-tune a saved revformer model (a `save_pretrained` folder or hub id) on new text, with its own tokenizer.

    accelerate launch scripts/finetune.py --config configs/finetune.yaml --train.init_from runs/tiny/model \
        --data.dataset path/to/texts/
"""

from revformer.trainer import main

if __name__ == "__main__":
    main(require_init_from=True)
