"""Medians over several `gpt-serve bench` runs (issue #17 asks for the
median of 3): per source, temperature and mode, the median speedup over
plain decoding in the same run (with its range), the median on
non-repeating stretches, tokens per verify step, acceptance, drafting's
share of decode time, and how many outputs were identical to plain.
Usage: python3 scripts/spec_runs_summary.py RUN1.json RUN2.json RUN3.json
"""
import json
import statistics as st
import sys

runs = [json.load(open(p)) for p in sys.argv[1:]]
cells = {}
for r in runs:
    for s in r["speculative"]:
        key = (s["source"], s["temperature"])
        plain = next(m for m in s["modes"] if m["mode"] == "plain")
        for m in s["modes"]:
            cells.setdefault(key, {}).setdefault(m["mode"], []).append((m, plain["tok_s"], s["prompts"]))
print(f"{len(runs)} runs; each cell: median (min-max) over the runs.\n")
for (source, temp), modes in cells.items():
    print(f"{source} prompts, temperature {temp}\n")
    print("| mode | speedup | non-repeating speedup | tokens/step | acceptance | drafting share | identical to plain |")
    print("|---|---|---|---|---|---|---|")
    for name, xs in modes.items():
        vals = lambda k: [m[k] for m, _, _ in xs]
        if name == "plain":
            tok = [p for _, p, _ in xs]
            print(f"| plain, tok/s | {st.median(tok):.0f} ({min(tok):.0f}-{max(tok):.0f}) | | 1.00 | | | |")
            continue
        sp = vals("speedup")
        same = sum(vals("identical_to_plain"))
        total = sum(n for _, _, n in xs)
        print(f"| {name} | {st.median(sp):.2f}x ({min(sp):.2f}-{max(sp):.2f}) | "
              f"{st.median(vals('speedup_non_repeating')):.2f}x | {st.median(vals('tokens_per_step')):.2f} | "
              f"{100 * st.median(vals('acceptance')):.0f}% | {100 * st.median(vals('draft_share')):.1f}% | {same} / {total} |")
    print()
