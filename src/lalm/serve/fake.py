"""A deterministic stand-in model for the server's tests and for working on the web page.

`FakeBackend` speaks the engine's `Backend` protocol without torch: a row's next token is
a hash of everything the row has seen (prompt text, audio samples, its own tokens), so
greedy output depends only on the request, never on which other rows share the batch,
exactly the property the real backend must have. `step_delay_s` makes one decode step
cost the same wall time whatever the batch size, like a memory-bound decoder.
"""

from __future__ import annotations

import random
import time
import zlib

import numpy as np

from lalm.errors import ChatFormatError
from lalm.serve.engine import Options, Prepared, Sampled

WORDS = [
    "<eos>", " I", " heard", " a", " voice", " saying", " hello", " music", " and", " some",
    " noise", " in", " the", " room", ".", " It", " sounds", " like", " speech", " café",
]


class FakeBackend:
    model_name = "fake"
    max_context = 4096
    eos_ids = frozenset({0})

    def __init__(self, step_delay_s: float = 0.0, min_tokens: int = 4, model_name: str = "fake"):
        self.step_delay_s = step_delay_s
        self.min_tokens = min_tokens
        self.model_name = model_name
        self.rows: dict[int, dict] = {}
        self.batch_sizes: list[int] = []  # rows per step, for tests

    def prepare(self, conversation: list[dict], add_generation_prompt: bool = True) -> Prepared:
        crc, n = 0, 0
        for i, m in enumerate(conversation):
            parts = m["content"] if isinstance(m["content"], list) else [
                {"type": "text", "text": m["content"]}]
            for part in parts:
                if part["type"] == "audio":
                    if m["role"] == "system":
                        raise ChatFormatError(f"messages[{i}]: audio in a system message")
                    wave = np.asarray(part["audio"]["array"], dtype=np.float32)
                    crc = zlib.crc32(wave.tobytes(), crc)
                    n += 2 + max(1, len(wave) // 640)  # ~25 tokens per second, like the model
                else:
                    crc = zlib.crc32(part["text"].encode(), crc)
                    n += len(part["text"].split()) + 1
            crc = zlib.crc32(m["role"].encode(), crc)
            n += 4
        return Prepared(prompt=crc, prompt_tokens=n)

    def _sample(self, key: int) -> Sampled:
        row = self.rows[key]
        opts: Options = row["options"]
        h = row["crc"]
        if len(row["out"]) >= self.min_tokens and h % 7 == 0:
            token = 0
        elif opts.temperature > 0:
            token = row["rng"].randrange(1, len(WORDS))
        else:
            token = 1 + h % (len(WORDS) - 1)
        row["out"].append(token)
        row["crc"] = zlib.crc32(token.to_bytes(4, "little"), h)
        top = [(token, -0.1)] + [(t, -3.0 - t / 10) for t in range(1, 6) if t != token]
        return Sampled(token=token, logprob=-0.1, top=top)

    def add(self, rows: list[tuple[int, Prepared, Options]]) -> dict[int, Sampled]:
        time.sleep(self.step_delay_s)
        for key, prepared, opts in rows:
            seed = opts.seed if opts.seed is not None else random.randrange(2**31)
            self.rows[key] = {
                "crc": prepared.prompt, "options": opts, "out": [], "rng": random.Random(seed)}
        return {key: self._sample(key) for key, _, _ in rows}

    def step(self) -> dict[int, Sampled]:
        time.sleep(self.step_delay_s)
        self.batch_sizes.append(len(self.rows))
        return {key: self._sample(key) for key in list(self.rows)}

    def remove(self, keys: list[int]) -> None:
        for k in keys:
            self.rows.pop(k, None)

    def decode(self, ids: list[int]) -> str:
        return "".join(WORDS[i] for i in ids if i != 0)

    def token_text(self, token: int) -> str:
        return WORDS[token]
