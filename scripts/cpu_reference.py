"""CPU reference figures for `gpt-serve bench --plain` (issue: fast CPU inference).

Measures PyTorch eager and llama.cpp on this machine, f32, with the same
GPT-2-layout shapes and the same definitions as `src/cli/bench/plain.rs::plain_figures`:

- decode tok/s: a 16-token prompt, then N greedy tokens one at a time with a
  KV cache (N = 128 for `small`, 32 for `gpt2`), best of 3;
- prefill-64 tok/s: one 64-token forward on an empty cache (last logits), best of 3;
- verify k/1: after a 128-token context, the cost of one forward of k tokens
  with logits at all k positions, over the cost of k = 1 (best of 10 each,
  the sizes interleaved round by round, cache rolled back after each).

Weights are random (GPT-2 init, seed 0); llama.cpp gets the same weights in a
GGUF file written with the `gguf` package (architecture `gpt2`, GPT-2's own
vocabulary cut to the model's size). Threads: 2 (both engines).

`--hf DIR` measures a local Hugging Face GPT2LMHeadModel directory instead
(row preset "served", matching `gpt-serve bench --model` on its import;
its vocab.json and merges.txt, when present, are the GGUF's vocabulary).

Run by scripts/cpu-reference.sh, outside CI (PyPI's torch wheel brings ~5 GB
of CUDA libraries; llama-cpp-python compiles llama.cpp). Prints JSON on stdout.
"""

import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

THREADS = int(os.environ.get("REF_THREADS", "2"))
GPT2_DIR = os.environ.get(
    "GPT2_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tokenizer-gpt2")
)
PRESETS = {
    # name: (n_layer, n_head, n_embd, block_size, vocab, decode tokens)
    "small": (6, 6, 384, 256, 8192, 128),
    "gpt2": (12, 12, 768, 1024, 50257, 32),
}


def best(f, reps):
    out = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        out = min(out, time.perf_counter() - t)
    return out


def figures(decode, prefill, verify, n):
    """The bench's figures from one engine's step functions (after a warm-up)."""
    decode()
    d, p = best(decode, 3), best(prefill, 3)
    # 1, 4 and 8 rows interleaved round by round, best of 10 each (as
    # `gpt-serve bench`), so warm-up and drift hit them alike.
    v = {k: float("inf") for k in (1, 4, 8)}
    for _ in range(10):
        for k in v:
            t = time.perf_counter()
            verify(k)
            v[k] = min(v[k], time.perf_counter() - t)
    return {
        "decode_tok_s": n / d,
        "prefill_64_tok_s": 64 / p,
        "verify_4_over_1": v[4] / v[1],
        "verify_8_over_1": v[8] / v[1],
    }


def hf_model(preset):
    n_layer, n_head, n_embd, block, vocab, _ = PRESETS[preset]
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=block,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).eval()


