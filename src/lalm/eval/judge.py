"""The AIR-Bench chat judge: any OpenAI-compatible chat endpoint rates two answers 1-10.

Protocol (AIR-Bench `score_chat.py` / `cal_score.py`, spec section 6):
- the judge reads the audio *description* (meta_info; it gets no audio), the question, then
  "Assistant 1" and "Assistant 2", and replies with one line "s1 s2";
- the reference answer is Assistant 1 and the model's answer Assistant 2; the run is then
  repeated with the positions swapped, and the model's score is the mean over both orders;
- a reply is parsed as AIR-Bench parses it (strip, newlines removed, split on one space,
  exactly two integers, none above 10); anything else is malformed.

Differences, on purpose: a malformed reply or a failed request is retried (`retries` times)
before it counts as a failure, and a failure never stops the run: it is counted and left out
of the means, as `cal_score.py` leaves out unparsable lines. AIR-Bench sends half of its
requests at temperature 2.0 at random; here the temperature is one setting (default 1.0).

Categories: speech = speech_QA + speech_dialogue_QA; sound = sound_QA + sound_generation_QA;
music = music_QA + music_generation_analysis_QA; mixed = mean of speech_and_sound and
speech_and_music; average (the leaderboard's) = mean of speech, sound, music and mixed.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lalm.errors import ConfigError

JUDGE_PROMPT = (
    "You are a helpful and precise assistant for checking the quality of the answer.\n"
    "[Detailed Audio Description]\nXAudioX\n[Question]\nXQuestionX\n"
    "[The Start of Assistant 1s Answer]\nXAssistant1X\n[The End of Assistant 1s Answer]\n"
    "[The Start of Assistant 2s Answer]\nXAssistant2X\n[The End of Assistant 2s Answer]\n[System]\n"
    "We would like to request your feedback on the performance of two AI assistants in response to the user question "
    "and audio description displayed above. AI assistants are provided with detailed audio descriptions and questions.\n"
    "Please rate the helpfulness, relevance, accuracy, and comprehensiveness of their responses. "
    "Each assistant receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance. "
    "Please output a single line containing only two values indicating the scores for Assistant 1 and 2, respectively. "
    "The two scores are separated by a space."
)

CATEGORIES = {
    "speech_QA": "speech", "speech_dialogue_QA": "speech",
    "sound_QA": "sound", "sound_generation_QA": "sound",
    "music_QA": "music", "music_generation_analysis_QA": "music",
    "speech_and_sound_QA": "speech_and_sound", "speech_and_music_QA": "speech_and_music",
}


def judge_prompt(meta_info: str, question: str, answer_1: str, answer_2: str) -> str:
    return (JUDGE_PROMPT.replace("XAudioX", meta_info).replace("XQuestionX", question)
            .replace("XAssistant1X", answer_1).replace("XAssistant2X", answer_2))


def parse_scores(reply: str) -> tuple[int, int] | None:
    """AIR-Bench's parse: "7 8" -> (7, 8); None when the reply is not exactly that."""
    parts = reply.strip().replace("\n", "").split(" ")
    if len(parts) != 2:
        return None
    try:
        s1, s2 = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if s1 > 10 or s2 > 10:
        return None
    return s1, s2


@dataclass
class JudgeConfig:
    url: str  # base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1
    model: str = "gpt-4-0125-preview"
    api_key: str | None = None  # default: $LALM_JUDGE_API_KEY, then $OPENAI_API_KEY
    temperature: float = 1.0
    max_tokens: int = 1024
    retries: int = 3  # extra tries after a malformed reply or a failed request
    timeout_s: float = 120.0
    workers: int = 4
    retry_sleep_s: float = 1.0


@dataclass
class ChatScore:
    model_scores: list[int]  # the model's score in each order that parsed
    reference_scores: list[int]
    failures: int  # orders whose every try was malformed or failed

    @property
    def score(self) -> float | None:
        return sum(self.model_scores) / len(self.model_scores) if self.model_scores else None


