"""Writes a gpt-serve checkpoint (baseline GPT-2 layout: no DWA, no x0
skips; early exits are left out) as an f16 GGUF file for llama.cpp, with
the checkpoint's own byte-level BPE tokenizer, so llama.cpp's `llama-server`
serves the same weights and token ids as `gpt-serve serve`. Needs numpy,
safetensors and gguf (no torch):

    pip install numpy safetensors gguf
    python3 scripts/gguf_export.py models/default runs/serving/default-f16.gguf
"""
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file


def main(ckpt, out):
    import gguf

    cfg = json.load(open(os.path.join(ckpt, "config.json")))["model"]
    if cfg.get("dwa") or cfg.get("x0_skip"):
        sys.exit("only the baseline GPT-2 layout maps to llama.cpp's gpt2 (no DWA, no x0 skips)")
    w = load_file(os.path.join(ckpt, "model.safetensors"))
    tok = json.load(open(os.path.join(ckpt, "tokenizer.json")))
    vocab = tok["model"]["vocab"]
    tokens = [None] * cfg["vocab_size"]
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["id"] for a in tok.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    eot = next(a["id"] for a in tok["added_tokens"] if a["content"] == "<|endoftext|>")

    g = gguf.GGUFWriter(out, "gpt2")
    g.add_context_length(cfg["block_size"])
    g.add_embedding_length(cfg["n_embd"])
    g.add_feed_forward_length(4 * cfg["n_embd"])
    g.add_block_count(cfg["n_layer"])
    g.add_head_count(cfg["n_head"])
    g.add_layer_norm_eps(1e-5)
    g.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    g.add_tokenizer_model("gpt2")
    g.add_tokenizer_pre("gpt-2")
    g.add_token_list(tokens)
    g.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))])
    g.add_token_merges(merges)
    g.add_bos_token_id(eot)
    g.add_eos_token_id(eot)
    g.add_add_bos_token(False)

    def t(name, key, f16=True):
        a = w[key].astype(np.float16 if f16 else np.float32)
        g.add_tensor(name, np.ascontiguousarray(a))

    # nanoGPT's nn.Linear layout (out, in) is GGUF's; norms and biases f32.
    t("token_embd.weight", "wte.weight")
    t("position_embd.weight", "wpe.weight", f16=False)
    for i in range(cfg["n_layer"]):
        p = f"h.{i}."
        for name, key in [
            ("attn_norm", "ln_1"),
            ("attn_qkv", "attn.c_attn"),
            ("attn_output", "attn.c_proj"),
            ("ffn_norm", "ln_2"),
            ("ffn_up", "mlp.c_fc"),
            ("ffn_down", "mlp.c_proj"),
        ]:
            matrix = not name.endswith("norm")
            t(f"blk.{i}.{name}.weight", p + key + ".weight", f16=matrix)
            if cfg.get("bias", True):
                t(f"blk.{i}.{name}.bias", p + key + ".bias", f16=False)
    t("output_norm.weight", "ln_f.weight", f16=False)
    if cfg.get("bias", True):
        t("output_norm.bias", "ln_f.bias", f16=False)
    if "lm_head.weight" in w:
        t("output.weight", "lm_head.weight")
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
