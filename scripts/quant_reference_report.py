"""The table of scripts/quant-reference.sh: plain decode and 64-token
prefill tokens/s, ours (`gpt-serve bench --plain`, f32 / f16 / q8_0 /
q4_0) against llama.cpp (`llama-bench`, f16 / Q8_0 / Q4_0 GGUF files of
the same numbers), with ratios. Each figure is the better of the two runs
the script interleaves (ours: f32 and f16 from both bench runs).

Decode is compared as llama-bench's `tg` times it: the one-token steps
only (`decode_steps_tok_s`); our figure that also counts the 16-token
prompt's prefill (`decode_tok_s`) is its own column.

    python3 scripts/quant_reference_report.py OUT_DIR
"""
import json
import os
import sys

ROWS = {"default": "served", "gpt2": "random gpt2"}
TYPES = {"f16": "f16", "q8_0": "q8_0", "q4_0": "q4_0"}


def ours(out):
    fig = {}
    for run in ("q8_0", "q4_0"):
        for row in json.load(open(os.path.join(out, f"ours-{run}.json")))["plain"]:
            for m, name in ROWS.items():
                if row["model"] != name:
                    continue
                for backend, f in row["backends"].items():
                    if not backend.startswith("fast_"):
                        continue
                    key = (m, backend[5:])
                    d, s, p = fig.get(key, (0, 0, 0))
                    fig[key] = (
                        max(d, f["decode_tok_s"]),
                        max(s, f["decode_steps_tok_s"]),
                        max(p, f["prefill_64_tok_s"]),
                    )
    return fig


def llama(out):
    fig = {}
    for m in ROWS:
        for run in (1, 2):
            for r in json.load(open(os.path.join(out, f"llama-{m}-{run}.json"))):
                w = os.path.basename(r["model_filename"])[len(m) + 1 : -len(".gguf")]
                key = (m, w)
                d, p = fig.get(key, (0, 0))
                if r["n_gen"] > 0:
                    d = max(d, r["avg_ts"])
                else:
                    p = max(p, r["avg_ts"])
                fig[key] = (d, p)
    return fig


def main(out):
    o, l = ours(out), llama(out)
    lines = [
        "| model | weights | ours decode steps tok/s | llama.cpp tg tok/s | ours / llama.cpp | ours vs our f32 | ours with the prompt tok/s | ours prefill-64 tok/s | llama.cpp prefill-64 tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in ROWS:
        f32 = o[(m, "f32")][1]
        for w in ("f32", "f16", "q8_0", "q4_0"):
            d, s, p = o[(m, w)]
            ld, lp = l.get((m, w), (None, None))
            ratio = f"{s / ld:.2f}x" if ld else "-"
            lines.append(
                f"| {m} | {w} | {s:,.0f} | {f'{ld:,.0f}' if ld else '-'} | {ratio} | {s / f32:.2f}x | {d:,.0f} | {p:,.0f} | {f'{lp:,.0f}' if lp else '-'} |"
            )
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1])
