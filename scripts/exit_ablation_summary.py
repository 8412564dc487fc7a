"""Summarises the exit-loss ablation (scripts/ablate.sh, SUITE=exits): per arm,
the final exit's val loss per seed and its mean against the full exit loss,
the exits' val losses, and their agreement with the final head as each run
reported it. Usage: python3 scripts/exit_ablation_summary.py runs/exit-ablation
"""
import json, re, glob, os, statistics as st, sys
root = sys.argv[1]
arms = {}
for d in sorted(glob.glob(f"{root}/*-s[0-9]")):
    if not os.path.exists(f"{d}/done"): continue
    name, seed = d.rsplit('/',1)[1].rsplit('-s',1)
    vals = [json.loads(l) for l in open(f"{d}/metrics.jsonl") if '"val_loss_' in l]
    last = vals[-1]
    ag = {}
    log = open(f"{d}.log").read()
    for b, p in re.findall(r"exit +(\d+): top-1 agreement with the final head ([0-9.]+)%", log):
        if b != '6': ag[int(b)] = float(p)
    arms.setdefault(name, []).append((int(seed), last.get('val_loss_6'), last.get('val_loss_4'), last.get('val_loss_5'), ag))
order = ["base", "exits", "exits-frac8", "exits-frac8-w", "exits-frac8-cand32h"]
full = arms.get("exits", [])
fm = st.mean(x[1] for x in full) if full else None
fa = {b: st.mean(x[4][b] for x in full) for b in (4, 5)} if full else {}
print("| arm | seeds | final-exit val loss, per seed | mean | vs full exit loss | exit 4 / 5 val loss (mean) | agreement 4 / 5 (mean) | vs full |")
print("|---|---|---|---|---|---|---|---|")
for a in order + sorted(set(arms) - set(order)):
    if a not in arms: continue
    rs = sorted(arms[a])
    m = st.mean(r[1] for r in rs)
    per = " / ".join(f"{r[1]:.3f}" for r in rs)
    e45 = "-" if rs[0][2] is None else f"{st.mean(r[2] for r in rs):.2f} / {st.mean(r[3] for r in rs):.2f}"
    if rs[0][4]:
        a4, a5 = st.mean(r[4][4] for r in rs), st.mean(r[4][5] for r in rs)
        ag = f"{a4:.1f}% / {a5:.1f}%"
        dag = f"{a4 - fa[4]:+.1f} / {a5 - fa[5]:+.1f} pts" if fa else ""
    else:
        ag, dag = "-", ""
    print(f"| `{a}` | {len(rs)} | {per} | {m:.3f} | {m - fm:+.3f} | {e45} | {ag} | {dag} |")
