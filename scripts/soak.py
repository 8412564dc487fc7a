#!/usr/bin/env python3
"""A bounded soak of `gpt-serve serve`: many concurrent streaming clients,
a share of which hang up at random or read slowly, for a fixed time.

Passes when there were no unexpected errors (a 429 beyond capacity and the
clients' own hang-ups are expected, nothing else is), a fresh request is
admitted at the end (capacity came back), and the server's resident memory
at the end is within 10% of its level after warm-up.

Standard library only. Usage:
  soak.py URL PID [--clients 64] [--seconds 300] [--warmup 60] [--seed 1]
"""
import argparse
import http.client
import json
import random
import sys
import threading
import time
import urllib.parse


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.unexpected = []

    def add(self, kind, detail=None):
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if detail is not None and len(self.unexpected) < 20:
                self.unexpected.append(detail)


def one_request(host, port, body, behaviour, rng, tally):
    conn = http.client.HTTPConnection(host, port, timeout=120)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"content-type": "application/json"})
        resp = conn.getresponse()
        if resp.status == 429:
            resp.read()
            return tally.add("429")
        if resp.status != 200:
            return tally.add("error", f"status {resp.status}: {resp.read()[:200]!r}")
        if behaviour == "hang-up":
            for _ in range(rng.randint(0, 5)):
                if not resp.readline():
                    break
            conn.sock.close()
            return tally.add("hung up")
        data = b""
        while True:
            chunk = resp.read(64) if behaviour == "slow" else resp.readline()
            if not chunk:
                break
            data += chunk
            if behaviour == "slow":
                time.sleep(rng.uniform(0.005, 0.05))
        events = [l[6:] for l in data.decode().split("\n") if l.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return tally.add("error", f"stream ended without [DONE]: {data[-200:]!r}")
        for e in events[:-1]:
            if '"error"' in e:
                return tally.add("error", f"error event: {e[:200]}")
        tally.add("ok " + behaviour)
    except (ConnectionError, http.client.HTTPException, OSError) as e:
        tally.add("error", f"{behaviour}: {type(e).__name__}: {e}")
    finally:
        conn.close()


def client(i, args, host, port, words, until, tally):
    rng = random.Random(args.seed * 1000 + i)
    while time.monotonic() < until:
        at = rng.randrange(0, len(words) - 40)
        prompt = " ".join(words[at:at + rng.randint(3, 30)])
        body = {"model": args.model, "prompt": prompt, "stream": True,
                "max_tokens": rng.randint(8, 96),
                "temperature": rng.choice([0.0, 0.8, 1.0]),
                "seed": rng.randrange(1 << 30)}
        r = rng.random()
        behaviour = "hang-up" if r < 0.15 else "slow" if r < 0.3 else "normal"
        one_request(host, port, body, behaviour, rng, tally)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("pid", type=int)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--warmup", type=float, default=60)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--model", default="default")
    ap.add_argument("--text", default="tests/fixtures/prose.txt")
    args = ap.parse_args()
    u = urllib.parse.urlparse(args.url)
    words = open(args.text).read().split()
    tally = Tally()
    start = time.monotonic()
    until = start + args.seconds
    threads = [threading.Thread(target=client, daemon=True,
                                args=(i, args, u.hostname, u.port, words, until, tally))
               for i in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(min(args.warmup, args.seconds))
    warm = rss_kib(args.pid)
    peak = warm
    while any(t.is_alive() for t in threads):
        time.sleep(1)
        peak = max(peak, rss_kib(args.pid))
    end_rss = rss_kib(args.pid)
    # Capacity is back: a fresh request is admitted and completes.
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/completions",
                 json.dumps({"model": args.model, "prompt": "The house", "max_tokens": 4}),
                 {"content-type": "application/json"})
    fresh = conn.getresponse().status
    print(f"soak: {args.clients} clients for {time.monotonic() - start:.0f}s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(tally.counts.items())))
    print(f"soak: RSS after warm-up {warm / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, "
          f"end {end_rss / 1024:.1f} MiB ({end_rss / warm:.3f}x); fresh request {fresh}")
    failures = []
    if tally.counts.get("error"):
        failures.append(f"{tally.counts['error']} unexpected errors: {tally.unexpected}")
    if fresh != 200:
        failures.append(f"a fresh request got {fresh}, not 200")
    if end_rss > 1.10 * warm:
        failures.append(f"RSS grew {end_rss / warm:.3f}x after warm-up (limit 1.10x)")
    if sum(v for k, v in tally.counts.items() if k.startswith("ok")) == 0:
        failures.append("no request completed")
    for f in failures:
        print("soak: FAIL:", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
