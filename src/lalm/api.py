"""The public API: `lalm.load(path)` -> `LALM` with `.logits`, `.generate` and `.stream`.

    import lalm
    m = lalm.load("path/to/Qwen2-Audio-7B-Instruct")          # or a hub name in the local HF cache
    conv = [{"role": "user", "content": [{"type": "audio", "audio": "clip.wav"},
                                         {"type": "text", "text": "What is that sound?"}]}]
    print(m.generate(conv, max_new_tokens=64)[0].text)
    for piece in m.stream(conv):
        print(piece, end="", flush=True)

A conversation is a list of messages (chat.py), or, for the base model's plain prompts, a
string with `<|AUDIO|>` placeholders or `{"prompt": str, "audios": [src, ...]}` (chat.render_raw).
`logits` and `generate` take one conversation or a list of them and always return a list.
Sampling defaults come from the checkpoint's generation_config.json (as transformers reads
it); temperature 0 is greedy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lalm import beam
from lalm import generate as gen
from lalm.config import ModelConfig
from lalm.errors import ChatFormatError, ConfigError
from lalm.hub import resolve_model_path
from lalm.tokenizer import Tokenizer

GENERATION_CONFIG = "generation_config.json"
DEFAULT_MAX_NEW_TOKENS = 256  # the official eval scripts' budget; the generation config sets none
DEFAULT_BATCH_SIZE = 8

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class GenerationResult:
    text: str  # decoded, special tokens skipped, cut before a stop string
    token_ids: list[int]  # generated ids, the final stop token (eos) included
    logprobs: list[float]  # the model's log-probability of each generated id (before sampling filters)
    prompt_tokens: int  # prompt length, audio tokens included
    audio_tokens: int  # <|AUDIO|> tokens in the prompt
    finish_reason: str  # "stop" (eos or stop string) or "length"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GenerationDefaults:
    """What generation_config.json says (transformers' keys); absent keys keep these values."""

    eos_token_ids: tuple[int, ...] = ()
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50  # transformers' default when a file sets do_sample without top_k
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    @classmethod
    def load(cls, folder: Path, tokenizer: Tokenizer, config: ModelConfig) -> GenerationDefaults:
        file = folder / GENERATION_CONFIG
        d: dict = {}
        if file.exists():
            try:
                d = json.loads(file.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{file}: not valid JSON ({e})") from None
            if not isinstance(d, dict):
                raise ConfigError(f"{file}: expected a JSON object")
        # null means unset, as in transformers: 4.x wrote `"temperature": null` (and top_p ...)
        # for a field set to None to silence its do_sample warnings. top_k keeps its own rule
        # below (null = no top-k filter, as 4.x read it).
        d = {k: v for k, v in d.items() if v is not None or k == "top_k"}
        eos = d.get("eos_token_id", config.text.extra.get("eos_token_id"))
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        # <|im_end|> ends an Instruct turn and <|endoftext|> a base-model completion: stop at both
        # even when the file (or its absence) names only one.
        eos_ids = tuple(dict.fromkeys([*eos, tokenizer.im_end_id, tokenizer.endoftext_id]))
        try:
            return cls(
                eos_token_ids=eos_ids,
                do_sample=bool(d.get("do_sample", cls.do_sample)),
                temperature=float(d.get("temperature", cls.temperature)),
                top_p=float(d.get("top_p", cls.top_p)),
                top_k=int(d.get("top_k", cls.top_k) or 0),
                repetition_penalty=float(d.get("repetition_penalty", cls.repetition_penalty)),
                num_beams=int(d.get("num_beams") or cls.num_beams),
                length_penalty=float(d.get("length_penalty", cls.length_penalty)),
                max_new_tokens=int(d.get("max_new_tokens") or cls.max_new_tokens),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{file}: bad value ({e})") from None

    def options(self, **overrides) -> gen.SamplingOptions:
        """SamplingOptions from these defaults; None-valued overrides are ignored."""
        # Plain values, validated once merged: a file with do_sample and num_beams > 1 (beam
        # sampling in transformers) must still give a sampling or an overridden call its options.
        base = gen.SamplingOptions().__dict__ | {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature if self.do_sample else 0.0,
            "top_p": self.top_p if self.do_sample else 1.0,
            "top_k": self.top_k if self.do_sample else 0,
            "repetition_penalty": self.repetition_penalty,
            "num_beams": self.num_beams,
            "length_penalty": self.length_penalty,
            "stop_token_ids": self.eos_token_ids,
        }
        given = {k: v for k, v in overrides.items() if v is not None}
        if isinstance(given.get("stop"), str):
            given["stop"] = (given["stop"],)
        if "stop" in given:
            given["stop"] = tuple(given["stop"])
        if isinstance(given.get("stop_token_ids"), int):  # one id, as transformers takes eos_token_id
            given["stop_token_ids"] = (given["stop_token_ids"],)
        if "stop_token_ids" in given:
            given["stop_token_ids"] = tuple(given["stop_token_ids"])
        # The checkpoint's num_beams is a default for deterministic decoding: a call that samples,
        # or asks for stop strings or top log-probs, without naming num_beams decodes one sequence.
        # (An explicit num_beams > 1 with those is refused by SamplingOptions.)
        merged = {**base, **given}
        if "num_beams" not in given and (merged["temperature"] > 0 or merged["stop"] or merged["top_logprobs"]):
            merged["num_beams"] = 1
        return gen.SamplingOptions(**merged)


def _is_conversation(x: Any) -> bool:
    """One conversation (a list of message dicts, a raw prompt string or dict) vs a list of them."""
    # Any dict is one item: a bare message dict must reach chat.validate's "must be a list" error,
    # not be iterated into its keys ("role", "content"), each then run as a raw prompt.
    if isinstance(x, (str, dict)):
        return True
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(
        isinstance(m, dict) and "role" in m or type(m).__name__ == "Message" for m in x)


def _as_list(conversations: Any) -> list:
    return [conversations] if _is_conversation(conversations) else list(conversations)


def _dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")


@dataclass
class LALM:
    """A loaded model with its tokenizer and generation defaults."""

    model: Any  # lalm.model.Qwen2AudioForConditionalGeneration
    tokenizer: Tokenizer
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    path: Path | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.language_model.lm_head.weight.device

    # ------------------------------------------------------------------ inputs

    def prepare(self, conversation: Any, add_generation_prompt: bool = True):
        """One conversation (messages, or a raw prompt) -> processor.Example."""
        from lalm import processor

        n_mels = self.config.audio.num_mel_bins
        # Generation needs room for one new token; scoring a prompt may fill the whole context.
        limit = self.config.text.max_position_embeddings - (1 if add_generation_prompt else 0)
        if isinstance(conversation, str):
            conversation = {"prompt": conversation, "audios": []}
        if isinstance(conversation, dict) and "prompt" in conversation:
            example = processor.prepare_raw(conversation["prompt"], conversation.get("audios") or [],
                                            self.tokenizer, n_mels, max_length=limit)
            if not len(example):  # (chat markup is never empty) refused here, so one bad input fails alone
                raise ChatFormatError("the raw prompt is empty: there is no token to continue from")
            return example
        return processor.prepare(conversation, self.tokenizer, n_mels, add_generation_prompt=add_generation_prompt,
                                 max_length=limit)

    def _batches(self, examples: list, batch_size: int) -> Iterator[tuple[list[int], Any]]:
        """Collated batches of similar lengths (less padding); yields (indices, Batch)."""
        from lalm import processor

        order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            yield idx, processor.collate([examples[i] for i in idx], self.tokenizer.pad_id)

    # ------------------------------------------------------------------ logits

    @torch.inference_mode()
    def logits(self, conversations: Any, add_generation_prompt: bool = True,
               batch_size: int = DEFAULT_BATCH_SIZE) -> list[torch.Tensor]:
        """Per conversation, float32 logits (T_i, vocab) at every prompt position."""
        examples = [self.prepare(c, add_generation_prompt) for c in _as_list(conversations)]
        out: list[torch.Tensor | None] = [None] * len(examples)
        for idx, batch in self._batches(examples, batch_size):
            gen.check_context(self.model, batch)
            inputs = gen._to(batch, self.device)
            logits = self.model(**inputs)  # (B, T, V), left padded
            for row, i in enumerate(idx):
                out[i] = logits[row, -len(examples[i].ids):].float().cpu()
        return out

    # ------------------------------------------------------------------ generation

    def options(self, **kw) -> gen.SamplingOptions:
        """SamplingOptions: the checkpoint's defaults with `kw` (None = default) on top."""
        return self.defaults.options(**kw)

    def _rows(self, examples: list, options: gen.SamplingOptions, keys: list) -> list[gen.Row]:
        return [gen.Row(options=options, key=k, audio_tokens=examples[k].audio_tokens,
                        stream=gen.TextStream(self.tokenizer)) for k in keys]

    @staticmethod
    def _result(row: gen.Row) -> GenerationResult:
        return GenerationResult(text=row.text, token_ids=list(row.tokens), logprobs=list(row.logprobs),
                                prompt_tokens=len(row.prompt_ids), audio_tokens=row.audio_tokens,
                                finish_reason=row.finish_reason)

    def _beam_result(self, found: beam.Beam, audio_tokens: int) -> GenerationResult:
        return GenerationResult(text=beam.text_of(found, self.tokenizer), token_ids=found.tokens,
                                logprobs=found.logprobs, prompt_tokens=len(found.prompt_ids),
                                audio_tokens=audio_tokens, finish_reason=found.finish_reason)

    def generate(self, conversations: Any, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, repetition_penalty: float | None = None,
                 seed: int | None = None, stop: str | list[str] | None = None, min_new_tokens: int | None = None,
                 stop_token_ids: list[int] | None = None, num_beams: int | None = None,
                 length_penalty: float | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> list[GenerationResult]:
        """One GenerationResult per conversation, in order. Conversations are batched (left padded)
        `batch_size` at a time; a greedy row's output does not depend on its batch. num_beams > 1:
        beam search (lalm.beam: transformers' search and defaults), greedy only."""
        opts = self.options(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=repetition_penalty, seed=seed, stop=stop,
                            min_new_tokens=min_new_tokens, stop_token_ids=stop_token_ids,
                            num_beams=num_beams, length_penalty=length_penalty)
        return self.generate_examples([self.prepare(c) for c in _as_list(conversations)], opts, batch_size)

    def generate_examples(self, examples: list, options: gen.SamplingOptions,
                          batch_size: int = DEFAULT_BATCH_SIZE) -> list[GenerationResult]:
        """`generate` for already prepared `processor.Example`s (e.g. `lalm generate` prepares each
        input line on its own so that one bad line does not sink its batch)."""
        results: list[GenerationResult | None] = [None] * len(examples)
        for idx, batch in self._batches(examples, batch_size):
            if options.num_beams > 1:
                for i, found in zip(idx, beam.search(self.model, batch, options), strict=True):
                    results[i] = self._beam_result(found, examples[i].audio_tokens)
                continue
            rows = self._rows(examples, options, idx)
            for _ in gen.generate(self.model, batch, rows):
                pass
            for row in rows:
                results[row.key] = self._result(row)
        return results

    def stream(self, conversation: Any, **kw) -> Iterator[str]:
        """Text pieces of one conversation's answer as they decode (whole characters only).
        Takes `generate`'s options; the generator's return value is the GenerationResult."""
        opts = self.options(**kw)
        examples = [self.prepare(conversation)]
        ((_, batch),) = self._batches(examples, 1)
        if opts.num_beams > 1:  # the best beam is known only at the end: one piece
            result = self._beam_result(beam.search(self.model, batch, opts)[0], examples[0].audio_tokens)
            if result.text:
                yield result.text
            return result
        (row,) = rows = self._rows(examples, opts, [0])
        for _ in gen.generate(self.model, batch, rows):
            piece = row.take_text()
            if piece:
                yield piece
        piece = row.take_text()
        if piece:
            yield piece
        return self._result(row)


def load(path: str | Path, dtype: Any = None, device: Any = None) -> LALM:
    """Load a checkpoint folder (or a hub name found in the local HF cache) for inference.

    dtype: None keeps the stored dtype (bf16 for the released checkpoints); "float32"/"bf16"/...
    device: default CPU.
    """
    from lalm.weights import load_checkpoint

    folder = resolve_model_path(path)
    dtype = _dtype(dtype)
    tokenizer = Tokenizer.load(folder)
    # The small files first: a bad generation_config.json fails in a moment, not after the
    # minutes a 7B model's weights take to read.
    defaults = GenerationDefaults.load(folder, tokenizer, ModelConfig.load(folder))
    model = load_checkpoint(folder, dtype=dtype, device=device)
    return LALM(model=model, tokenizer=tokenizer, defaults=defaults, path=folder)
