"""Manifest -> training examples -> length-grouped global batches, sharded over ranks.

Per stage, one manifest record becomes:
- pretrain: the base model's raw form (spec section 4): the prompt turns' parts joined, each
  audio as `<|audio_bos|><|AUDIO|><|audio_eos|>`, then the last assistant answer and
  `<|endoftext|>` as the target (processor.prepare_raw). No chat markup, as in the paper's Fig. 2.
  A record with `"format": "chat"` is rendered as in SFT instead (the recipe can mix the two, so
  a skill learnt in pre-training is also learnt in the template SFT and inference use).
- sft: the Instruct template, loss on every assistant turn (train_on=all) or the last only.
- dpo: two examples, prompt + chosen and prompt + rejected, loss (log-prob) on the answer only.

Order is a pure function of (seed, epoch): a permutation, then "mega-batches" of 16 global
batches sorted by length so a batch holds similar lengths (less padding), then the batches
shuffled. A global batch of `batch_size` items is cut into `world` equal rank slices. Resuming
at (epoch, batch) therefore replays exactly what an uninterrupted run would have seen. The last
incomplete batch of an epoch is dropped so every step sees exactly `batch_size` items.

Bad records (malformed line, missing or unreadable audio, over-long) are skipped and counted;
the trainer reports the count at the end. The manifest is checked from the audio headers; a
record that still fails when decoded is skipped where it is met (`try_examples`), counted once,
a stand-in with no loss taking its place in the forward (`with_stand_ins`). Augmentation (gain,
speed, noise) draws from a generator seeded by (seed, epoch, index), so it too is replayed
exactly on resume.

With a frozen encoder the audio may come from a `FeatureCache` instead (cfg.feature_cache):
examples then carry the cached encoder rows (`Example.audio_rows`, audio token counts from the
cache) and no mels, and the augmentation is on those rows (`augment_rows`: dropout, time masks,
noise), seeded the same way.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
import torch

from lalm import audio as A
from lalm import chat
from lalm.data.manifest import read_manifest
from lalm.errors import ChatFormatError, ConfigError, LalmError
from lalm.processor import Example, prepare, prepare_raw
from lalm.tokenizer import AUDIO, AUDIO_BOS, AUDIO_EOS, Tokenizer
from lalm.train.encoder_cache import FeatureCache

MEGA_BATCHES = 16  # global batches per length-sorted group


@dataclass
class Skipped:
    """Why records were dropped: (where, message) pairs; the count is what the run reports."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, where: str, message: str) -> None:
        self.items.append((where, message))

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> str:
        if not self.items:
            return "no records skipped"
        return f"skipped {len(self.items)} record(s); first: {self.items[0][1]}"


