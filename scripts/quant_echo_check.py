"""Perplexity through the HTTP server's lm-eval path (echo + logprobs, the
way lm-evaluation-harness scores loglikelihood) against `gpt-serve eval` on
the very same tokens, for each server given (one per `--weights`).

Cuts the text into pieces at line ends, tokenizes each with the server's
/tokenize, keeps the first WINDOW ids of each piece long enough, and asks
/v1/completions for each window with echo, logprobs 0 and max_tokens 0: the
sum of tokens 1..WINDOW-1's logprobs is the window's log-likelihood. Writes
the windows as one JSON array (for `gpt-serve eval --token-ids`) and prints
each server's mean negative log-likelihood and perplexity as JSON lines.
Stdlib only.

    python3 scripts/quant_echo_check.py --text FILE --windows 40 \\
        --ids-out runs/echo/ids.json URL_A URL_B ...
"""
import argparse
import json
import math
import urllib.request


def post(url, path, body):
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def windows(url, text, n, width):
    out, lines, piece = [], text.splitlines(keepends=True), ""
    for line in lines:
        piece += line
        if len(piece) < 4 * width:
            continue
        ids = post(url, "/tokenize", {"prompt": piece[: 6 * width]})["tokens"]
        piece = ""
        if len(ids) >= width:
            out.append(ids[:width])
        if len(out) == n:
            break
    return out


def nll(url, wins, model):
    total, count = 0.0, 0
    for w in wins:
        r = post(url, "/v1/completions", {"model": model, "prompt": w, "max_tokens": 0, "echo": True, "logprobs": 0})
        lp = r["choices"][0]["logprobs"]["token_logprobs"]
        scored = lp[1 : len(w)]
        assert len(scored) == len(w) - 1 and all(x is not None for x in scored), "echo gave too few logprobs"
        total -= sum(scored)
        count += len(scored)
    return total / count, count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("urls", nargs="+")
    ap.add_argument("--text", required=True)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--ids-out", required=True)
    ap.add_argument("--model", default="default")
    a = ap.parse_args()
    text = open(a.text, encoding="utf-8").read()
    wins = windows(a.urls[0], text, a.windows, a.width)
    json.dump([t for w in wins for t in w], open(a.ids_out, "w"))
    for url in a.urls:
        loss, count = nll(url, wins, a.model)
        print(json.dumps({"url": url, "windows": len(wins), "tokens": count, "loss": loss, "perplexity": math.exp(loss)}))


if __name__ == "__main__":
    main()
