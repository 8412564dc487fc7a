"""PyTorch reference for gpt-serve (llm.c style), run outside CI.

Loads the tiny checkpoints in tests/fixtures/ref/ (written by
`cargo run --release --example ref_fixture`), reimplements the model in
PyTorch (GPT-2 blocks, exits, DWA, x0 skips), and writes each exit's logits,
the weighted loss and every parameter's gradient to
tests/fixtures/ref/<name>/reference.safetensors, which tests/reference.rs
compares against. For the baseline it also exports with `gpt-serve export-hf`
and checks that transformers' GPT2LMHeadModel gives the same logits.

Setup: python3 -m venv venv && venv/bin/pip install torch transformers safetensors
Run:   venv/bin/python scripts/torch_reference.py [path/to/gpt-serve]
"""
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "ref"


def dwa_inputs(cfg, i):
    d = cfg.get("dwa")
    if not d or i % d["period"] != 0:
        return None
    return [j for j in range(i + 1) if (i - j) % d["dilation"] == 0]


def forward(cfg, w, x):
    C, nh = cfg["n_embd"], cfg["n_head"]
    B, T = x.shape
    ln = lambda h, p: F.layer_norm(h, (C,), w[p + ".weight"], w.get(p + ".bias"), 1e-5)
    lin = lambda h, p: F.linear(h, w[p + ".weight"], w.get(p + ".bias"))
    h = w["wte.weight"][x] + w["wpe.weight"][:T]
    x0, xs, logits = h, [h], []
    exits = {e["block"]: k for k, e in enumerate(cfg["exits"])}
    last = len(cfg["exits"]) - 1
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    for i in range(cfg["n_layer"]):
        p = f"h.{i}"
        if cfg.get("x0_skip"):
            s = w[p + ".skip"]
            h = s[0] * h + s[1] * x0
        a = lin(ln(h, p + ".ln_1"), p + ".attn.c_attn").view(B, T, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
        att = (a[0] @ a[1].transpose(-1, -2)) / math.sqrt(C // nh)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        y = (att @ a[2]).transpose(1, 2).reshape(B, T, C)
        h = h + lin(y, p + ".attn.c_proj")
        h = h + lin(F.gelu(lin(ln(h, p + ".ln_2"), p + ".mlp.c_fc"), approximate="tanh"), p + ".mlp.c_proj")
        if cfg.get("dwa"):
            xs.append(h)
            ins = dwa_inputs(cfg, i + 1)
            if ins is not None:
                al = w[p + ".dwa"]
                h = sum(al[k] * xs[j] for k, j in enumerate(ins))
        b = i + 1
        if b in exits:
            k = exits[b]
            if k == last:
                logits.append(ln(h, "ln_f") @ w["wte.weight"].T)
            else:
                head = w.get(f"exits.{b}.lm_head.weight", w["wte.weight"])
                logits.append(ln(h, f"exits.{b}.ln") @ head.T)
    return logits


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/gpt-serve"
    batch = json.loads((ROOT / "batch.json").read_text())
    shape = batch["shape"]
    x = torch.tensor(batch["x"]).view(*shape)
    y = torch.tensor(batch["y"]).view(*shape)
    for name in ["baseline", "full"]:
        d = ROOT / name
        cfg = json.loads((d / "config.json").read_text())["model"]
        w = {k: v.double().requires_grad_(True) for k, v in load_file(d / "model.safetensors").items()}
        logits = forward(cfg, w, x)
        losses = [F.cross_entropy(l.reshape(-1, l.shape[-1]), y.reshape(-1)) for l in logits]
        total = sum(e["weight"] * l for e, l in zip(cfg["exits"], losses))
        total.backward()
        out = {f"logits.{k}": l.detach().float().contiguous() for k, l in enumerate(logits)}
        out["loss"] = total.detach().float().reshape(1)
        out.update({f"grad.{k}": v.grad.float().contiguous() for k, v in w.items()})
        save_file(out, d / "reference.safetensors")
        print(f"{name}: loss {total.item():.6f}, {len(w)} gradients written")
        if name == "baseline":
            check_hf(binary, d, x, logits[-1].detach())


def check_hf(binary, d, x, ours):
    from transformers import GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as out:
        subprocess.run([binary, "export-hf", "--model", str(d), "--out", out], check=True)
        hf = GPT2LMHeadModel.from_pretrained(out).double().eval()
        with torch.no_grad():
            theirs = hf(x).logits
    diff = (theirs - ours).abs().max().item()
    (d / "hf_check.json").write_text(json.dumps({"max_abs_logit_diff_vs_transformers": diff}) + "\n")
    print(f"transformers GPT2LMHeadModel vs reference: max |logit diff| = {diff:.2e}")
    assert diff < 1e-4, diff


if __name__ == "__main__":
    main()
