#!/usr/bin/env python3
"""The exit cascade's calibration table from a `gpt-serve bench` JSON run
with `--modes tree+exits --exit-margin inf` (the exits score every draft
and cut none): for each exit and margin m, the share of the drafts the
final head accepted that a cut at m would have dropped (lost tokens), and
the share of first-rejected drafts it would have caught (rows saved).

    python3 scripts/exit_margins.py RESULTS.json > TABLE.md
"""
import json
import sys

BIN, LO = 0.5, -8.0  # decode::MARGIN_BIN, decode::MARGIN_BIN_LO
MARGINS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]


def rows(results):
    for suite in results["speculative"]:
        for m in suite["modes"]:
            if m.get("exit_margins"):
                yield suite, m


def main():
    results = json.load(open(sys.argv[1]))
    print("| prompts | temperature | exit | margin | accepted drafts cut | first rejected caught |")
    print("|---|---|---|---|---|---|")
    for suite, mode in rows(results):
        for e, h in enumerate(mode["exit_margins"]):
            acc, rej = h["accepted"], h["first_rejected"]
            for m in MARGINS:
                i = int((m - LO) / BIN)
                a, r = sum(acc[i:]), sum(rej[i:])
                print(
                    f"| {suite['source']} | {suite['temperature']} | {e} | {m} "
                    f"| {a / max(sum(acc), 1):.1%} ({a} of {sum(acc)}) "
                    f"| {r / max(sum(rej), 1):.1%} ({r} of {sum(rej)}) |"
                )


if __name__ == "__main__":
    main()
