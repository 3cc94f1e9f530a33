"""Scores, computed as the official Qwen2-Audio scripts compute them (spec section 6).

- ASR: WER = sum of token edit distances / sum of reference tokens, tokens from
  `normalize.wer_tokens` (words; characters for zh and yue). Pooled over the pairs given,
  so a per-source score pools that source's utterances, as `compute_wer` does.
- S2TT: `sacrebleu.corpus_bleu(hyps, [refs], tokenize=...)` on raw outputs, the tokenizer by
  target language: zh -> "zh", ja -> "ja-mecab", everything else -> "13a".
- SER / VSC: `accuracy_score(gt, response.lstrip())`, an exact string match; beside it a
  lenient accuracy that looks for the label inside a free answer.
- lalm's short-answer tasks (aqa and the like): exact match after `answer_normalize`.

Each `score_*` takes prediction records (dicts with "prediction", "reference", "source",
"lang") and returns {"metrics": {...}, "by_source": {source: {..., "count": n}}}.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from lalm.errors import ConfigError
from lalm.eval.normalize import answer_normalize, wer_tokens

Record = dict


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance over token lists (what `editdistance.eval` computes)."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.distance(a, b)


def wer_counts(refs: Iterable[str], hyps: Iterable[str], lang: str) -> tuple[int, int]:
    """(edit distance, reference tokens) summed over pairs, after the official chain."""
    errors = length = 0
    for ref, hyp in zip(refs, hyps, strict=True):
        r, h = wer_tokens(ref, lang), wer_tokens(hyp, lang)
        errors += edit_distance(r, h)
        length += len(r)
    return errors, length


def wer(refs: Iterable[str], hyps: Iterable[str], lang: str) -> float:
    errors, length = wer_counts(refs, hyps, lang)
    return errors / length if length else float("nan")


def bleu_tokenizer(target_lang: str) -> str:
    return {"ja": "ja-mecab", "zh": "zh"}.get(target_lang, "13a")


def corpus_bleu(hyps: list[str], refs: list[str], target_lang: str) -> float:
    import sacrebleu

    tokenize = bleu_tokenizer(target_lang)
    if tokenize == "ja-mecab":
        try:
            import MeCab  # noqa: F401  (sacrebleu's ja-mecab tokenizer needs mecab-python3 + ipadic)
        except ImportError as e:
            raise ConfigError(
                "BLEU for Japanese targets needs sacrebleu's ja-mecab tokenizer: "
                "pip install mecab-python3 ipadic (or `pip install lalm[eval]`)"
            ) from e
    return sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize).score


def covost_target_lang(source: str) -> str:
    """The official script's rule: the target language is `source.split("_")[-2]`."""
    parts = source.split("_")
    return parts[-2] if len(parts) >= 2 else "en"


def exact_accuracy(refs: list[str], hyps: list[str]) -> float:
    """sklearn's accuracy_score(gt, response.lstrip()): plain string equality."""
    if not refs:
        return float("nan")
    return sum(r == h.lstrip() for r, h in zip(refs, hyps, strict=True)) / len(refs)


# Other words a free answer uses for a label (MELD's emotions, VocalSound's classes),
LABEL_SYNONYMS = {
    "joy": ["happy", "happiness", "joyful", "excited"], "sadness": ["sad", "unhappy"],
    "anger": ["angry", "annoyed", "frustrated"], "surprise": ["surprised", "amazed"],
    "fear": ["afraid", "scared", "fearful", "anxious"], "disgust": ["disgusted"], "neutral": ["calm"],
    "laughter": ["laugh", "laughing", "laughs"], "throat clearing": [r"clear\w*(?: \w+)? throat"],
}  # regular expressions, matched as whole words


def _label_pattern(label: str) -> str:
    """A label, its plural/-ed/-ing forms ("sneezes", "sneezing") and its synonyms, as whole words."""
    low = label.lower()
    forms = [re.escape(low) + r"(?:s|es|d|ed|ing)?"]
    if low.endswith("e"):
        forms.append(re.escape(low[:-1]) + "ing")
    forms += LABEL_SYNONYMS.get(low, [])
    return r"(?<!\w)(?:" + "|".join(forms) + r")(?!\w)"


def _first_label(answer: str, labels: list[str]) -> str | None:
    """The label named earliest in a free answer (whole words, case-insensitive)."""
    best, best_at = None, None
    low = answer.lower()
    # Longer labels first, so "throat clearing" wins over a shorter label inside it.
    for label in sorted(labels, key=len, reverse=True):
        m = re.search(_label_pattern(label), low)
        if m and (best_at is None or m.start() < best_at):
            best, best_at = label, m.start()
    return best


