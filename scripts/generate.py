"""Sample text from a saved revformer model (a folder or hub id).

    python scripts/generate.py runs/tiny/model --prompt "def fibonacci(n):" --max_new_tokens 80
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import revformer  # noqa: F401  (registers the model classes: no remote code needed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="save_pretrained folder or hub id")
    parser.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    parser.add_argument("--max_new_tokens", type=int, default=100)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"  # batched generation continues every prompt from its own end
    model = AutoModelForCausalLM.from_pretrained(args.model).to(args.device).eval()
    prompts = args.prompt or [tokenizer.bos_token or ""]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(args.device)
    sampling = {} if args.greedy else {"do_sample": True, "temperature": args.temperature, "top_k": args.top_k}
    output = model.generate(
        **inputs, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
    )
    for text in tokenizer.batch_decode(output, skip_special_tokens=True):
        print(text)
        print("-" * 80)


if __name__ == "__main__":
    main()