def torch_figures(model, preset):
    from transformers import DynamicCache

    _, _, _, block, vocab, n = PRESETS[preset]
    prompt = torch.tensor([[i * 7 % vocab for i in range(16)]])

    @torch.inference_mode()
    def decode():
        out = model(prompt, use_cache=True)
        past = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(n):
            out = model(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)

    pre = torch.tensor([[i * 13 % vocab for i in range(64)]])

    @torch.inference_mode()
    def prefill():
        model(pre, use_cache=True, logits_to_keep=1)

    ctx = min(128, block // 2)
    with torch.inference_mode():
        cache = DynamicCache()
        model(torch.tensor([[i * 3 % vocab for i in range(ctx)]]), past_key_values=cache, use_cache=True)

    @torch.inference_mode()
    def verify(k):
        model(torch.tensor([list(range(k))]), past_key_values=cache, use_cache=True)
        cache.crop(-k)  # transformers 5: a negative count removes that many
        assert cache.get_seq_length() == ctx

    return figures(decode, prefill, verify, n)


def gpt2_vocab(vocab):
    """GPT-2's tokens and merges, cut to the first `vocab` ids."""

    with open(os.path.join(GPT2_DIR, "vocab.json")) as f:
        ids = json.load(f)
    tokens = [None] * len(ids)
    for t, i in ids.items():
        tokens[i] = t
    tokens = tokens[:vocab]
    keep = set(tokens)
    with open(os.path.join(GPT2_DIR, "merges.txt")) as f:
        lines = [l.rstrip("\n") for l in f if l.strip() and not l.startswith("#version")]
    merges = [m for m in lines if "".join(m.split(" ")) in keep and all(p in keep for p in m.split(" "))]
    return tokens, merges


def write_gguf(model, preset, path):
    import gguf

    n_layer, n_head, n_embd, block, vocab, _ = PRESETS[preset]
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_context_length(block)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(4 * n_embd)
    w.add_block_count(n_layer)
    w.add_head_count(n_head)
    w.add_layer_norm_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens, merges = gpt2_vocab(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 1)
    w.add_eos_token_id(vocab - 1)

    def t(name, a):
        w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))

    # HF's Conv1D stores (in, out); GGUF wants nn.Linear's (out, in).
    t("token_embd.weight", sd["transformer.wte.weight"])
    t("position_embd.weight", sd["transformer.wpe.weight"])
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        t(f"blk.{i}.attn_norm.weight", sd[p + "ln_1.weight"])
        t(f"blk.{i}.attn_norm.bias", sd[p + "ln_1.bias"])
        t(f"blk.{i}.attn_qkv.weight", sd[p + "attn.c_attn.weight"].T)
        t(f"blk.{i}.attn_qkv.bias", sd[p + "attn.c_attn.bias"])
        t(f"blk.{i}.attn_output.weight", sd[p + "attn.c_proj.weight"].T)
        t(f"blk.{i}.attn_output.bias", sd[p + "attn.c_proj.bias"])
        t(f"blk.{i}.ffn_norm.weight", sd[p + "ln_2.weight"])
        t(f"blk.{i}.ffn_norm.bias", sd[p + "ln_2.bias"])
        t(f"blk.{i}.ffn_up.weight", sd[p + "mlp.c_fc.weight"].T)
        t(f"blk.{i}.ffn_up.bias", sd[p + "mlp.c_fc.bias"])
        t(f"blk.{i}.ffn_down.weight", sd[p + "mlp.c_proj.weight"].T)
        t(f"blk.{i}.ffn_down.bias", sd[p + "mlp.c_proj.bias"])
    t("output_norm.weight", sd["transformer.ln_f.weight"])
    t("output_norm.bias", sd["transformer.ln_f.bias"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_figures(model, preset, check_logits):
    from llama_cpp import Llama

    _, _, _, block, vocab, n = PRESETS[preset]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"{preset}.gguf")
        write_gguf(model, preset, path)
        llm = Llama(
            model_path=path,
            n_ctx=block,
            n_batch=block,
            n_threads=THREADS,
            n_threads_batch=THREADS,
            logits_all=True,
            verbose=False,
        )
    # Same weights as PyTorch: the logits of one forward must agree.
    ids = [i * 7 % vocab for i in range(16)]
    llm.reset()
    llm.eval(ids)
    ours = np.array(llm.scores[15])
    with torch.inference_mode():
        theirs = model(torch.tensor([ids])).logits[0, -1].numpy()
    err = float(np.abs(ours - theirs).max())
    if check_logits and err > 1e-2 * max(1.0, float(np.abs(theirs).max())):
        sys.exit(f"llama.cpp and PyTorch disagree on {preset} (max |diff| {err}): the GGUF export is wrong")

    def decode():
        llm.reset()
        llm.eval(ids)
        for _ in range(n):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([tok])

    pre = [i * 13 % vocab for i in range(64)]

    def prefill():
        llm.reset()
        llm.eval(pre)

    ctx = min(128, block // 2)

    context = [i * 3 % vocab for i in range(ctx)]

    def verify(k):
        # decode()/prefill() ran on the same llm before: set the context once.
        if llm.n_tokens < ctx or list(llm.input_ids[:ctx]) != context:
            llm.reset()
            llm.eval(context)
        llm.n_tokens = ctx  # eval() removes cache cells past n_tokens
        llm.eval(list(range(k)))

    return {**figures(decode, prefill, verify, n), "max_logit_diff_vs_torch": err}


def hf_dir_model(path):
    """A local HF directory, as the preset "served" (f32, eval mode)."""
    global GPT2_DIR
    model = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()
    c = model.config
    PRESETS["served"] = (c.n_layer, c.n_head, c.n_embd, c.n_positions, c.vocab_size, 32)
    if os.path.exists(os.path.join(path, "vocab.json")):
        GPT2_DIR = path
    return model


def main():
    torch.set_num_threads(THREADS)
    args = sys.argv[1:]
    hf = None
    if args[:1] == ["--hf"]:
        hf, args = args[1], args[2:]
    presets = ["served"] if hf else args or list(PRESETS)
    out = {"threads": THREADS, "torch": torch.__version__, "rows": []}
    try:
        import llama_cpp

        out["llama_cpp"] = llama_cpp.__version__
    except ImportError:
        llama_cpp = None
    for p in presets:
        model = hf_dir_model(hf) if hf else hf_model(p)
        row = {"preset": p, "pytorch_eager_f32": torch_figures(model, p)}
        print(f"{p} pytorch {row['pytorch_eager_f32']}", file=sys.stderr)
        if llama_cpp is not None:
            row["llama_cpp_f32"] = llama_figures(model, p, check_logits=True)
            print(f"{p} llama.cpp {row['llama_cpp_f32']}", file=sys.stderr)
        out["rows"].append(row)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
