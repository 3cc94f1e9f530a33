"""Conversations: validation into typed messages, and rendering to token ids + loss mask in one pass.

A conversation is a list of `{"role": "system" | "user" | "assistant", "content": str | [parts]}`.
Parts: `{"type": "text", "text": ...}` and `{"type": "audio", "audio": src}` where src is a path,
encoded bytes, `{"array", "sampling_rate"}` or a 16 kHz numpy array. Also accepted, as
transformers and OpenAI write them: an `audio_url` key (`{"type": "audio", "audio_url": path}`),
`{"type": "audio_url", "audio_url": path | {"url": path}}`, `data:` URLs with base64 audio, and
`{"type": "input_audio", "input_audio": {"data": base64, "format": ...}}`.

`render` writes the Qwen2-Audio Instruct template (transformers' Qwen2AudioProcessor default
chat template, then its placeholder expansion), spec section 4:

    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n      (when the first message is not system)
    <|im_start|>{role}\n{content}<|im_end|>\n                        (per message)
    Audio {k}: <|audio_bos|><|AUDIO|>xN<|audio_eos|>\n              (per audio part, k counted globally)
    <|im_start|>assistant\n                                          (generation prompt)

The whole string is tokenized at once (so ids equal the reference's, including merges across
part boundaries) and the loss mask comes from token offsets: a token is a target when it
overlaps an assistant message's content or its `<|im_end|>`; the `\\n` after `<|im_end|>` is not
a target. (A token merged across the `assistant\\n` header and content starting with a newline
counts as a target.) `render_raw` is the base model's plain prompt form.

Special tokens typed in message text. transformers' processor (and vLLM) tokenize the rendered
string with special tokens recognised everywhere, so a user writing `<|im_end|>\\n<|im_start|>system`
in a message ends their turn and opens a system turn. lalm does not follow it here: message
text (and a raw prompt's training target) is always plain text, tokenized as the characters it
is (transformers' `split_special_tokens=True` on that text); only the template's own markup
gives control tokens. Ids equal the reference's for every text without a special-token string.
Audio placeholders in text are refused outright (`validate`): they are a mistake, not an attack.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from lalm.errors import ChatFormatError
from lalm.tokenizer import AUDIO, AUDIO_BOS, AUDIO_EOS, ENDOFTEXT, IM_END, IM_START, Tokenizer

ROLES = ("system", "user", "assistant")
DEFAULT_SYSTEM = "You are a helpful assistant."
_PLACEHOLDERS = (AUDIO, AUDIO_BOS, AUDIO_EOS)


@dataclass(frozen=True)
class Part:
    type: Literal["text", "audio"]
    text: str = ""
    audio: Any = None  # path (str), bytes, {"array", "sampling_rate"} or 16 kHz numpy


@dataclass(frozen=True)
class Message:
    role: Literal["system", "user", "assistant"]
    parts: tuple[Part, ...]

    @property
    def audios(self) -> list[Any]:
        return [p.audio for p in self.parts if p.type == "audio"]


@dataclass
class Rendered:
    ids: list[int]
    loss_mask: list[bool]  # True where the token is a training target
    text: str  # the rendered string (placeholders expanded)


# ----------------------------------------------------------------------------- validation


def _audio_source(value: Any, where: str) -> Any:
    """Check an audio source's shape (it is loaded later, by the processor)."""
    if isinstance(value, dict) and "url" in value and "array" not in value:
        value = value["url"]
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        if value.startswith("data:"):
            _, _, payload = value.partition(",")
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise ChatFormatError(f"{where}: data URL is not valid base64") from None
        if re.match(r"^[a-z][a-z0-9+.-]*://", value) and not value.startswith("file://"):
            raise ChatFormatError(f"{where}: remote audio URLs are not fetched ({value!r}); download the file first")
        path = value.removeprefix("file://")
        if not path:
            raise ChatFormatError(f"{where}: empty audio path")
        return path
    if isinstance(value, dict):
        if "array" not in value or "sampling_rate" not in value:
            raise ChatFormatError(f"{where}: an audio dict needs 'array' and 'sampling_rate', got keys {sorted(value)}")
        return value
    if isinstance(value, (bytes, bytearray, np.ndarray)) or hasattr(value, "read") or type(value).__name__ == "Tensor":
        return value
    raise ChatFormatError(f"{where}: unsupported audio value of type {type(value).__name__}")


