"""PyTorch training throughput for the issue's reference config, to compare
with `cargo run --release --example profile_train` in the same session
(`scripts/train-speed.sh` runs both, interleaved).
n_layer 6, n_head 6, n_embd 384, vocab 8192, batch 8 x 128, AdamW, fp32,
2 threads; exits 4/5/6 with tied heads like gpt-serve's default, every
position, every step (`final`: the final exit only). Prints tokens/s and
the per-phase split as JSON.

`--gemm`: torch.matmul GFLOP/s at the training shapes instead (M = 1024:
X W^T, dY W, dY^T X), the reference for examples/train_gemm_bench.rs.
"""
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(2)
torch.manual_seed(0)
V, C, L, H, B, T = 8192, 384, 6, 6, 8, 128
EXITS = [6] if "final" in sys.argv[1:] else [4, 5, 6]
W = {4: 0.05, 5: 0.15, 6: 0.8} if len(EXITS) == 3 else {6: 1.0}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        q, k, v = self.c_attn(self.ln_1(x)).split(C, 2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
        self.h = nn.ModuleList(Block() for _ in range(L))
        self.lns = nn.ModuleDict({str(e): nn.LayerNorm(C) for e in EXITS})

    def forward(self, idx, y):
        x = self.wte(idx) + self.wpe(torch.arange(T))
        loss = 0
        for i, b in enumerate(self.h):
            x = b(x)
            if i + 1 in EXITS:
                logits = self.lns[str(i + 1)](x) @ self.wte.weight.T
                loss = loss + W[i + 1] * F.cross_entropy(logits.view(-1, V), y.view(-1))
        return loss


def measure(model, steps=5):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, V, (B, T))
    phases = [0.0, 0.0, 0.0]
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = model(x, x)
        loss.item()
        t1 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if i >= 1:
            for j, d in enumerate((t1 - t0, t2 - t1, t3 - t2)):
                phases[j] += d
    total = sum(phases)
    return {
        "tok_s": steps * B * T / total,
        "fwd_s": phases[0] / steps,
        "bwd_s": phases[1] / steps,
        "opt_s": phases[2] / steps,
    }


def gemm():
    def best(f, reps=3):
        t = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                f()
            t = min(t, (time.perf_counter() - t0) / reps)
        return t

    m = B * T
    for k, n in [(384, 1152), (384, 384), (384, 1536), (1536, 384), (384, 8192)]:
        x, w, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
        gf = 2 * m * n * k / 1e9
        row = {"side": "torch", "m": m, "k": k, "n": n}
        row["fwd"] = round(gf / best(lambda: x @ w.t()), 1)
        row["dx"] = round(gf / best(lambda: dy @ w), 1)
        row["dw"] = round(gf / best(lambda: dy.t() @ x), 1)
        print(json.dumps(row))


if "--gemm" in sys.argv[1:]:
    gemm()
    sys.exit(0)
m = GPT()
out = {"side": "torch", "exits": len(EXITS), "eager": measure(m)}
if "--compile" in sys.argv[1:]:
    try:
        out["compile"] = measure(torch.compile(m))
    except Exception as e:  # torch.compile needs a C compiler; report why not
        out["compile_error"] = str(e)[:200]
print(json.dumps(out))
