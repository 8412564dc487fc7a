"""Serving benchmark for any OpenAI-compatible completions server: N
streaming clients, each sending requests back to back, for N in --clients;
aggregate completion tokens/s, time to first token (TTFT) and inter-chunk
latency (ITL, as vLLM's benchmark counts it) p50/p99, per temperature.
Standard library only (threads + http.client), so the same harness measures
gpt-serve and llama.cpp's llama-server in one run.

Prompts are token-id lists (the same ids for every server), made once from
the val split with gpt-serve's own tokenizer through its /tokenize route:

    python3 scripts/serving_bench.py prompts --url http://127.0.0.1:8000 \\
        --text ../shared/data/gutenberg/val.txt.gz --out runs/serving/prompts.json
    python3 scripts/serving_bench.py run --url http://127.0.0.1:8000 --label ours \\
        --prompts runs/serving/prompts.json --out runs/serving/results.jsonl
    python3 scripts/serving_bench.py report --results runs/serving/results.jsonl

`scripts/serving-bench.sh` runs the whole comparison.
"""
import argparse
import gzip
import http.client
import json
import statistics
import threading
import time
import urllib.parse


def post(url, path, body, timeout=600):
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return c, c.getresponse()


def make_prompts(args):
    opener = gzip.open if args.text.endswith(".gz") else open
    with opener(args.text, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    prompts = []
    step = len(text) // (args.n + 1)
    for i in range(args.n):
        at = text.find("\n", (i + 1) * step) + 1
        piece = " ".join(text[at : at + args.chars].split())
        c, r = post(args.url, "/tokenize", {"prompt": piece})
        ids = json.loads(r.read())["tokens"]
        c.close()
        prompts.append(ids)
    with open(args.out, "w") as f:
        json.dump(prompts, f)
    print(f"{len(prompts)} prompts, {statistics.mean(map(len, prompts)):.0f} tokens on average -> {args.out}")


def stream_one(url, model, prompt, tokens, temperature, seed, extra):
    """One streaming request: (ttft, chunk gaps, completion tokens)."""
    body = extra | {
        "model": model,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": temperature,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    c, r = post(url, "/v1/completions", body)
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]}")
    first, last, gaps, chunks, usage = None, None, [], 0, None
    for raw in r:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        ev = json.loads(data)
        if ev.get("usage"):
            usage = ev["usage"].get("completion_tokens")
        text = "".join(ch.get("text") or "" for ch in ev.get("choices") or [])
        if not text:
            continue
        now = time.perf_counter()
        chunks += 1
        if first is None:
            first = now - t0
        else:
            gaps.append(now - last)
        last = now
    c.close()
    return first, gaps, usage if usage is not None else chunks


def pct(v, p):
    if not v:
        return float("nan")
    v = sorted(v)
    return v[min(len(v) - 1, round((len(v) - 1) * p))]


def level(args, prompts, clients, temperature):
    per_client = max(args.min_requests // clients, 2)
    results, errors = [], []
    lock = threading.Lock()

    def client(c):
        for j in range(per_client):
            k = (c * per_client + j) % len(prompts)
            try:
                out = stream_one(args.url, args.model, prompts[k], args.tokens, temperature, k, json.loads(args.extra))
                with lock:
                    results.append(out)
            except Exception as e:  # counted and reported, never hidden
                with lock:
                    errors.append(str(e))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r[0] for r in results if r[0] is not None]
    itl = [g for r in results for g in r[1]]
    tokens = sum(r[2] for r in results)
    return {
        "clients": clients,
        "temperature": temperature,
        "requests": len(results),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "ttft_p50_ms": 1e3 * pct(ttft, 0.5),
        "ttft_p99_ms": 1e3 * pct(ttft, 0.99),
        "itl_p50_ms": 1e3 * pct(itl, 0.5),
        "itl_p99_ms": 1e3 * pct(itl, 0.99),
    }


