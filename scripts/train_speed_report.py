"""Summarises bench/train-speed/results.jsonl (scripts/train-speed.sh) as
markdown: medians over rounds, and ratios taken within each round."""
import json
import statistics as st
import sys
from collections import defaultdict

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
med = st.median


def ours(run, rnd=None):
    return [r for r in rows if "preset" in r and r["run"] == run and (rnd is None or r["round"] == rnd)]


def torch(run, rnd):
    return [r for r in rows if r.get("side") == "torch" and r["run"] == run and "eager" in r and r["round"] == rnd]


rounds = sorted({r["round"] for r in rows if r["run"] == "full"})
print(f"Training speed, `small` (6 x 384, vocab 8192), batch 8 x 128, f32, 2 threads; {len(rounds)} interleaved rounds, medians (min-max).\n")
print("| trainer, exit loss | tokens/s | fwd / bwd / opt s per step | vs PyTorch eager (same round) |")
print("|---|---|---|---|")


def span(xs, fmt="{:.0f}"):
    return f"{fmt.format(med(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


for run, label in [("full", "three exits, full loss"), ("final", "final exit only")]:
    eager = [torch(run, r)[0]["eager"] for r in rounds if torch(run, r)]
    print(f"| PyTorch eager, {label} | {span([e['tok_s'] for e in eager])} | {med([e['fwd_s'] for e in eager]):.2f} / {med([e['bwd_s'] for e in eager]):.2f} / {med([e['opt_s'] for e in eager]):.3f} | 1.00x |")
    comp = [torch(run, r)[0]["compile"] for r in rounds if torch(run, r) and "compile" in torch(run, r)[0]]
    if comp:
        ratio = [torch(run, r)[0]["compile"]["tok_s"] / torch(run, r)[0]["eager"]["tok_s"] for r in rounds if "compile" in torch(run, r)[0]]
        print(f"| torch.compile, {label} | {span([c['tok_s'] for c in comp])} | | {span(ratio, '{:.2f}x')} |")
for run, label, ref in [("full", "three exits, full loss", "full"), ("final", "final exit only", "final"),
                        ("frac8", "three exits, 1/8 of positions", "full"), ("frac8-cand32", "three exits, 1/8 of positions + top-32 candidates elsewhere", "full")]:
    ms = [ours(run, r)[0] for r in rounds if ours(run, r)]
    if not ms:
        continue
    ratio = [ours(run, r)[0]["tok_s"] / torch(ref, r)[0]["eager"]["tok_s"] for r in rounds if ours(run, r) and torch(ref, r)]
    print(f"| gpt-serve, {label} | {span([m['tok_s'] for m in ms])} | {med([m['fwd_s'] for m in ms]):.2f} / {med([m['bwd_s'] for m in ms]):.2f} / {med([m['opt_s'] for m in ms]):.3f} | {span(ratio, '{:.2f}x')} (vs eager, {ref}) |")

print("\nShare of the step spent on the non-final exits: 1 - step(final only) / step(with exits), same round.\n")
print("| exit loss | gpt-serve | PyTorch eager |")
print("|---|---|---|")
for run, label in [("full", "full"), ("frac8", "1/8 of positions"), ("frac8-cand32", "1/8 of positions + top-32 candidates elsewhere")]:
    share = [1 - ours("final", r)[0]["step_s"] / ours(run, r)[0]["step_s"] for r in rounds if ours(run, r) and ours("final", r)]
    if not share:
        continue
    tshare = ""
    if run == "full":
        ts = [1 - torch("full", r)[0]["eager"]["tok_s"] / torch("final", r)[0]["eager"]["tok_s"] for r in rounds if torch("full", r) and torch("final", r)]
        tshare = span([100 * x for x in ts], "{:.0f}%")
    print(f"| {label} | {span([100 * x for x in share], '{:.1f}%')} | {tshare} |")
print("\nThe training GEMM (`gpt_serve::gemm`, examples/train_gemm_bench.rs) against torch.matmul, 2 threads, M = 1024 rows; GFLOP/s medians, ratio within each round.\n")
print("| K x N | X W^T ours / torch | dY W ours / torch | dY^T X ours / torch |")
print("|---|---|---|---|")
shapes = sorted({(r["k"], r["n"]) for r in rows if r["run"] == "gemm"}, key=lambda s: (s[0], s[1]))
worst = []
for k, n in shapes:
    cells = []
    for f in ("fwd", "dx", "dw"):
        o = {r["round"]: r[f] for r in rows if r["run"] == "gemm" and r.get("side") == "ours" and (r["k"], r["n"]) == (k, n)}
        t = {r["round"]: r[f] for r in rows if r["run"] == "gemm" and r.get("side") == "torch" and (r["k"], r["n"]) == (k, n)}
        rat = [o[x] / t[x] for x in o if x in t]
        worst.append(med(rat))
        cells.append(f"{med(o.values()):.0f} / {med(t.values()):.0f} ({med(rat):.2f}x)")
    print(f"| {k} x {n} | " + " | ".join(cells) + " |")
print(f"\nLowest median ratio: {min(worst):.2f}x.")

g = {r["run"]: r for r in rows if r["run"].startswith("gpt2-")}
if g:
    print("\nThe mission's layout: `gpt2` (12 x 768, vocab 50257) with own exit heads at blocks 8/10/12, batch 8 x 256, 2 timed steps after a warm-up step, one run.\n")
    print("| exit loss | step s | tokens/s | exits' share of the step |")
    print("|---|---|---|---|")
    base = g.get("gpt2-final")
    for run, label in [("gpt2-final", "final exit only"), ("gpt2-own-full", "own heads, full loss"), ("gpt2-own-frac8", "own heads, 1/8 of positions"), ("gpt2-own-frac8-cand32", "own heads, 1/8 of positions + top-32 candidates")]:
        if run in g:
            share = "" if run == "gpt2-final" or not base else f"{100 * (1 - base['step_s'] / g[run]['step_s']):.0f}%"
            print(f"| {label} | {g[run]['step_s']:.2f} | {g[run]['tok_s']:.0f} | {share} |")
