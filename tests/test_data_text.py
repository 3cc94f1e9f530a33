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


def test_training_questions_follow_the_kind_weights_and_the_held_out_set_does_not():
    """The corpus asks arithmetic more often (QUESTION_KINDS); the held-out set stays uniform."""
    from collections import Counter

    from lalm.data import sentences, tasks
    from lalm.data.evalsets import EvalPlanner

    ev = EvalPlanner(tasks.SIZES["full"]["eval_asr"], tasks.SIZES["full"]["eval_chat"], 0)
    ev.plan(sentences.wordfreq_vocab())
    p = tasks.Planner("full", 0, ev.reserved)
    p.voice_chat()
    spoken_only = [r for key in ("sft/train", "sft/dev") for r in p.out[key]
                   if r["task"] == "voice_chat" and all(c["type"] == "audio" for c in r["messages"][-2]["content"])]
    assert len(spoken_only) == tasks.SIZES["full"]["voice_chat"]  # one audio-only turn per question
    kinds = Counter(r["meta"]["kind"] for r in spoken_only)
    total = sum(tasks.QUESTION_KINDS.values())
    for kind, weight in tasks.QUESTION_KINDS.items():
        assert abs(kinds[kind] / len(spoken_only) - weight / total) < 0.02, (kind, kinds)
    assert not {r["meta"]["question"] for r in spoken_only} & ev.reserved
    held_out = ev.out["voice_chat_piper"]
    arithmetic = sum(any(f" {op} " in line["question"] for op in ("plus", "minus", "times")) for line in held_out)
    assert 0.1 < arithmetic / len(held_out) < 0.3  # uniform over five kinds, not the training weights


def test_held_out_lines_name_their_subset():
    """Every held-out ASR line names its kind of sentence, every spoken question its kind of
    question, every real recording its group, so `lalm eval` can say where the errors are."""
    from lalm.data import facts, sentences, tasks
    from lalm.data.evalsets import EvalPlanner, real_subset

    ev = EvalPlanner(tasks.SIZES["full"]["eval_asr"], tasks.SIZES["full"]["eval_chat"], 0)
    ev.plan(sentences.wordfreq_vocab())
    piper = ev.out["asr_piper"]
    assert {r["subset"] for r in piper} <= set(sentences.KIND_WEIGHTS) and len({r["subset"] for r in piper}) >= 6
    vocab = set(sentences.wordfreq_vocab())
    by = {k: [r["reference"].split() for r in piper if r["subset"] == k] for k in ("letters", "nato", "wordlist")}
    assert all(len(w) == 1 for words in by["letters"] for w in words) and by["letters"]
    assert all(w in sentences.NATO for words in by["nato"] for w in words) and by["nato"]
    assert all(w in vocab for words in by["wordlist"] for w in words) and by["wordlist"]
    chat = ev.out["voice_chat_piper"]
    assert {r["subset"] for r in chat} == set(facts.KINDS)
    assert all(r["subset"] != "arithmetic" or any(f" {op} " in r["question"] for op in ("plus", "minus", "times"))
               for r in chat)
    assert all(r["subset"] == real_subset(r["source"]) for r in ev.out.get("asr_real", []))
    assert [real_subset(s) for s in ("pocketsphinx-testdata:librivox/x-0870.wav", "pocketsphinx-testdata:cards/001.wav",
                                     "pocketsphinx-testdata:goforward.raw", "alsa-utils:Front_Left.wav")] == [
        "librivox", "cards", "goforward", "alsa-utils"]
