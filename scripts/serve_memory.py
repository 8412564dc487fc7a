#!/usr/bin/env python3
"""Resident memory of `gpt-serve serve` at rest and at its fullest.

Starts the server, reads VmRSS once /health answers, then sends
`--concurrent` completions at once that each fill the context window
(max_tokens 256 with --truncate-max-tokens) and reports the peak (VmHWM).
The defaults, 96 requests = GPT_SERVE_MAX_ACTIVE 32 decoding + 64
GPT_SERVE_MAX_WAITING queued, are the most the server admits before 429s:
the figure deploy/kubernetes/deployment.yaml sizes its memory from.

    scripts/serve_memory.py target/release/gpt-serve [--threads 2] [--concurrent 96]

Standard library only; Linux (/proc).
"""
import argparse
import json
import socket
import subprocess
import threading
import time
import urllib.request


def mib(status, key):
    return int(status[key].split()[0]) / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--model", default="models/default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrent", type=int, default=96)
    a = ap.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [a.binary, "--threads", str(a.threads), "serve", "--model", a.model,
         "--port", str(port), "--model-id", "m", "--truncate-max-tokens"],
        stderr=subprocess.DEVNULL)

    def status():
        with open(f"/proc/{server.pid}/status") as f:
            return dict(line.split(":", 1) for line in f)

    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                if urllib.request.urlopen(url + "/health").status == 200:
                    break
            except OSError:
                time.sleep(0.05)
        else:
            raise SystemExit("the server did not become healthy in 60 s")
        rest = mib(status(), "VmRSS")

        tokens = []

        def complete(i):
            body = json.dumps({"model": "m", "prompt": f"Chapter {i}. It was a dark and stormy night",
                               "max_tokens": 256, "seed": i}).encode()
            req = urllib.request.Request(url + "/v1/completions", body,
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as r:
                tokens.append(json.load(r)["usage"]["completion_tokens"])

        t0 = time.time()
        clients = [threading.Thread(target=complete, args=(i,)) for i in range(a.concurrent)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        peak = mib(status(), "VmHWM")
        if len(tokens) != a.concurrent:
            raise SystemExit(f"only {len(tokens)} of {a.concurrent} requests succeeded")
        print(f"{a.model}, --threads {a.threads}: {rest:.0f} MiB resident once healthy; "
              f"peak {peak:.0f} MiB with {a.concurrent} concurrent requests "
              f"({sum(tokens)} tokens in {time.time() - t0:.1f} s)")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
