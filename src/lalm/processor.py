"""Conversation -> Example (ids, loss mask, mel windows) -> Batch (left padded): the model's only input.

`prepare` loads every audio of a conversation, splits it into <= 30 s windows, computes each
window's log-mel, and renders the conversation with one `<|audio_bos|> ... <|audio_eos|>` span
per audio holding the sum of its windows' token counts, in window order. The model encodes the
windows in the same order and scatters their vectors into the `<|AUDIO|>` positions, so a long
audio is one span of ~25 tokens/s instead of being cut at 30 s.

`collate` left-pads (generation appends on the right), builds position ids that start at 0 on
each conversation's first real token, and pre-shifts labels so `labels[:, t]` is the target of
the logits at t.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

from lalm import audio as A
from lalm import chat
from lalm.errors import AudioError, ChatFormatError, ContextLengthError
from lalm.tokenizer import Tokenizer

IGNORE_INDEX = -100


@dataclass
class Example:
    ids: torch.Tensor  # (T,) long
    loss_mask: torch.Tensor  # (T,) bool, True where ids[t] is a training target
    mels: list[torch.Tensor]  # one (n_mels, F_w) float32 per audio window, in order
    frames: list[int]  # valid mel frames L_mel per window
    audio_tokens: int  # number of <|AUDIO|> tokens in ids (sum over windows)
    # Instead of mels: the frozen encoder's output rows of every audio in order, (audio_tokens, d_audio),
    # after its final LayerNorm and before the projector (what train/encoder_cache.py stores).
    audio_rows: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long, left padded with <|endoftext|>
    attention_mask: torch.Tensor  # (B, T) bool, True on real tokens
    position_ids: torch.Tensor  # (B, T) long, cumsum(mask) - 1 on real tokens, 0 on pads
    mel: torch.Tensor | None = None  # (A, n_mels, F) float32, all windows in order, right padded
    mel_frames: torch.Tensor | None = None  # (A,) long, valid frames of each window
    labels: torch.Tensor | None = None  # (B, T) long, target of position t (= token t+1) or -100
    audio_rows: torch.Tensor | None = None  # (sum N, d_audio) cached encoder rows, in order; instead of mel

    def to(self, device: torch.device | str) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


def audio_windows(src: Any, n_mels: int, name: str = "audio") -> tuple[list[torch.Tensor], list[int], int]:
    """One audio source -> (mel per window, L_mel per window, total audio tokens)."""
    mels, frames = [], []
    for window in A.split_windows(A.load_audio(src)):
        mel, n = A.log_mel(window, n_mels)
        mels.append(mel)
        frames.append(n)
    n_tokens = sum(A.num_audio_tokens(f) for f in frames)
    if n_tokens == 0:
        raise AudioError(f"{name} is too short: {frames[0]} mel frames give no audio token "
                         f"(needs more than {2 * A.HOP_LENGTH} samples = 0.02 s at 16 kHz)")
    return mels, frames, n_tokens


def _example(rendered: chat.Rendered, mels, frames, n_tokens: int, max_length: int | None,
             audio_rows: torch.Tensor | None = None) -> Example:
    if max_length is not None and len(rendered.ids) > max_length:
        raise ContextLengthError(f"the prompt is {len(rendered.ids)} tokens ({n_tokens} of them audio) but "
                                 f"the limit is {max_length}")
    return Example(ids=torch.tensor(rendered.ids, dtype=torch.long),
                   loss_mask=torch.tensor(rendered.loss_mask, dtype=torch.bool),
                   mels=mels, frames=frames, audio_tokens=n_tokens, audio_rows=audio_rows)


def _rows(sources: Sequence[Any], audio_rows: Sequence[torch.Tensor]):
    """Precomputed encoder rows stand in for the audio sources (which are then never loaded)."""
    if len(audio_rows) != len(sources):
        raise ChatFormatError(f"{len(sources)} audios but {len(audio_rows)} entries in audio_rows")
    per_audio = [int(r.shape[0]) for r in audio_rows]
    return [], [], per_audio, torch.cat(list(audio_rows)) if audio_rows else None


def _load_all(sources: Sequence[Any], n_mels: int):
    mels, frames, per_audio = [], [], []
    for k, src in enumerate(sources):
        m, f, n = audio_windows(src, n_mels, name=f"audio {k + 1}")
        mels += m
        frames += f
        per_audio.append(n)
    return mels, frames, per_audio


def prepare(messages: Any, tokenizer: Tokenizer, n_mels: int, add_generation_prompt: bool = True,
            train_on: Literal["all", "last"] = "all", max_length: int | None = None,
            audio_rows: Sequence[torch.Tensor] | None = None) -> Example:
    """A conversation (Instruct template) -> Example. Raises ChatFormatError / AudioError / ContextLengthError.

    audio_rows: one (N_i, d_audio) tensor of cached encoder rows per audio, in order, used instead
    of loading the audio (the Example then carries `audio_rows` and no mels).
    """
    msgs = chat.validate(messages)
    if audio_rows is None:
        mels, frames, per_audio = _load_all(chat.audios(msgs), n_mels)
        rows = None
    else:
        mels, frames, per_audio, rows = _rows(chat.audios(msgs), audio_rows)
    rendered = chat.render(msgs, tokenizer, per_audio, add_generation_prompt=add_generation_prompt,
                           train_on=train_on)
    return _example(rendered, mels, frames, sum(per_audio), max_length, rows)


def prepare_raw(prompt: str, audios: Sequence[Any], tokenizer: Tokenizer, n_mels: int, target: str | None = None,
                max_length: int | None = None, audio_rows: Sequence[torch.Tensor] | None = None) -> Example:
    """A base-model raw prompt with `<|AUDIO|>` placeholders (+ optional target) -> Example (audio_rows: as prepare)."""
    n_placeholders = prompt.count(chat.AUDIO) if isinstance(prompt, str) else -1
    if n_placeholders != len(audios):
        # fail before decoding any audio
        chat.render_raw(prompt, tokenizer, [0] * len(audios), target)
    if audio_rows is None:
        mels, frames, per_audio = _load_all(audios, n_mels)
        rows = None
    else:
        mels, frames, per_audio, rows = _rows(audios, audio_rows)
    rendered = chat.render_raw(prompt, tokenizer, per_audio, target=target)
    return _example(rendered, mels, frames, sum(per_audio), max_length, rows)


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Left-pad examples into a Batch; labels are None when no example has a target."""
    if not examples:
        raise ValueError("collate needs at least one example")
    B, T = len(examples), max(len(e) for e in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.bool)
    targets = torch.zeros((B, T), dtype=torch.bool)
    for b, e in enumerate(examples):
        n = len(e)
        input_ids[b, T - n :] = e.ids
        attention_mask[b, T - n :] = True
        targets[b, T - n :] = e.loss_mask
    position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    labels = None
    if bool(targets.any()):
        # labels[t] = ids[t+1] where token t+1 is a target: the logits at t predict it
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        labels[:, :-1] = torch.where(targets[:, 1:], input_ids[:, 1:], IGNORE_INDEX)
    mels = [m for e in examples for m in e.mels]
    mel = mel_frames = None
    if mels:
        n_mels, F = mels[0].shape[0], max(m.shape[1] for m in mels)
        mel = torch.zeros((len(mels), n_mels, F), dtype=torch.float32)
        for a, m in enumerate(mels):
            mel[a, :, : m.shape[1]] = m
        mel_frames = torch.tensor([f for e in examples for f in e.frames], dtype=torch.long)
    rows = [e.audio_rows for e in examples if e.audio_rows is not None]
    if rows and mels:  # one audio source per batch: the model scatters them in order of appearance
        raise ValueError("collate: examples mix mel windows and cached audio_rows")
    audio_rows = torch.cat(rows) if rows else None
    return Batch(input_ids, attention_mask, position_ids, mel, mel_frames, labels, audio_rows)