def run(args):
    """Runs every (temperature, clients) level; appends one JSON line per
    level to --out (so several servers' levels can be interleaved). With
    --offset/--count the level sends a slice of the prompts (a server with
    a continuation cache then sees each prompt once), and with --repeat r
    each prompt r times in a row (one client sends the repeats back to
    back: repeated traffic)."""
    with open(args.prompts) as f:
        prompts = json.load(f)
    end = None if args.count is None else args.offset + args.count
    prompts = [p for p in prompts[args.offset : end] for _ in range(args.repeat)]
    if not prompts:
        raise SystemExit(f"no prompts at offset {args.offset} of {args.prompts}")
    for temperature in [float(t) for t in args.temps.split(",")]:
        for clients in [int(c) for c in args.clients.split(",")]:
            row = level(args, prompts, clients, temperature)
            row["label"] = args.label
            row["workload"] = args.workload
            print(
                f"{args.label} t={temperature} {clients:>2} clients: {row['tok_s']:7.0f} tok/s, "
                f"TTFT p50/p99 {row['ttft_p50_ms']:.0f}/{row['ttft_p99_ms']:.0f} ms, "
                f"ITL p50/p99 {row['itl_p50_ms']:.1f}/{row['itl_p99_ms']:.1f} ms, "
                f"{row['errors']} errors",
                flush=True,
            )
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


def report(args):
    """A markdown table of the levels in --results: tok/s, the ratio to the
    same server's one-client figure and to the reference server's figure at
    the same level, TTFT and ITL."""
    rows = [json.loads(l) for l in open(args.results) if l.strip()]
    wl = lambda r: r.get("workload", "fresh")
    by = {(r["label"], wl(r), r["temperature"], r["clients"]): r for r in rows}
    print("| server | workload | temp | clients | tok/s | x one client | x " + args.reference + " | TTFT p50 / p99 ms | ITL p50 / p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        one = by.get((r["label"], wl(r), r["temperature"], 1))
        ref = by.get((args.reference, wl(r), r["temperature"], r["clients"]))
        ratio = lambda a, b: f"{a / b:.2f}x" if b else "-"
        print(
            f"| {r['label']} | {wl(r)} | {r['temperature']} | {r['clients']} | {r['tok_s']:.0f} | "
            f"{ratio(r['tok_s'], one and one['tok_s'])} | {ratio(r['tok_s'], ref and ref['tok_s'])} | "
            f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['errors']} |"
        )


def greedy_texts(args):
    """Greedy texts of the first prompts from each URL, to check that two
    servers run the same model before they are timed."""
    with open(args.prompts) as f:
        prompts = json.load(f)[: args.n]
    out = {}
    for url in args.urls:
        texts = []
        for p in prompts:
            c, r = post(url, "/v1/completions", {"model": args.model, "prompt": p, "max_tokens": args.tokens, "temperature": 0})
            texts.append(json.loads(r.read())["choices"][0]["text"])
            c.close()
        out[url] = texts
    same = [a == b for a, b in zip(*out.values())]
    print(f"greedy texts equal on {sum(same)} of {len(same)} prompts")
    for i, ok in enumerate(same):
        if not ok:
            print(f"prompt {i}:", *(repr(t[:120]) for t in (v[i] for v in out.values())), sep="\n  ")
    return all(same)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts")
    p.add_argument("--url", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--chars", type=int, default=200)
    p.add_argument("--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("--url", required=True)
    r.add_argument("--label", required=True)
    r.add_argument("--model", default="default")
    r.add_argument("--prompts", required=True)
    r.add_argument("--clients", default="1,4,8,16,32")
    r.add_argument("--temps", default="0,0.8")
    r.add_argument("--tokens", type=int, default=128)
    r.add_argument("--min-requests", type=int, default=64)
    r.add_argument("--extra", default="{}", help="JSON merged into every request body")
    r.add_argument("--offset", type=int, default=0, help="first prompt of the slice sent")
    r.add_argument("--count", type=int, default=None, help="prompts in the slice (default: all)")
    r.add_argument("--repeat", type=int, default=1, help="send each prompt this many times in a row")
    r.add_argument("--workload", default="fresh", help="a name recorded with the results")
    r.add_argument("--out", required=True)
    t = sub.add_parser("report")
    t.add_argument("--results", required=True)
    t.add_argument("--reference", default="llama-server")
    c = sub.add_parser("check")
    c.add_argument("urls", nargs=2)
    c.add_argument("--model", default="default")
    c.add_argument("--prompts", required=True)
    c.add_argument("--n", type=int, default=5)
    c.add_argument("--tokens", type=int, default=48)
    a = ap.parse_args()
    if a.cmd == "prompts":
        make_prompts(a)
    elif a.cmd == "run":
        run(a)
    elif a.cmd == "report":
        report(a)
    else:
        raise SystemExit(0 if greedy_texts(a) else 1)


if __name__ == "__main__":
    main()
