"""The decode loop of single sequences: prefill, one-token decode steps, sampling; rows that come and go.

`LALM.generate/stream` (api.py) and the server's continuous-batching engine both run on these
pieces, so there is exactly one implementation of sampling and of the KV-cache bookkeeping (beam
search, lalm.beam, reuses `prefill`, `SamplingOptions` and `TextStream`):

- `SamplingOptions`: frozen, one per request (temperature 0 = greedy).
- `sample(logits, options, generator, seen, n_generated)`: one row's next token, applying
  min-new-tokens, repetition penalty, temperature, top-k, top-p in transformers' order.
- `prefill(model, batch, cache)`: encodes the audio once and fills the cache; last-position logits.
- `Row`: one sequence: its prompt, options, generator, tokens, log-probs, text, finish reason.
- `DecodeState`: a preallocated KV cache whose first `n` batch slots are live rows, plus the
  per-row bookkeeping. `start()` prefills a batch; `step()` decodes one token for every live
  row; `pop_finished()` removes finished rows (so they stop costing compute); `add()` prefills
  new rows and slots them in between steps (continuous batching).
- `generate(model, batch, rows)`: the loop, yielding after every step (streaming).

Cache layout. All live rows share one write column `pos`: each row's tokens are right-aligned
so that its latest token sits at column `pos - 1`, with masked (left-padding) columns before
its first token. RoPE positions are per row (`next_pos`), so a row's keys do not depend on
where it sits in the cache and a row can be moved to another slot or column by copying.
Removing a row copies the last live row into its slot (O(one row)); adding rows prefills them
in a scratch cache and copies them in, right-aligned at `pos` (if a new prompt is longer than
`pos`, the live rows are first shifted right). When the rows with the oldest columns finish,
the cache is shifted left so attention stops paying for columns nobody uses.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from lalm.decode_ops import cpu_decode_path, decode_attention, decode_threads
from lalm.errors import ChatFormatError, ConfigError, ContextLengthError
from lalm.model import KVCache


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int = 256
    min_new_tokens: int = 0  # stop tokens are masked until this many tokens exist (as transformers)
    temperature: float = 0.0  # 0 = greedy (argmax of the penalised logits)
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # CTRL-style, on every token of the prompt and the output
    stop_token_ids: tuple[int, ...] = ()  # end the row; kept in token_ids (text skips special ids)
    stop: tuple[str, ...] = ()  # stop strings (cut from the text; needs a text stream)
    seed: int | None = None  # per row: a seeded row samples the same alone or in any batch
    top_logprobs: int = 0  # also record the k most likely ids and their log-probs at each step
    num_beams: int = 1  # > 1: beam search (lalm.beam; greedy only, offline decoding)
    length_penalty: float = 1.0  # beam search: a finished beam scores sum log p / length ** this

    def __post_init__(self) -> None:
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("min_new_tokens", self.min_new_tokens >= 0, "must be >= 0"),
            ("temperature", self.temperature >= 0 and math.isfinite(self.temperature), "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("top_logprobs", self.top_logprobs >= 0, "must be >= 0"),
            ("num_beams", self.num_beams >= 1, "must be >= 1"),
            ("length_penalty", math.isfinite(self.length_penalty), "must be finite"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ConfigError(f"sampling option {name}={getattr(self, name)!r}: {why}")
        # A bare string would be read as one stop string per character ("END": stop at any E).
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"sampling option stop={self.stop!r}: stop strings must be a tuple of non-empty strings")
        ids = self.stop_token_ids
        if isinstance(ids, numbers.Integral) or not all(isinstance(t, numbers.Integral) and t >= 0 for t in ids):
            raise ConfigError(f"sampling option stop_token_ids={self.stop_token_ids!r}: must be a tuple of token ids")
        if self.num_beams > 1:
            clash = [f"{name}={v!r}" for name, v, off in [("temperature", self.temperature, 0.0),
                                                        ("stop", self.stop, ()), ("top_logprobs", self.top_logprobs, 0)]
                     if v != off]
            if clash:
                raise ConfigError(f"num_beams={self.num_beams} (beam search) cannot be combined with {', '.join(clash)}: "
                                  "beam search is deterministic and ends on stop tokens only")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def process_logits(logits: torch.Tensor, options: SamplingOptions, seen: torch.Tensor | None = None,
                   n_generated: int = 0) -> torch.Tensor:
    """The scores a row samples from. logits (V,); seen (V,) bool: tokens of the prompt and output.

    transformers' order: min-new-tokens and repetition penalty, then (sampling only)
    temperature, top-k, top-p; removed tokens get -inf.
    """
    logits = logits.float()
    if n_generated < options.min_new_tokens and options.stop_token_ids:
        logits = logits.clone()
        logits[list(options.stop_token_ids)] = -math.inf
    if options.repetition_penalty != 1.0 and seen is not None:
        p = options.repetition_penalty
        logits = torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)
    if options.greedy:
        return logits
    logits = logits / options.temperature
    if 0 < options.top_k < logits.shape[-1]:
        kth = torch.topk(logits, options.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if options.top_p < 1.0:
        sorted_logits, order = torch.sort(logits)  # ascending
        remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - options.top_p
        remove[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(0, order, remove), -math.inf)
    return logits


def sample(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None, n_generated: int = 0) -> int:
    """Next token of one row: argmax when greedy, else a draw from the processed scores."""
    scores = process_logits(logits, options, seen, n_generated)
    if options.greedy:
        return int(scores.argmax())
    probs = scores.softmax(-1)
    if generator is not None and probs.device != generator.device:
        # Row generators live on the CPU (a seed then draws the same on any device), and torch
        # refuses a CPU generator for a CUDA tensor: "Expected a 'cuda' device type for generator".
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """The text of a row as it decodes: grows by whole characters only (tokenizer.StreamDecoder
    works on bytes, so a character split across tokens appears once it is complete)."""

    def __init__(self, tokenizer):
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.text = ""

    def push(self, token_id: int) -> None:
        self.text += self.decoder.push(token_id)

    def flush(self) -> None:
        self.text += self.decoder.flush()


@dataclass
class Row:
    """One sequence being decoded. `key` is the caller's handle (an index, a request id)."""

    prompt_ids: list[int] = field(default_factory=list)  # set by DecodeState from the batch
    options: SamplingOptions = field(default_factory=SamplingOptions)
    key: Any = None
    audio_tokens: int = 0
    stream: TextStream | None = None  # needed for stop strings and streaming text
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # the model's log-prob of each chosen token
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per step, if asked
    finish_reason: str | None = None  # None while running, then "stop" or "length"
    max_new_tokens: int = 0  # options.max_new_tokens clipped to the context (set by DecodeState)
    text: str = ""  # final text (stop string cut), set when the row finishes
    emitted: int = 0  # characters of text already handed out by take_text()
    seen: torch.Tensor | None = None  # (V,) bool, only with a repetition penalty

    def __post_init__(self) -> None:
        if self.generator is None and not self.options.greedy:
            self.generator = torch.Generator()
            if self.options.seed is not None:
                self.generator.manual_seed(self.options.seed)
            else:
                self.generator.seed()
        if self.options.stop and self.stream is None:
            raise ValueError("stop strings need a Row.stream (a TextStream) to see the text")

    def accept(self, token: int, logprob: float, context_left: int) -> None:
        """Append one token; finish the row on a stop token, a stop string or the length limit."""
        self.tokens.append(token)
        self.logprobs.append(logprob)
        if self.seen is not None:
            self.seen[token] = True
        if self.stream is not None:
            self.stream.push(token)
        stop_token = token in self.options.stop_token_ids and len(self.tokens) > self.options.min_new_tokens
        if stop_token or (self.options.stop and self._stop_at(self.stream.text, self.emitted) >= 0):
            self.finish("stop")
        elif len(self.tokens) >= self.max_new_tokens or context_left <= 0:
            self.finish("length")

    def _stop_at(self, text: str, since: int) -> int:
        """Index of the first stop string in text (searching from near `since`), or -1."""
        start = max(0, since - max(len(s) for s in self.options.stop))
        hits = [i for s in self.options.stop if (i := text.find(s, start)) >= 0]
        return min(hits, default=-1)

    def finish(self, reason: str) -> None:
        """End the row; its final text is everything decoded, cut before a stop string."""
        if self.finish_reason is not None:
            return
        if self.stream is not None:
            self.stream.flush()  # a row may end inside a character: emit the U+FFFD then
            self.text = self.stream.text
            if self.options.stop and (cut := self._stop_at(self.text, 0)) >= 0:
                self.text, reason = self.text[:cut], "stop"
        self.finish_reason = reason

    def take_text(self) -> str:
        """New text since the last call. While running, holds back a tail that could still turn
        out to be the start of a stop string; never splits a character."""
        if self.stream is None:
            return ""
        if self.finish_reason is not None:
            end, text = len(self.text), self.text
        else:
            text = self.stream.text
            end = len(text) - (max((len(s) for s in self.options.stop), default=1) - 1)
        piece = text[self.emitted:end] if end > self.emitted else ""
        self.emitted += len(piece)
        return piece


