"""Checks gpt-serve with the official openai client: completions, streaming, logprobs, errors."""
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused")
models = client.models.list()
assert models.data[0].id == "default", models

r = client.completions.create(model="default", prompt="The old house", max_tokens=20, temperature=0)
assert r.object == "text_completion" and len(r.choices) == 1, r
assert r.usage.completion_tokens <= 20 and r.choices[0].finish_reason in ("stop", "length"), r
print("completion:", repr(r.choices[0].text))

again = client.completions.create(model="default", prompt="The old house", max_tokens=20, temperature=0)
assert again.choices[0].text == r.choices[0].text, "greedy output must be deterministic"

text = ""
chunks = 0
for chunk in client.completions.create(model="default", prompt="The old house", max_tokens=20, temperature=0, stream=True):
    chunks += 1
    text += chunk.choices[0].text if chunk.choices else ""
assert text == r.choices[0].text, (text, r.choices[0].text)
print("stream:", chunks, "chunks, same text")

lp = client.completions.create(model="default", prompt="It was a", max_tokens=5, temperature=0, logprobs=3)
l = lp.choices[0].logprobs
assert len(l.tokens) == len(l.token_logprobs) == len(l.top_logprobs) == len(l.text_offset) == lp.usage.completion_tokens
assert all(x <= 0 for x in l.token_logprobs) and all(1 <= len(t) <= 3 for t in l.top_logprobs)
print("logprobs:", l.tokens, l.token_logprobs)

echo = client.completions.create(model="default", prompt="It was a dark night", max_tokens=0, echo=True, logprobs=1, temperature=0)
assert echo.choices[0].logprobs.token_logprobs[0] is None and len(echo.choices[0].logprobs.tokens) >= 4
print("echo scoring ok")

s = client.completions.create(model="default", prompt="Once", max_tokens=15, temperature=0.8, seed=7)
s2 = client.completions.create(model="default", prompt="Once", max_tokens=15, temperature=0.8, seed=7)
assert s.choices[0].text == s2.choices[0].text, "same seed, same output"

try:
    client.completions.create(model="default", prompt="x", max_tokens=5, temperature=-1)
    raise SystemExit("expected a 400")
except openai.BadRequestError as e:
    assert "temperature" in str(e), e
print("openai client check: 6 passed, 0 failed")