def lenient_accuracy(refs: list[str], hyps: list[str], labels: list[str] | None = None) -> float:
    """Correct when the first label the answer names is the reference label."""
    if not refs:
        return float("nan")
    labels = sorted(set(labels or refs))
    return sum(_first_label(h, labels) == r for r, h in zip(refs, hyps, strict=True)) / len(refs)


def answer_match(ref: str, hyp: str, lang: str = "en") -> bool:
    return answer_normalize(ref, lang) == answer_normalize(hyp, lang)


def answer_contains(ref: str, hyp: str, lang: str = "en") -> bool:
    r, h = answer_normalize(ref, lang), answer_normalize(hyp, lang)
    if not r:
        return not h
    if lang in ("zh", "yue"):
        return r in h
    return re.search(r"(?<!\S)" + re.escape(r) + r"(?!\S)", h) is not None


# ----------------------------------------------------------------------------------------------
# Per-task scoring of prediction records, overall and per source.
# ----------------------------------------------------------------------------------------------
def _by_source(records: list[Record]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(str(r.get("source", "")), []).append(r)
    return dict(sorted(groups.items()))


def _lang(r: Record, default: str = "en") -> str:
    return str(r.get("lang") or default)


def score_asr(records: list[Record]) -> dict:
    by_source, total_err, total_len = {}, 0, 0
    for source, group in _by_source(records).items():
        err = length = 0
        for r in group:
            e, n = wer_counts([r["reference"]], [r["prediction"]], _lang(r))
            err, length = err + e, length + n
        by_source[source] = {"wer": err / length if length else float("nan"), "count": len(group)}
        total_err, total_len = total_err + err, total_len + length
    overall = total_err / total_len if total_len else float("nan")
    return {"metrics": {"wer": overall, "count": len(records)}, "by_source": by_source}


def score_s2tt(records: list[Record]) -> dict:
    by_source, langs = {}, set()
    for source, group in _by_source(records).items():
        lang = _lang(group[0], covost_target_lang(source))
        langs.add(lang)
        hyps = [r["prediction"] for r in group]
        refs = [r["reference"] for r in group]
        by_source[source] = {"bleu": corpus_bleu(hyps, refs, lang), "count": len(group)}
    if len(langs) == 1:  # one tokenizer fits all: pool the corpus
        lang = langs.pop()
        overall = corpus_bleu([r["prediction"] for r in records], [r["reference"] for r in records], lang)
    else:  # several target languages: the mean of the per-source scores
        overall = sum(v["bleu"] for v in by_source.values()) / max(len(by_source), 1)
    return {"metrics": {"bleu": overall, "count": len(records)}, "by_source": by_source}


def score_classification(records: list[Record]) -> dict:
    """SER / VSC: exact accuracy (official) and lenient accuracy over the labels seen."""
    labels = sorted({r["reference"] for r in records})

    def score(group: list[Record]) -> dict:
        refs = [r["reference"] for r in group]
        hyps = [r["prediction"] for r in group]
        return {
            "accuracy": exact_accuracy(refs, hyps),
            "accuracy_lenient": lenient_accuracy(refs, hyps, labels),
            "count": len(group),
        }

    by_source = {s: score(g) for s, g in _by_source(records).items()}
    return {"metrics": score(records), "by_source": by_source}


def score_answers(records: list[Record]) -> dict:
    """lalm's short-answer tasks: normalised exact match, and the answer contained in the output."""

    def score(group: list[Record]) -> dict:
        n = len(group)
        hits = sum(answer_match(r["reference"], r["prediction"], _lang(r)) for r in group)
        lenient = sum(answer_contains(r["reference"], r["prediction"], _lang(r)) for r in group)
        return {"accuracy": hits / n, "accuracy_lenient": lenient / n, "count": n}

    by_source = {s: score(g) for s, g in _by_source(records).items()}
    return {"metrics": score(records), "by_source": by_source}


ASR_TASKS = {"asr"}
S2TT_TASKS = {"s2tt", "st", "ast", "translation"}
CLASSIFICATION_TASKS = {"ser", "vsc"}
CHAT_TASKS = {"chat"}


def scorer_for(task: str) -> Callable[[list[Record]], dict]:
    """The scoring function of a task name; unknown tasks are short-answer tasks."""
    if task in ASR_TASKS:
        return score_asr
    if task in S2TT_TASKS:
        return score_s2tt
    if task in CLASSIFICATION_TASKS:
        return score_classification
    if task in CHAT_TASKS:
        raise ConfigError("task 'chat' is scored by a judge: pass --judge-url and --judge-model")
    return score_answers


def primary_metric(task: str) -> str:
    if task in ASR_TASKS:
        return "wer"
    if task in S2TT_TASKS:
        return "bleu"
    if task in CHAT_TASKS:
        return "score"
    return "accuracy"
