"""A deterministic stand-in model for the server's tests and for working on the web page.

`FakeBackend` speaks the engine's `Backend` protocol with `lalm.generate`'s own `Row`
(stop tokens, stop strings, whole-character text, length limits) but picks tokens with a
hash of everything the row has seen (prompt text, audio samples, its own tokens) instead
of a model. So greedy output depends only on the request, never on which other rows share
the batch: the property the real backend must have. `step_delay_s` makes one step cost
the same wall time whatever the batch size, like a memory-bound decoder.
"""

from __future__ import annotations

import codecs
import json
import time
import zlib
from pathlib import Path

import numpy as np

from lalm import generate as gen
from lalm.errors import ChatFormatError
from lalm.serve.engine import Options, Prepared, Update

WORDS = [
    "<eos>", " I", " heard", " a", " voice", " saying", " hello", " music", " and", " some",
    " noise", " in", " the", " room", ".", " It", " sounds", " like", " speech", " café",
]


class _ByteDecoder:
    """The tokenizer.StreamDecoder contract (push -> completed text, flush) over token bytes."""

    def __init__(self, token_bytes):
        self.token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self.token_bytes(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class FakeBackend:
    max_context = 4096
    stop_token_ids = frozenset({0})

    def __init__(self, step_delay_s: float = 0.0, min_tokens: int = 4, model_name: str = "fake"):
        self.step_delay_s = step_delay_s
        self.min_tokens = min_tokens  # EOS is never picked before this many tokens
        self.model_name = model_name
        self.rows: dict[int, gen.Row] = {}
        self.batch_sizes: list[int] = []  # rows per decode step, for tests

    # --- the tokenizer face TextStream needs ---
    def stream_decoder(self, skip_special_tokens: bool = True) -> _ByteDecoder:
        return _ByteDecoder(self.token_bytes)

    def token_bytes(self, token: int) -> bytes:
        return b"" if token == 0 else WORDS[token].encode()

    def token_text(self, token: int) -> str:
        return self.token_bytes(token).decode("utf-8", errors="replace")

    # --- Backend ---
    def prepare(self, conversation: list[dict]) -> Prepared:
        crc, n = 0, 0
        for i, m in enumerate(conversation):
            content = m["content"]
            parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
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

    def can_add(self, rows: list[tuple[Prepared, Options]]) -> bool:
        return True

    def add(self, rows: list[tuple[int, Prepared, Options]]) -> dict[int, Update]:
        time.sleep(self.step_delay_s)
        for key, prepared, o in rows:
            options = gen.SamplingOptions(
                max_new_tokens=o.max_new_tokens, temperature=o.temperature or 0.0,
                top_p=o.top_p or 1.0, top_k=o.top_k or 0, repetition_penalty=o.repetition_penalty or 1.0,
                min_new_tokens=o.min_tokens, seed=o.seed, stop=o.stop, stop_token_ids=(0,))
            row = gen.Row(options=options, key=prepared.prompt, stream=gen.TextStream(self))
            row.prompt_ids = [0] * prepared.prompt_tokens
            row.max_new_tokens = min(o.max_new_tokens, self.max_context - prepared.prompt_tokens)
            self.rows[key] = row
        return {key: self._next(key) for key, _, _ in rows}

    def step(self) -> dict[int, Update]:
        time.sleep(self.step_delay_s)
        self.batch_sizes.append(len(self.rows))
        return {key: self._next(key) for key in list(self.rows)}

    def remove(self, keys: list[int]) -> None:
        for k in keys:
            self.rows.pop(k, None)

    def _pick(self, row: gen.Row) -> int:
        h = row.key  # running hash of the row's prompt and tokens
        if len(row.tokens) >= self.min_tokens and h % 7 == 0:
            return 0
        if not row.options.greedy:
            return 1 + int(row.generator.initial_seed() + len(row.tokens) * 7919) % (len(WORDS) - 1)
        return 1 + h % (len(WORDS) - 1)

    def _next(self, key: int) -> Update:
        row = self.rows[key]
        token = self._pick(row)
        row.key = zlib.crc32(token.to_bytes(4, "little"), row.key)
        context_left = self.max_context - len(row.prompt_ids) - len(row.tokens) - 1
        row.accept(token, -0.1, context_left)
        top = [(token, -0.1)] + [(t, -3.0 - t / 10) for t in range(1, 6) if t != token]
        return Update(token, -0.1, row.take_text(), row.finish_reason, len(row.tokens), top)


def tiny_random_checkpoint(folder: str | Path, seed: int = 0, vocab_size: int = 512, text: dict | None = None) -> Path:
    """A loadable checkpoint folder with random weights and a small trained BPE: a real model
    for serving tests and bench/serve.py that costs nothing to build (no transformers). `text`
    overrides the decoder's shape (e.g. bench/serve.py --size mid)."""
    import torch
    from wordfreq import top_n_list

    from lalm.config import ModelConfig
    from lalm.model import Qwen2AudioForConditionalGeneration
    from lalm.tokenizer import train_bpe
    from lalm.weights import save_checkpoint

    folder = Path(folder)
    words = top_n_list("en", 3000)
    tok = train_bpe([" ".join(words[i:i + 12]) for i in range(0, len(words), 7)], vocab_size)
    eos = [tok.im_end_id, tok.endoftext_id]
    config = ModelConfig.preset(
        "test-tiny", audio_token_index=tok.audio_id,
        text={**(text or {}), "vocab_size": vocab_size, "extra": {"bos_token_id": eos[1], "eos_token_id": eos[0]}})
    g = torch.Generator().manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config)
    with torch.no_grad():
        # O(1)-scale weights: a 0.02 init makes every logit ~0 and greedy ties everywhere.
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    save_checkpoint(model, folder)
    tok.save(folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": eos, "pad_token_id": eos[1], "do_sample": False}))
    return folder