def _text(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def raw_prompt(messages: list[dict]) -> tuple[str, list, str]:
    """Pre-training form of a conversation: (raw prompt with <|AUDIO|>, audio sources, target)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ChatFormatError("a pre-training record needs an assistant message (the target)")
    prompt, audios = "", []
    for m in messages[:last]:
        if m["role"] == "system" or isinstance(m["content"], str):
            if m["role"] != "system":
                prompt += m["content"]
            continue
        for p in m["content"]:
            if p.get("type") == "audio":
                prompt += AUDIO_BOS + AUDIO + AUDIO_EOS
                audios.append(p["audio"])
            else:
                prompt += p.get("text", "")
    return prompt, audios, _text(messages[last]["content"])


class TrainData:
    """The usable records of a manifest for one stage, and the deterministic batch schedule."""

    def __init__(self, path: str, stage: str, tokenizer: Tokenizer, n_mels: int, *, train_on: str = "all",
                 max_length: int | None = None, augment: dict | None = None, seed: int = 0,
                 features: FeatureCache | None = None, feature_augment: dict | None = None):
        """augment: augment_wave's keywords; features: cached encoder rows used instead of the audio,
        augmented with augment_rows' keywords (feature_augment)."""
        self.path, self.stage, self.tokenizer, self.n_mels = path, stage, tokenizer, n_mels
        self.train_on, self.max_length, self.seed = train_on, max_length, seed
        self.augment = augment or {}
        self.features = features
        self.feature_augment = feature_augment or {}
        self._rendered: dict[int, tuple[list, list[Example]]] = {}  # cached path: (audio sources, examples)
        self.skipped = Skipped()
        self.failed: set[int] = set()  # records that failed in try_examples, counted in skipped
        manifest = read_manifest(path, warn=False)
        for line, message in manifest.problems:
            self.skipped.add(f"{path}:{line}", message)
        self.records, self.lengths = [], []
        self._audio_stand_in: list = []  # [(index, examples) or None] once searched
        for k, rec in enumerate(manifest):
            where = f"{path}: record {rec.get('id', k + 1)}"
            try:
                self.lengths.append(self._estimate_length(rec, where))
            except LalmError as e:
                self.skipped.add(where, str(e))
                continue
            except (RuntimeError, OSError) as e:  # soundfile: unreadable header
                self.skipped.add(where, f"{where}: unreadable audio ({e})")
                continue
            self.records.append(rec)
        if self.skipped:
            warnings.warn(f"{path}: {self.skipped.summary()}", stacklevel=2)

    def __len__(self) -> int:
        return len(self.records)

    # -- per record ------------------------------------------------------------------------------

    def _estimate_length(self, rec: dict, where: str) -> int:
        """Token length from audio headers (no decoding): for grouping and the max_length filter."""
        if self.stage == "dpo" and "chosen" not in rec:
            raise ChatFormatError(f"{where}: a DPO record needs 'chosen' and 'rejected'")
        if self.stage != "dpo" and not any(m["role"] == "assistant" for m in rec["messages"]):
            raise ChatFormatError(f"{where}: no assistant message to train on")
        if rec.get("format", "raw") not in ("raw", "chat"):
            raise ChatFormatError(f"{where}: format {rec['format']!r} is not 'raw' or 'chat'")
        if self.stage != "pretrain" and rec.get("format") == "raw":
            raise ChatFormatError(f"{where}: format 'raw' is for pre-training; {self.stage} renders "
                                  "every line in the chat template")
        msgs = chat.validate(rec["messages"])
        counts = []
        for src in chat.audios(msgs):
            if self.features is not None:
                if src not in self.features:
                    raise LalmError(f"{where}: {src} is not in the feature cache {self.features.folder} "
                                    "(the encoder could not read it)")
                counts.append(self.features.tokens(src))
                continue
            info = sf.info(src)
            counts.append(audio_tokens_estimate(math.ceil(info.frames / info.samplerate * A.SAMPLE_RATE)))
            if counts[-1] == 0:
                raise LalmError(f"{where}: {src} is too short to give one audio token (needs over 0.02 s)")
        # The rendering examples() does, with the audio token counts from the headers: the
        # longest sequence of the record (DPO: prompt + chosen or prompt + rejected) must fit.
        n = max(len(ids) for ids in self._render_ids(rec, counts))
        if self.max_length and n > self.max_length:
            raise LalmError(f"{where}: about {n} tokens, over max_length={self.max_length}")
        return n

    def _render_ids(self, rec: dict, counts: list[int]) -> list[list[int]]:
        msgs, tok = rec["messages"], self.tokenizer
        if self.stage == "pretrain" and rec.get("format", "raw") == "raw":
            prompt, audios, target = raw_prompt(msgs)
            return [chat.render_raw(prompt, tok, counts[:len(audios)], target=target).ids]
        if self.stage != "dpo":
            return [chat.render(msgs, tok, counts, add_generation_prompt=False).ids]
        return [chat.render(msgs + [{"role": "assistant", "content": rec[key]}], tok, counts,
                            add_generation_prompt=False).ids for key in ("chosen", "rejected")]

    def _audio(self, src, index: int, epoch: int, k: int):
        """Load one audio, augmented when configured (never for DPO: the reference saw it clean)."""
        if not self.augment or self.stage == "dpo":
            return src
        wave = A.load_audio(src)
        rng = np.random.default_rng([self.seed, epoch, index, k])
        return augment_wave(wave, rng, **self.augment)

    def _rows(self, src: str, index: int, epoch: int, k: int) -> torch.Tensor:
        """Cached encoder rows (N, d) float32 of one audio, augmented when configured (never for DPO)."""
        x = self.features.get(src).float()
        if not self.feature_augment or self.stage == "dpo":
            return x
        seed = int(np.random.default_rng([self.seed, epoch, index, k]).integers(2**62))
        return augment_rows(x, torch.Generator().manual_seed(seed), **self.feature_augment)

    def try_examples(self, index: int, epoch: int = 0) -> list[Example] | None:
        """examples(), or None for a record that fails only when decoded (audio corrupt past its
        header, a little longer than the header estimate): counted once, however often it is met.
        It is tried again each time (augmentation can change its length), so what a step sees
        stays a function of (seed, epoch, step) and a resumed run replays it."""
        try:
            return self.examples(index, epoch)
        except LalmError as e:
            if index not in self.failed:
                self.failed.add(index)
                self.skipped.add(f"{self.path}: record {self.records[index].get('id', index + 1)}", str(e))
            return None

    def stand_in(self, epoch: int = 0) -> list[Example]:
        """Some record's examples, to run a forward whose result is discarded (see with_stand_ins)."""
        for i in range(len(self.records)):
            found = self.try_examples(i, epoch)
            if found is not None:
                return found
        raise LalmError(f"{self.path}: no record can be read ({self.skipped.summary()})")

    def audio_stand_in(self) -> tuple[int, list[Example]] | None:
        """(index, examples) of the shortest record with audio that loads; None if none has audio.
        Kept: it only ever runs as a stand-in, so its augmentation does not matter."""
        if not self._audio_stand_in:
            with_audio = [i for i, rec in enumerate(self.records) if chat.audios(chat.validate(rec["messages"]))]
            loaded = ((i, self.try_examples(i)) for i in sorted(with_audio, key=lambda i: self.lengths[i]))
            self._audio_stand_in = [next(((i, ex) for i, ex in loaded if ex is not None), None)]
        return self._audio_stand_in[0]

    def examples(self, index: int, epoch: int = 0) -> list[Example]:
        """The example(s) of record `index`: one, or (chosen, rejected) for DPO."""
        rec = self.records[index]
        if self.features is not None:
            return self._cached_examples(rec, index, epoch)
        msgs = [dict(m) for m in rec["messages"]]
        k = 0
        for m in msgs:
            if isinstance(m["content"], list):
                parts = []
                for p in m["content"]:
                    if p.get("type") == "audio":
                        p = {**p, "audio": self._audio(p["audio"], index, epoch, k)}
                        k += 1
                    parts.append(p)
                m["content"] = parts
        if self.stage == "pretrain" and rec.get("format", "raw") == "raw":
            prompt, audios, target = raw_prompt(msgs)
            return [prepare_raw(prompt, audios, self.tokenizer, self.n_mels, target=target,
                                max_length=self.max_length)]
        if self.stage != "dpo":  # sft, or a pre-training line in the chat template
            return [prepare(msgs, self.tokenizer, self.n_mels, add_generation_prompt=False,
                            train_on=self.train_on, max_length=self.max_length)]
        # DPO: only the answer is scored (train_on="last"), so earlier turns never enter log P(y|x).
        return [prepare(msgs + [{"role": "assistant", "content": rec[key]}], self.tokenizer, self.n_mels,
                        add_generation_prompt=False, train_on="last", max_length=self.max_length)
                for key in ("chosen", "rejected")]

    def _cached_examples(self, rec: dict, index: int, epoch: int) -> list[Example]:
        """As `examples`, the audio replaced by its (augmented) cached encoder rows.

        The rendering (ids, loss mask) is a function of the record alone, so it is done once and
        kept; a step then only fetches (and augments) rows, as cheap as a pre-rendered dataset.
        """
        if index in self._rendered:
            sources, rendered = self._rendered[index]
            rows = [self._rows(src, index, epoch, k) for k, src in enumerate(sources)]
            cat = torch.cat(rows) if rows else None
            return [dataclasses.replace(e, audio_rows=cat) for e in rendered]
        msgs = rec["messages"]
        sources = chat.audios(chat.validate(msgs))
        rows = [self._rows(src, index, epoch, k) for k, src in enumerate(sources)]
        out = self._render_cached(msgs, rec, rows)
        self._rendered[index] = (sources, [dataclasses.replace(e, audio_rows=None) for e in out])
        return out

    def _render_cached(self, msgs: list, rec: dict, rows: list[torch.Tensor]) -> list[Example]:
        if self.stage == "pretrain" and rec.get("format", "raw") == "raw":
            prompt, audios, target = raw_prompt(msgs)
            return [prepare_raw(prompt, audios, self.tokenizer, self.n_mels, target=target,
                                max_length=self.max_length, audio_rows=rows)]
        if self.stage != "dpo":  # sft, or a pre-training line in the chat template
            return [prepare(msgs, self.tokenizer, self.n_mels, add_generation_prompt=False,
                            train_on=self.train_on, max_length=self.max_length, audio_rows=rows)]
        return [prepare(msgs + [{"role": "assistant", "content": rec[key]}], self.tokenizer, self.n_mels,
                        add_generation_prompt=False, train_on="last", max_length=self.max_length,
                        audio_rows=rows)
                for key in ("chosen", "rejected")]

    # -- schedule --------------------------------------------------------------------------------

    def epoch_batches(self, epoch: int, batch_size: int, length_grouping: bool = True) -> list[list[int]]:
        """Global batches (record indices) of one epoch, a pure function of (seed, epoch)."""
        n = len(self.records)
        if n < batch_size:
            raise ConfigError(f"{self.path}: {n} usable records, fewer than batch_size={batch_size}")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        if length_grouping:
            span = batch_size * MEGA_BATCHES
            grouped = []
            for start in range(0, n, span):
                chunk = order[start: start + span]
                grouped += sorted(chunk, key=lambda i: -self.lengths[i])  # stable: ties keep random order
            order = grouped
        batches = [order[i: i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
        perm = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in perm]

    def batches_per_epoch(self, batch_size: int) -> int:
        return len(self.records) // batch_size


def audio_tokens_estimate(n_samples: int) -> int:
    """Audio tokens of a clip of n_samples at 16 kHz, from its length alone: exact up to 30 s;
    a longer clip is encoded in windows of <= 30 s (cut at low energy, so their lengths are
    unknown before decoding), ~25 tokens/s in all, give or take a token per window."""
    return A.num_audio_tokens(-(-n_samples // A.HOP_LENGTH))


def with_stand_ins(data: TrainData, indices: list[int], epoch: int = 0) -> tuple[list[list[Example]], list[bool]]:
    """The examples of each index, a failing record (or a padding index -1) replaced by a stand-in
    and flagged False. Every slot runs a forward: under FSDP each rank must run as many as the
    others, and a micro-batch is never empty. A stand-in's loss and metrics are discarded."""
    got = [data.try_examples(i, epoch) if i >= 0 else None for i in indices]
    ok = [g is not None for g in got]
    if not all(ok):
        spare = next((g for g in got if g is not None), None) or data.stand_in(epoch)
        got = [g if g is not None else spare for g in got]
    return got, ok


def with_audio(data: TrainData, got: list[list[Example]], ok: list[bool]) -> tuple[list[list[Example]], list[bool]]:
    """got, ok (as from with_stand_ins) plus, when none of them has audio, a stand-in record that
    has (flagged False). Under torchrun the ranks must all run the encoder and projector when one
    does (FSDP's gathers, the gradient average): a text-only micro-batch would desynchronise them."""
    if any(e.audio_tokens for ex in got for e in ex) or data.audio_stand_in() is None:
        return got, ok
    return got + [data.audio_stand_in()[1]], ok + [False]


def rank_slice(batch: list[int], rank: int, world: int) -> list[int]:
    """This rank's contiguous share of a global batch."""
    if len(batch) % world:
        raise ConfigError(f"batch_size={len(batch)} is not divisible by the {world} ranks")
    per = len(batch) // world
    return batch[rank * per: (rank + 1) * per]


def micro_batches(items: list, micro: int) -> list[list]:
    micro = micro or len(items)
    return [items[i: i + micro] for i in range(0, len(items), micro)]


def augment_rows(x: torch.Tensor, g: torch.Generator, dropout: float = 0.0, time_masks: int = 0,
                 time_mask_len: int = 4, noise: float = 0.0) -> torch.Tensor:
    """Cached encoder rows x (N, d) -> augmented copy: `time_masks` spans of up to `time_mask_len`
    rows zeroed (only when the clip is over twice that long), Gaussian noise of std `noise`, then
    elementwise dropout (kept values scaled by 1 / (1 - dropout))."""
    x = x.clone()
    for _ in range(time_masks):
        w = int(torch.randint(0, time_mask_len + 1, (1,), generator=g))
        if w and x.shape[0] > 2 * w:
            start = int(torch.randint(0, x.shape[0] - w, (1,), generator=g))
            x[start: start + w] = 0
    if noise:
        x = x + noise * torch.randn(x.shape, generator=g)
    if dropout:
        x = x * (torch.rand(x.shape, generator=g) >= dropout) / (1.0 - dropout)
    return x


def augment_wave(wave: np.ndarray, rng: np.random.Generator, gain_db: float = 0.0, speed: float = 0.0,
                 noise_snr_db: float | None = None) -> np.ndarray:
    """Random gain (+-gain_db dB), speed (factor 1 +- speed, resampled) and white noise at an SNR."""
    if speed:
        factor = 1.0 + rng.uniform(-speed, speed)
        n = max(1, round(len(wave) / factor))
        wave = np.interp(np.linspace(0, len(wave) - 1, n), np.arange(len(wave)), wave).astype(np.float32)
    if gain_db:
        wave = wave * np.float32(10 ** (rng.uniform(-gain_db, gain_db) / 20))
    if noise_snr_db is not None:
        power = float(np.mean(wave.astype(np.float64) ** 2)) or 1e-8
        noise = rng.standard_normal(len(wave)) * math.sqrt(power / 10 ** (noise_snr_db / 10))
        wave = wave + noise.astype(np.float32)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)
