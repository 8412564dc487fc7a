"""PyTorch reference for `gpt-serve train --device cuda:0`: a GPT-2 layout
(default the 124M one: 12 x 768, vocab 50257, context 1024, tied head),
AdamW, random tokens; eager and/or torch.compile, final exit only and with
two earlier exits (tied heads, weights 0.05/0.15/0.8). `--dtype bf16` runs
under bf16 autocast (the usual GPU recipe); `--dtype f32` keeps f32 weights
and activations with TF32 matmuls, as `gpt-serve train` does on a GPU.
Prints tokens/s as JSON. Run on the GPU machine (its image has PyTorch):

    python3 scripts/torch_gpu_reference.py --steps 40
    python3 scripts/torch_gpu_reference.py --layers 6 --embd 256 --heads 4 \
        --vocab 4096 --batch 128 --context 256 --dtype f32 --modes eager
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
p.add_argument("--layers", type=int, default=12)
p.add_argument("--embd", type=int, default=768)
p.add_argument("--heads", type=int, default=12)
p.add_argument("--vocab", type=int, default=50257)
p.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
p.add_argument("--modes", default="eager,compiled")
p.add_argument("--device", default="cuda")
a = p.parse_args()
V, C, L, H, T, B = a.vocab, a.embd, a.layers, a.heads, a.context, a.batch
dev = a.device
sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
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
    opt = torch.optim.AdamW(m.parameters(), lr=6e-4, weight_decay=0.1, fused=dev.startswith("cuda"))
    f = torch.compile(m) if compiled else m
    x = torch.randint(0, V, (B, T), device=dev)
    y = torch.randint(0, V, (B, T), device=dev)

    def step():
        with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            loss = f(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    sync()
    t = time.time()
    for _ in range(a.steps):
        step()
    sync()
    return B * T * a.steps / (time.time() - t)


out = {"gpu": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu", "torch": torch.__version__,
       "shape": [L, C, H, V], "batch": [B, T], "dtype": a.dtype}
e1, e2 = round(L * 2 / 3), round(L * 5 / 6)
for name, exits in [("final", [(L, 1.0)]), (f"exits_{e1}_{e2}_{L}", [(e1, 0.05), (e2, 0.15), (L, 0.8)])]:
    for mode in a.modes.split(","):
        out[f"{name}_{mode}_tok_s"] = run(exits, mode == "compiled")
print(json.dumps(out, indent=1))
