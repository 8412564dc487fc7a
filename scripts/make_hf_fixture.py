"""Writes tests/fixtures/hf/tiny-gpt2: a small random Hugging Face
GPT2LMHeadModel (3 blocks, n_embd 32, a byte-level BPE of ~300 tokens
trained on tests/fixtures/prose.txt), saved by `transformers` itself, and
its logits on fixed inputs (`reference.safetensors`), which
tests/import_hf.rs compares `gpt-serve import-hf` against. Run outside CI.

Every parameter is perturbed off its init (biases and LayerNorms too), so
a mis-mapped or untransposed tensor changes the logits; layer_norm_epsilon
is 1e-3, far from our default 1e-5, so ignoring it changes them too.

Setup: python3 -m venv venv && venv/bin/pip install torch transformers safetensors
Run:   venv/bin/python scripts/make_hf_fixture.py
"""
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "hf" / "tiny-gpt2"
EOT = "<|endoftext|>"


def tokenizer(text: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    return tok


def main() -> None:
    torch.manual_seed(19)
    text = (ROOT / "tests" / "fixtures" / "prose.txt").read_text()
    tok = tokenizer(text)
    eot = tok.token_to_id(EOT)
    cfg = GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=64,
        n_embd=32,
        n_layer=3,
        n_head=2,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-3,
        initializer_range=0.1,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if OUT.exists():
        shutil.rmtree(OUT)
    model.save_pretrained(OUT, safe_serialization=True)
    tok.save(str(OUT / "tokenizer.json"))
    tok.model.save(str(OUT))  # vocab.json + merges.txt, the other layout
    ids = [tok.encode(line).ids[:16] for line in text.splitlines()[:2]]
    x = torch.tensor(ids, dtype=torch.int64)
    with torch.no_grad():
        logits = model.double()(x).logits.float()
    save_file({"input_ids": x, "logits": logits.contiguous()}, OUT / "reference.safetensors")
    print(json.dumps({"vocab": cfg.vocab_size, "files": sorted(p.name for p in OUT.iterdir())}))


if __name__ == "__main__":
    main()
