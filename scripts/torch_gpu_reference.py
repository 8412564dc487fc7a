"""PyTorch reference for `gpt-serve train --device cuda:0` (issue #8): the
GPT-2 124M layout (12 x 768, vocab 50257, context 1024, tied head), batch
16 x 1024, AdamW, bf16 autocast, random tokens; eager and torch.compile,
final exit only and with exits after blocks 8/10 (tied heads). Prints
tokens/s as JSON. Run on the GPU machine (its image has PyTorch):

    python3 scripts/torch_gpu_reference.py --steps 40
"""
import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=40)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--context", type=int, default=1024)
a = p.parse_args()
V, C, L, H, T, B = 50257, 768, 12, 12, a.context, a.batch
dev = "cuda"
torch.backends.cuda.matmul.allow_tf32 = True


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        q, k, v = self.c_attn(self.ln_1(x)).split(C, 2)
        sh = lambda t: t.view(x.size(0), T, H, C // H).transpose(1, 2)
        y = F.scaled_dot_product_attention(sh(q), sh(k), sh(v), is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(x.size(0), T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class Gpt(nn.Module):
    def __init__(self, exits):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
        self.h = nn.ModuleList(Block() for _ in range(L))
        self.exits = exits
        self.ln = nn.ModuleDict({str(b): nn.LayerNorm(C) for b, _ in exits})

    def forward(self, idx, y):
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        loss = 0
        for i, blk in enumerate(self.h, 1):
            x = blk(x)
            for b, w in self.exits:
                if b == i:
                    logits = self.ln[str(b)](x) @ self.wte.weight.t()
                    loss = loss + w * F.cross_entropy(logits.view(-1, V).float(), y.view(-1))
        return loss


def run(exits, compiled):
    torch.manual_seed(0)
    m = Gpt(exits).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=6e-4, weight_decay=0.1, fused=True)
    f = torch.compile(m) if compiled else m
    x = torch.randint(0, V, (B, T), device=dev)
    y = torch.randint(0, V, (B, T), device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = f(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t = time.time()
    for _ in range(a.steps):
        step()
    torch.cuda.synchronize()
    return B * T * a.steps / (time.time() - t)


out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": [B, T]}
for name, exits in [("final", [(12, 1.0)]), ("exits_8_10_12", [(8, 0.05), (10, 0.15), (12, 0.8)])]:
    out[f"{name}_eager_tok_s"] = run(exits, False)
    out[f"{name}_compiled_tok_s"] = run(exits, True)
print(json.dumps(out, indent=1))
