"""Pretrain a reversible Transformer LM.

    accelerate launch scripts/pretrain.py --config configs/tiny.yaml [--section.key value ...]
    accelerate launch scripts/pretrain.py --config configs/tiny.yaml --train.resume_from_checkpoint latest
"""

from revformer.trainer import main

if __name__ == "__main__":
    main()
