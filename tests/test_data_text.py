"""Text generators of the corpus: exact answers and a broad vocabulary.

Run: .venv/bin/pytest -q tests/test_data_text.py
"""

import random
import re

import pytest

from lalm.data import facts, phrases, sentences
from lalm.data.sentences import number_words

WORDS = {number_words(n): n for n in range(1000)}


@pytest.mark.parametrize("n,words", [
    (0, "zero"), (7, "seven"), (15, "fifteen"), (20, "twenty"), (42, "forty two"),
    (100, "one hundred"), (105, "one hundred and five"), (999, "nine hundred and ninety nine"),
    (1000, "one thousand"), (2024, "two thousand and twenty four"),
    (123456, "one hundred and twenty three thousand four hundred and fifty six")])
def test_number_words(n, words):
    assert number_words(n) == words


def test_arithmetic_and_comparison_answers_are_exact():
    rng = random.Random(1)
    checked = 0
    for _ in range(400):
        kind, q, ans, wrong = facts.question(rng)
        assert ans != wrong and ans == ans.lower()
        m = re.fullmatch(r".*?(?:is|calculate|for) (.+) (plus|minus|times) (.+)", q)
        if kind == "arithmetic" and m:
            a, b = WORDS[m.group(1)], WORDS[m.group(3)]
            assert int(ans) == {"plus": a + b, "minus": a - b, "times": a * b}[m.group(2)]
            checked += 1
        if kind == "spelling":
            assert ans.replace(" ", "") == q.split()[-1]
    assert checked > 30


def test_sentences_use_a_broad_vocabulary():
    vocab = sentences.wordfreq_vocab()
    assert len(vocab) > 15000 and "porn" not in vocab
    rng = random.Random(0)
    texts = [sentences.sentence(rng, vocab)[1] for _ in range(3000)]
    words = {w for t in texts for w in t.split()}
    assert len(words) > 4000
    assert len(set(texts)) > 2600  # short kinds (commands, days, numbers) repeat by design
    assert all(re.fullmatch(r"[a-z' -]+", t) for t in texts)


def test_parallel_phrases_are_complete():
    assert len(phrases.PHRASES) >= 50
    for row in phrases.PHRASES:
        assert set(row) == set(phrases.LANGS) and all(row.values())