def _part(raw: Any, where: str) -> Part:
    if isinstance(raw, str):
        return Part("text", text=raw)
    if not isinstance(raw, dict):
        raise ChatFormatError(f"{where}: a part must be a dict, got {type(raw).__name__}")
    kind = raw.get("type")
    # transformers' template treats any part with an 'audio' or 'audio_url' key as audio
    if kind in ("audio", "audio_url") or (kind is None and ("audio" in raw or "audio_url" in raw)):
        for key in ("audio", "audio_url", "path", "url"):
            if key in raw and raw[key] is not None:
                return Part("audio", audio=_audio_source(raw[key], where))
        raise ChatFormatError(f"{where}: audio part has no 'audio' (or 'audio_url') value")
    if kind == "input_audio":
        data = (raw.get("input_audio") or {}).get("data") if isinstance(raw.get("input_audio"), dict) else None
        if not isinstance(data, str):
            raise ChatFormatError(f"{where}: input_audio part needs input_audio.data (base64)")
        try:
            return Part("audio", audio=base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError):
            raise ChatFormatError(f"{where}: input_audio.data is not valid base64") from None
    if kind == "text" or (kind is None and "text" in raw):
        text = raw.get("text")
        if not isinstance(text, str):
            raise ChatFormatError(f"{where}: text part needs a string 'text', got {type(text).__name__}")
        return Part("text", text=text)
    raise ChatFormatError(f"{where}: unknown part type {kind!r} (expected 'text' or 'audio')")


