"""Writes a random-weight, gpt2-sized (12 x 768, vocab 50257) Hugging Face
GPT2LMHeadModel to OUT with GPT-2's own tokenizer files, for the import-hf
measurements in docs/benchmarks.md. Outside CI; never downloads anything.

Run: venv/bin/python scripts/make_hf_random_gpt2.py OUT [float32|float16|bfloat16]
     (GPT2_DIR: the directory holding GPT-2's vocab.json and merges.txt,
     default ../shared/data/tokenizer-gpt2)
"""
import os
import shutil
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel

GPT2_DIR = os.environ.get(
    "GPT2_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tokenizer-gpt2")
)


def main() -> None:
    out = sys.argv[1]
    dtype = getattr(torch, sys.argv[2] if len(sys.argv) > 2 else "float32")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval().to(dtype)  # GPT2Config() is gpt2's shape
    model.save_pretrained(out, safe_serialization=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(GPT2_DIR, f), os.path.join(out, f))
    print(out, dtype)


if __name__ == "__main__":
    main()
