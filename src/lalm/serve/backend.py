"""The engine's `Backend` on a real model: rows live in one `lalm.generate.DecodeState`.

No decode loop here: `DecodeState.start/add` prefill new rows (audio encoded once) and slot
them into the running batch, `step` decodes one token for every live row, `pop_finished`
frees slots; `Row` samples, stops and builds the text. This file only maps the engine's
request keys and OpenAI options onto those pieces (sampling defaults come from the
checkpoint's generation_config.json through `LALM.options`, as for `lalm chat`).
"""

from __future__ import annotations

from pathlib import Path

from lalm import generate as gen
from lalm.errors import ConfigError
from lalm.processor import collate
from lalm.serve.engine import Options, Prepared, Update

DEFAULT_MAX_MODEL_LEN = 4096  # KV-cache columns per row unless --max-model-len says otherwise


class LALMBackend:
    def __init__(self, lalm, max_batch: int = 32, max_model_len: int | None = None,
                 name: str | None = None):
        self.lalm = lalm
        self.max_batch = max_batch
        limit = lalm.config.text.max_position_embeddings
        self.max_context = min(limit, max_model_len or DEFAULT_MAX_MODEL_LEN)
        self.max_batch = self._rows_that_fit(max_batch)
        self.stop_token_ids = frozenset(lalm.defaults.eos_token_ids)
        path = getattr(lalm, "path", None)
        self.model_name = name or (Path(path).name if path else "lalm")
        self.state: gen.DecodeState | None = None

    def _rows_that_fit(self, wanted: int) -> int:
        """On a GPU, as many of `wanted` rows of `max_context` tokens as its free memory holds.

        The cache is allocated whole at the first request: for the 7B (32 layers x 32 KV heads x
        128, bf16: 512 KiB a token) the defaults' 32 x 4096 tokens are 64 GiB, on top of ~16 GiB
        of weights. Sized here, an 80 GB card serves fewer rows instead of failing every request.
        """
        device = self.lalm.device
        if device.type != "cuda":
            return wanted
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        rows = cache_rows(self.lalm.config.text, self.lalm.model.language_model.lm_head.weight.dtype,
                          self.max_context, free, wanted)
        if rows < wanted:
            print(f"lalm serve: {rows} rows of {self.max_context} tokens fit in the "
                  f"{free / 2**30:.1f} GiB free on {device} (asked for {wanted}; "
                  "--max-batch / --max-model-len size the KV cache)", flush=True)
        return rows

    @classmethod
    def load(cls, path, dtype=None, device=None, max_batch: int = 32,
             max_model_len: int | None = None, name: str | None = None) -> LALMBackend:
        import lalm

        return cls(lalm.load(path, dtype=dtype, device=device), max_batch, max_model_len, name)

    # ---- per request (worker threads) ----
    def prepare(self, conversation: list[dict] | dict) -> Prepared:
        """Messages, or a base model's raw prompt {"prompt": str with <|AUDIO|>, "audios": [...]}."""
        example = self.lalm.prepare(conversation)
        return Prepared(prompt=example, prompt_tokens=len(example))

    def token_text(self, token: int) -> str:
        return self.token_bytes(token).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        tok = self.lalm.tokenizer
        # The released 7B has 156,032 embedding rows for 151,649 tokenizer ids: an id in that gap
        # (among top_logprobs, say) stands for no text, as decode() drops it; not an error.
        if not 0 <= int(token) < tok.vocab_size:
            return b""
        return tok.token_bytes(int(token))

    # ---- engine thread ----
    def can_add(self, rows: list[tuple[Prepared, Options]]) -> bool:
        if self.state is None:
            return len(rows) <= self.max_batch
        longest = max(p.prompt_tokens for p, _ in rows)
        budget = max(o.max_new_tokens for _, o in rows)
        return self.state.fits(longest, budget, len(rows))

    def _row(self, key: int, prepared: Prepared, o: Options) -> gen.Row:
        options = self.lalm.options(
            max_new_tokens=o.max_new_tokens, temperature=o.temperature, top_p=o.top_p,
            seed=o.seed, stop=list(o.stop) or None, top_logprobs=o.top_logprobs or 0,
            top_k=o.top_k, repetition_penalty=o.repetition_penalty, min_new_tokens=o.min_tokens or None,
            num_beams=1)  # one sequence per request: a checkpoint's num_beams is for offline decoding
        return gen.Row(options=options, key=key, audio_tokens=prepared.prompt.audio_tokens,
                       stream=gen.TextStream(self.lalm.tokenizer))

    def add(self, rows: list[tuple[int, Prepared, Options]]) -> dict[int, Update]:
        batch = collate([p.prompt for _, p, _ in rows], self.lalm.tokenizer.pad_id)
        new = [self._row(key, p, o) for key, p, o in rows]
        if self.state is None:
            # One cache for the server's life, sized for max_batch rows of max_context tokens;
            # every later row is slotted into it (allocating per request costs more than a
            # tiny model's whole prefill).
            self.state = gen.DecodeState.start(self.lalm.model, batch, new,
                                               max_rows=self.max_batch, max_len=self.max_context)
        else:
            self.state.add(batch, new)
        return self._updates(new)

    def step(self) -> dict[int, Update]:
        self.state.step()
        return self._updates(self.state.rows)

    def remove(self, keys: list[int]) -> None:
        if self.state is None:
            return
        gone = set(keys)
        for row in self.state.rows:
            if row.key in gone and row.finish_reason is None:
                row.finish("abort")
        self.state.pop_finished()

    def _updates(self, rows: list[gen.Row]) -> dict[int, Update]:
        return {
            row.key: Update(
                token=row.tokens[-1], logprob=row.logprobs[-1], text=row.take_text(),
                finish=row.finish_reason, completion_tokens=len(row.tokens),
                # OpenAI's top_logprobs: the best alternatives at this step, recorded by the
                # row from the same logits it sampled from (empty unless asked for).
                top=row.top_logprobs[-1] if row.top_logprobs else [])
            for row in rows
        }


def cache_rows(text_config, dtype, max_context: int, free_bytes: int, wanted: int,
               use: float = 0.9) -> int:
    """Rows of `max_context` tokens whose keys and values fit in `use` x `free_bytes` (the rest is
    for activations), at most `wanted`; a ConfigError when not even one does."""
    import torch

    per_token = (2 * text_config.num_hidden_layers * text_config.num_key_value_heads
                 * text_config.head_dim * torch.empty((), dtype=dtype).element_size())
    rows = min(wanted, int(use * free_bytes) // (per_token * max_context))
    if rows < 1:
        raise ConfigError(f"one row of {max_context} tokens needs {per_token * max_context / 2**30:.1f} GiB "
                          f"of KV cache; {free_bytes / 2**30:.1f} GiB are free: lower --max-model-len")
    return rows
