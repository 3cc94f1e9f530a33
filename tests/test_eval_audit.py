"""Exactness audit of `lalm eval` against the official Qwen2-Audio eval_audio scripts.

Each test is a figure the official script would print on the same predictions.
Run: .venv/bin/pytest -q tests/test_eval_audit.py
"""

import pytest

from lalm.eval import metrics
from lalm.eval.normalize import english_normalize, wer_tokens


def test_english_normaliser_is_whispers_list_not_the_pypi_packages():
    """evaluate_asr.py's EnglishTextNormalizer is Whisper's normalizers/english.py (vendored;
    "borrowed from Whisper", EVALUATION.md). The PyPI whisper-normalizer 0.1.x adds kinda,
    sorta, dunno and cause -> because to its contractions; Whisper's list has none of them."""
    assert wer_tokens("I kinda dunno, cause it is sorta late", "en") == [
        "i", "kinda", "dunno", "cause", "it", "is", "sorta", "late"]
    # Official compute_wer: "cause i said so" vs "because i said so" is 1 error in 4 words;
    # "i kinda like it" vs "i kind of like it" is 2 (kinda -> kind, + of) in 4: 3 / 8.
    refs, hyps = ["cause i said so", "i kinda like it"], ["because i said so", "i kind of like it"]
    assert metrics.wer_counts(refs, hyps, "en") == (3, 8)
    assert metrics.wer(refs, hyps, "en") == pytest.approx(0.375)


def test_whispers_own_contractions_still_apply():
    assert english_normalize("I can't, we won't, they gotta") == "i can not we will not they got to"
    assert wer_tokens("Mr. Smith's colour", "en") == ["mister", "smith", "is", "color"]