# ---------------------------------------------------------------- model calls


def _to(batch, device) -> dict:
    mel = batch.mel.to(device) if batch.mel is not None else None
    frames = batch.mel_frames.to(device) if batch.mel is not None else None
    return {"input_ids": batch.input_ids.to(device), "position_ids": batch.position_ids.to(device),
            "attention_mask": batch.attention_mask.to(device).bool(), "mel": mel, "mel_frames": frames}


@torch.inference_mode()
def prefill(model, batch, cache: KVCache) -> torch.Tensor:
    """Run the prompt (left padded), audio encoded here once; fill cache columns [0, T).
    Returns the last position's logits (B, V): left padding puts every row's last token there."""
    inputs = _to(batch, cache.k.device)
    return model(**inputs, cache=cache, cache_pos=0, logits_to_keep=1)[:, -1]


def _rows_view(cache: KVCache, n: int) -> KVCache:
    """The first n batch slots of `cache` as a KVCache (views: writes land in `cache`)."""
    view = copy.copy(cache)
    view.k, view.v = cache.k[:, :n], cache.v[:, :n]
    return view


class DecodeState:
    """Live rows in the first `n` slots of a preallocated KV cache (see the module docstring).

    cache (layers, B_max, Hkv, S_max, D); mask (B_max, S_max) bool: real keys of each slot;
    pos: next column to write (shared); next_pos (B_max,) RoPE position of each slot's next token;
    last (B_max,) the token each slot feeds next.
    """

    def __init__(self, model, cache: KVCache):
        self.model = model
        self.cache = cache
        b_max, s_max = cache.k.shape[1], cache.k.shape[3]
        device = cache.k.device
        self.mask = torch.zeros(b_max, s_max, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(b_max, dtype=torch.long, device=device)
        self.last = torch.zeros(b_max, dtype=torch.long, device=device)
        self.pos = 0
        self.rows: list[Row] = []
        self.max_positions = model.config.text.max_position_embeddings

    @property
    def n(self) -> int:
        return len(self.rows)

    @classmethod
    @torch.inference_mode()
    def start(cls, model, batch, rows: list[Row], max_rows: int | None = None,
              max_len: int | None = None) -> DecodeState:
        """Prefill `batch` (one Row per batch row, same order) and sample each row's first token.
        `max_rows`/`max_len` reserve room for rows added later (continuous batching)."""
        check_context(model, batch)
        model.use_decode_layout()  # faster one-row GEMMs on CPU; values unchanged
        B, T = batch.input_ids.shape
        budget = max(min(r.options.max_new_tokens, model.config.text.max_position_embeddings) for r in rows)
        cache = KVCache.for_model(model, max(max_rows or B, B), max(max_len or 0, T + budget))
        state = cls(model, cache)
        state._admit(batch, rows, cache, B, T)
        return state

    def fits(self, prompt_len: int, max_new_tokens: int, n_rows: int = 1) -> bool:
        """Whether `add` can take n_rows more rows with this prompt length and budget."""
        s_max = self.cache.k.shape[3]
        pos = max(self.pos, prompt_len)
        need = max([max_new_tokens] + [r.max_new_tokens - len(r.tokens) for r in self.rows])
        return self.n + n_rows <= self.cache.k.shape[1] and pos + need <= s_max

    @torch.inference_mode()
    def add(self, batch, rows: list[Row]) -> None:
        """Prefill new rows in a scratch cache and slot them in (between `step` calls)."""
        check_context(self.model, batch)
        B, T = batch.input_ids.shape
        if not self.fits(T, max(r.options.max_new_tokens for r in rows), B):
            raise ValueError(f"{B} rows of {T} prompt tokens do not fit the decode state; start another")
        if T > self.pos:  # shift the live rows right so the new prompts end at `pos` too
            self._shift(T - self.pos)
        scratch = KVCache.for_model(self.model, B, T)
        self._admit(batch, rows, scratch, B, T)

    def _admit(self, batch, rows: list[Row], cache: KVCache, B: int, T: int) -> None:
        if len(rows) != B:
            raise ValueError(f"{len(rows)} rows for a batch of {B}")
        if any(r.options.num_beams > 1 for r in rows):
            raise ConfigError("num_beams > 1 is beam search (lalm.beam.search, which LALM.generate runs): "
                              "the row decoder and the serving engine decode one sequence per row")
        logits = prefill(self.model, batch, _rows_view(cache, B))  # (B, V); start: slots [0, B)
        slots = slice(self.n, self.n + B)
        device = self.cache.k.device
        mask = batch.attention_mask.to(device).bool()
        if cache is not self.cache:  # copy the scratch cache in, right-aligned at pos
            cols = slice(self.pos - T, self.pos)
            self.cache.k[:, slots, :, cols] = cache.k
            self.cache.v[:, slots, :, cols] = cache.v
            self.mask[slots] = False
            self.mask[slots, cols] = mask
        else:
            self.mask[slots, :T] = mask
            self.pos = T
        self.next_pos[slots] = mask.long().sum(-1)
        for i, row in enumerate(rows):
            row.prompt_ids = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
            room = self.max_positions - len(row.prompt_ids)
            row.max_new_tokens = min(row.options.max_new_tokens, room)
        self.rows.extend(rows)
        self._accept(logits, range(slots.start, slots.stop))

    @torch.inference_mode()
    def step(self) -> None:
        """Decode one token for every live row."""
        n, pos = self.n, self.pos
        if n == 0:
            return
        self.mask[:n, pos] = True  # the new token's own column
        head = self.model.language_model.lm_head.weight
        with decode_threads(on=cpu_decode_path(head)), \
                decode_attention(head.device):
            # the whole step, sampling included: a torch op on two threads here would wait on
            # OpenBLAS's spinning worker (a batch-1 step's logsumexp took ~10 ms instead of ~0.3)
            logits = self.model(self.last[:n, None], position_ids=self.next_pos[:n, None],
                                attention_mask=self.mask[:n, : pos + 1],
                                cache=_rows_view(self.cache, n), cache_pos=pos,
                                logits_to_keep=1)[:, -1]  # (n, V)
            self.pos = pos + 1
            self.next_pos[:n] += 1
            self._accept(logits, range(n))

    def _accept(self, logits: torch.Tensor, slots: range) -> None:
        """Sample each slot's next token from its logits row; record it; finish rows."""
        logits = logits.float()  # (n, V)
        # log p(token) = logit - logsumexp(row): one read of the row instead of a (n, V) log-softmax.
        lse = torch.logsumexp(logits, dim=-1)  # (n,)
        tops = {}
        for i, slot in enumerate(slots):
            if k := self.rows[slot].options.top_logprobs:
                top = logits[i].topk(min(k, logits.shape[-1]))
                tops[i] = list(zip(top.indices.tolist(), (top.values - lse[i]).tolist()))
        # A sampled <|AUDIO|> would need audio features the decode step does not have: never pick it.
        logits[:, self.model.config.audio_token_index] = -math.inf
        # Plain greedy rows (no penalty, no stop-token masking yet) all take one batched argmax.
        plain = [self._plain_greedy(self.rows[slot]) for slot in slots]
        argmax = logits.argmax(-1).tolist() if any(plain) else []
        tokens = []
        for i, slot in enumerate(slots):
            row = self.rows[slot]
            opts = row.options
            if plain[i]:
                tokens.append(argmax[i])
                continue
            if opts.repetition_penalty != 1.0 and row.seen is None:
                row.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                row.seen[torch.tensor(row.prompt_ids, device=logits.device)] = True
            tokens.append(sample(logits[i], opts, row.generator, row.seen, len(row.tokens)))
        index = torch.tensor(tokens, dtype=torch.long, device=logits.device)  # (n,)
        chosen = logits.gather(1, index[:, None])[:, 0] - lse  # (n,); masked ids are never chosen
        # One read of the positions, not int(next_pos[slot]) per row: on a GPU each is a sync.
        next_pos = self.next_pos[slots.start: slots.stop].tolist()
        for i, (slot, lp) in enumerate(zip(slots, chosen.tolist())):
            row = self.rows[slot]
            if i in tops:
                row.top_logprobs.append(tops[i])
            context_left = self.max_positions - next_pos[i] - 1
            row.accept(tokens[i], lp, context_left)
        self.last[slots.start: slots.stop] = index

    @staticmethod
    def _plain_greedy(row: Row) -> bool:
        """Whether `sample` would return the plain argmax of the row's logits."""
        o = row.options
        return (o.greedy and o.repetition_penalty == 1.0
                and not (len(row.tokens) < o.min_new_tokens and o.stop_token_ids))

    @torch.inference_mode()
    def pop_finished(self) -> list[Row]:
        """Remove finished rows: the last live row moves into each freed slot."""
        done = []
        slot = 0
        while slot < self.n:
            if self.rows[slot].finish_reason is None:
                slot += 1
                continue
            done.append(self.rows[slot])
            last = self.n - 1
            if slot != last:
                for t in (self.cache.k, self.cache.v):
                    t[:, slot] = t[:, last]
                for t in (self.mask, self.next_pos, self.last):
                    t[slot] = t[last]
                self.rows[slot] = self.rows[last]
            self.rows.pop()
        if done and self.n:
            first = int(self.mask[: self.n, : self.pos].any(0).int().argmax())
            if first > 0:
                self._shift(-first)
        elif not self.n:
            self.pos = 0
            self.mask.zero_()
        return done

    def _shift(self, d: int) -> None:
        """Move the live rows' columns [0, pos) by d (right if d > 0, left if d < 0)."""
        n, pos = self.n, self.pos
        src = slice(0, pos) if d > 0 else slice(-d, pos)
        dst = slice(d, pos + d) if d > 0 else slice(0, pos + d)
        for t in (self.cache.k, self.cache.v):
            # A layer at a time: one clone of every layer's live rows would briefly double the
            # live cache, an out-of-memory error on a GPU sized for its cache (`lalm serve`).
            for layer in t:
                layer[:n, :, dst] = layer[:n, :, src].clone()
        self.mask[:n, dst] = self.mask[:n, src].clone()
        if d > 0:
            self.mask[:n, :d] = False
        else:
            self.mask[:n, pos + d: pos] = False
        self.pos = pos + d


def check_context(model, batch) -> None:
    """A prompt must have a token to continue from and leave room for one new token in the context."""
    limit = model.config.text.max_position_embeddings
    lengths = batch.attention_mask.long().sum(-1)
    if int(lengths.min()) == 0:  # its "last token" would be padding: garbage in a batch, a crash alone
        raise ChatFormatError(f"prompt {int(lengths.argmin())} is empty: there is no token to continue from")
    if int(lengths.max()) >= limit:
        i = int(lengths.argmax())
        raise ContextLengthError(f"prompt {i} has {int(lengths[i])} tokens; the model's context is "
                                 f"{limit} (max_position_embeddings), leaving no room to generate")


def generate(model, batch, rows: list[Row]) -> Iterator[list[Row]]:
    """Decode `batch` (row i = rows[i]) to the end; yields the live rows after every token
    (the prefill's token included) so callers can stream. Finished rows leave the batch."""
    state = DecodeState.start(model, batch, rows)
    while True:
        yield rows
        state.pop_finished()
        if not state.n:
            return
        state.step()
