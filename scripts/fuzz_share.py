"""How many of the fuzzer's completion requests reached the engine.

Reads schemathesis's HAR report and counts POST /v1/completions entries by
status: a 200 went through validation and was decoded; 4xx stopped before
the engine. Exits 1 when the 200 share is below --min-share.
Usage: python3 scripts/fuzz_share.py FUZZ.har [--min-share 0.5]
"""
import argparse
import collections
import json
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("har")
    ap.add_argument("--min-share", type=float, default=0.5)
    a = ap.parse_args()
    with open(a.har) as f:
        entries = json.load(f)["log"]["entries"]
    status = collections.Counter(
        e["response"]["status"]
        for e in entries
        if e["request"]["method"] == "POST" and e["request"]["url"].endswith("/v1/completions")
    )
    total = sum(status.values())
    ok = status.get(200, 0)
    share = ok / total if total else 0.0
    by_status = ", ".join(f"{s}: {n}" for s, n in sorted(status.items()))
    print(f"fuzz: {ok} of {total} completion requests reached the engine ({share:.0%}); by status {by_status}")
    if share < a.min_share:
        print(f"fuzz: below the required share {a.min_share:.0%}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