class Judge:
    def __init__(self, config: JudgeConfig):
        if not config.url:
            raise ConfigError("--judge-url is required to score chat")
        self.config = config
        url = config.url.rstrip("/")
        self.endpoint = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.api_key = config.api_key or os.environ.get("LALM_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")

    def complete(self, content: str) -> str:
        """One chat completion; raises on transport errors or a reply without a message."""
        body = json.dumps({
            "model": self.config.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.config.timeout_s) as resp:
            data = json.loads(resp.read().decode("utf-8"))
        content = data["choices"][0]["message"]["content"]
        if not isinstance(content, str):  # the API allows null content (a refusal, a filtered reply)
            raise TypeError(f"judge reply without text: {content!r}")
        return content

    def rate(self, meta_info: str, question: str, answer_1: str, answer_2: str) -> tuple[int, int] | None:
        """Scores for (Assistant 1, Assistant 2), or None when every try failed."""
        content = judge_prompt(meta_info, question, answer_1, answer_2)
        for attempt in range(self.config.retries + 1):
            try:
                scores = parse_scores(self.complete(content))
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError):
                scores = None  # transport error or an unexpected body: same as a malformed reply
            if scores is not None:
                return scores
            if attempt < self.config.retries:
                time.sleep(self.config.retry_sleep_s)
        return None

    def score(self, meta_info: str, question: str, reference: str, prediction: str) -> ChatScore:
        """Both orders: reference first (model = Assistant 2), then swapped (model = Assistant 1)."""
        result = ChatScore([], [], 0)
        forward = self.rate(meta_info, question, reference, prediction)
        swapped = self.rate(meta_info, question, prediction, reference)
        for scores, model_pos in ((forward, 1), (swapped, 0)):
            if scores is None:
                result.failures += 1
            else:
                result.model_scores.append(scores[model_pos])
                result.reference_scores.append(scores[1 - model_pos])
        return result


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score_chat(records: list[dict], judge: Judge) -> dict:
    """Judge every record; per source (AIR-Bench task name), per category, and overall."""
    def one(r: dict) -> ChatScore:
        return judge.score(str(r.get("meta_info") or ""), str(r.get("question") or ""),
                           r["reference"], r["prediction"])

    with ThreadPoolExecutor(max_workers=max(1, judge.config.workers)) as pool:
        scores = list(pool.map(one, records))
    for r, s in zip(records, scores, strict=True):
        r["judge"] = {"model": s.model_scores, "reference": s.reference_scores, "failures": s.failures}

    def summary(pairs: list[tuple[dict, ChatScore]]) -> dict:
        model = [x for _, s in pairs for x in s.model_scores]
        ref = [x for _, s in pairs for x in s.reference_scores]
        return {"score": _mean(model), "reference_score": _mean(ref),
                "judge_failures": sum(s.failures for _, s in pairs), "count": len(pairs)}

    by_source: dict[str, list] = {}
    by_category: dict[str, list] = {}
    for r, s in zip(records, scores, strict=True):
        by_source.setdefault(str(r.get("source", "")), []).append((r, s))
        by_category.setdefault(CATEGORIES.get(str(r.get("source", "")), "other"), []).append((r, s))
    metrics = summary(list(zip(records, scores, strict=True)))
    categories = {c: summary(p)["score"] for c, p in sorted(by_category.items())}
    mixed = [categories[k] for k in ("speech_and_sound", "speech_and_music") if categories.get(k) is not None]
    if mixed:
        categories["mixed"] = sum(mixed) / len(mixed)
    # AIR-Bench's leaderboard "Average" is the mean of the four category scores (Qwen2-Audio's 6.93 =
    # mean of 7.18, 6.99, 6.79, 6.77), not metrics["score"], which weighs every answer alike.
    four = [categories.get(k) for k in ("speech", "sound", "music", "mixed")]
    if all(v is not None for v in four):
        categories["average"] = sum(four) / 4
    metrics["categories"] = categories
    return {"metrics": metrics, "by_source": {k: summary(v) for k, v in sorted(by_source.items())}}