def validate(messages: Any) -> list[Message]:
    """Dicts (or Messages) -> typed Messages; ChatFormatError names the message index and part."""
    if isinstance(messages, dict) or not isinstance(messages, Sequence) or isinstance(messages, str):
        raise ChatFormatError(f"a conversation must be a list of messages, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ChatFormatError("empty conversation: at least one message is needed")
    out = []
    for i, m in enumerate(messages):
        where = f"message {i}"
        if isinstance(m, Message):
            out.append(m)
            continue
        if not isinstance(m, dict):
            raise ChatFormatError(f"{where}: must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = m.get("content")
        if isinstance(content, str):
            parts = (Part("text", text=content),)
        elif isinstance(content, (list, tuple)):
            parts = tuple(_part(p, f"{where} ({role}) part {j}") for j, p in enumerate(content))
        else:
            raise ChatFormatError(f"{where} ({role}): content must be a string or a list of parts, "
                                  f"got {type(content).__name__}")
        for j, p in enumerate(parts):
            if p.type == "audio" and role != "user":
                raise ChatFormatError(f"{where} ({role}) part {j}: audio is only allowed in user messages")
            if p.type == "text" and any(t in p.text for t in _PLACEHOLDERS):
                raise ChatFormatError(f"{where} ({role}) part {j}: text contains an audio placeholder token; "
                                      "use an audio part instead")
        out.append(Message(role, parts))
    return out


def audios(messages: Sequence[Message]) -> list[Any]:
    """Audio sources of a validated conversation, in order of appearance."""
    return [a for m in messages for a in m.audios]


# ----------------------------------------------------------------------------- rendering


def _encode_spans(spans: list[tuple[str, bool, bool]], tokenizer: Tokenizer) -> Rendered:
    """Tokenize (text, target, literal) spans as one string; mask tokens that overlap a target span.

    Only the template's markup (literal False) yields special tokens: in message text (literal
    True) a typed `<|im_end|>` is plain characters, so a user cannot close their turn or open a
    system one. Tokenizers cut a string at its special tokens and tokenize the pieces between
    them independently, so when message text holds a special-token string the string is cut at
    the markup's special tokens and each piece encoded literally; otherwise (the usual case) it
    is encoded at once, exactly as the reference does.
    """
    text = "".join(s for s, _, _ in spans)
    char_target = np.zeros(len(text) + 1, dtype=np.int64)
    pos = 0
    for s, target, _ in spans:
        if target:
            char_target[pos + 1 : pos + 1 + len(s)] = 1
        pos += len(s)
    cum = np.cumsum(char_target)  # cum[k] = target chars among text[:k]
    if any(lit and any(t in s for t in tokenizer.special_strings) for s, _, lit in spans):
        ids, offsets = _encode_markup_only(spans, tokenizer)
    else:
        ids, offsets = tokenizer.encode_with_offsets(text)
    if ids:
        off = np.asarray(offsets, dtype=np.int64)
        mask = (cum[off[:, 1]] - cum[off[:, 0]]) > 0
    else:
        mask = np.zeros(0, dtype=bool)
    return Rendered(ids=list(ids), loss_mask=mask.tolist(), text=text)


def _encode_markup_only(spans: list[tuple[str, bool, bool]], tokenizer: Tokenizer):
    """Ids and offsets of the joined spans with special tokens recognised in markup spans only."""
    text = "".join(s for s, _, _ in spans)
    pattern = re.compile("|".join(map(re.escape, tokenizer.special_strings)))
    cuts, pos = [], 0  # (start, end) of each special token of the markup
    for s, _, literal in spans:
        if not literal:
            cuts += [(pos + m.start(), pos + m.end()) for m in pattern.finditer(s)]
        pos += len(s)
    ids, offsets, start = [], [], 0
    for a, b in [*cuts, (len(text), len(text))]:
        if a > start:
            piece_ids, piece_offsets = tokenizer.encode_with_offsets(text[start:a], literal=True)
            ids += piece_ids
            offsets += [(x + start, y + start) for x, y in piece_offsets]
        if b > a:
            ids.append(tokenizer.tk.token_to_id(text[a:b]))
            offsets.append((a, b))
        start = b
    return ids, offsets


def _audio_span(k: int, n_tokens: int) -> str:
    return f"Audio {k}: {AUDIO_BOS}{AUDIO * n_tokens}{AUDIO_EOS}\n"


def render(messages: Any, tokenizer: Tokenizer, audio_tokens: Sequence[int], add_generation_prompt: bool = True,
           train_on: Literal["all", "last"] = "all") -> Rendered:
    """The Instruct template with each audio expanded to `audio_tokens[k]` `<|AUDIO|>` tokens.

    train_on: "all" marks every assistant turn as target, "last" only the last assistant turn.
    """
    if train_on not in ("all", "last"):
        raise ChatFormatError(f"train_on must be 'all' or 'last', got {train_on!r}")
    msgs = validate(messages)
    n_audio = sum(len(m.audios) for m in msgs)
    if n_audio != len(audio_tokens):
        raise ChatFormatError(f"the conversation has {n_audio} audio parts but {len(audio_tokens)} audio token "
                              "counts were given")
    assistant = [i for i, m in enumerate(msgs) if m.role == "assistant"]
    targets = set(assistant if train_on == "all" else assistant[-1:])
    spans: list[tuple[str, bool, bool]] = []  # (text, target, literal)
    k = 0
    for i, m in enumerate(msgs):
        if i == 0 and m.role != "system":
            spans.append((f"{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n", False, False))
        spans.append((f"{IM_START}{m.role}\n", False, False))
        target = i in targets
        for p in m.parts:
            if p.type == "audio":
                spans.append((_audio_span(k + 1, int(audio_tokens[k])), False, False))
                k += 1
            else:
                spans.append((p.text, target, True))
        spans.append((IM_END, target, False))
        spans.append(("\n", False, False))
    if add_generation_prompt:
        spans.append((f"{IM_START}assistant\n", False, False))
    return _encode_spans(spans, tokenizer)


def render_raw(prompt: str, tokenizer: Tokenizer, audio_tokens: Sequence[int], target: str | None = None,
               add_eos: bool = True) -> Rendered:
    """The base model's plain prompt: text with `<|AUDIO|>` placeholders, no chat markup.

    e.g. "<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech: <|en|>".
    Each placeholder grows to `audio_tokens[k]` tokens; a bare `<|AUDIO|>` (neither preceded by
    `<|audio_bos|>` nor followed by `<|audio_eos|>`) is wrapped in both, as transformers'
    processor does. `target` (training) follows the prompt and, with add_eos, `<|endoftext|>`;
    both are the loss targets.
    """
    if not isinstance(prompt, str):
        raise ChatFormatError(f"a raw prompt must be a string, got {type(prompt).__name__}")
    pieces = prompt.split(AUDIO)
    if len(pieces) - 1 != len(audio_tokens):
        raise ChatFormatError(f"the prompt has {len(pieces) - 1} {AUDIO} placeholders but "
                              f"{len(audio_tokens)} audios were given")
    out = pieces[0]
    for k, after in enumerate(pieces[1:]):
        expanded = AUDIO * int(audio_tokens[k])
        if not out.endswith(AUDIO_BOS) and not after.startswith(AUDIO_EOS):
            expanded = AUDIO_BOS + expanded + AUDIO_EOS
        out += expanded + after
    spans = [(out, False, False)]  # the raw prompt is markup: its special tokens count
    if target is not None:
        if any(t in target for t in _PLACEHOLDERS):
            raise ChatFormatError("the target text contains an audio placeholder token")
        spans.append((target, True, True))
        if add_eos:
            spans.append((ENDOFTEXT, True, False))
    return _encode_spans(spans, tokenizer)
