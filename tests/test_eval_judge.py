"""The AIR-Bench judge round trip against a stub OpenAI-compatible server started here.

Run: .venv/bin/pytest -q tests/test_eval_judge.py
"""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from lalm.eval.judge import Judge, JudgeConfig, judge_prompt, parse_scores, score_chat


class StubJudge:
    """Scores each answer by a fixed table; scripted malformed replies per question."""

    QUALITY: ClassVar[dict] = {"REF-GOOD": 9, "REF-OK": 7, "PRED-GREAT": 8, "PRED-BAD": 2, "PRED-MID": 5}

    def __init__(self):
        self.requests: list[dict] = []
        self.malformed_left = {"flaky question": 1}  # one malformed reply, then good ones
        self.lock = threading.Lock()

    def reply(self, body: dict) -> str:
        content = body["messages"][0]["content"]
        a1 = re.search(r"Assistant 1s Answer\]\n(.*?)\n\[The End", content, re.DOTALL).group(1)
        a2 = re.search(r"Assistant 2s Answer\]\n(.*?)\n\[The End", content, re.DOTALL).group(1)
        question = re.search(r"\[Question\]\n(.*?)\n\[The Start", content, re.DOTALL).group(1)
        with self.lock:
            self.requests.append({"a1": a1, "a2": a2, "question": question, "model": body["model"],
                                  "temperature": body["temperature"], "max_tokens": body["max_tokens"]})
            if question == "hopeless question":
                return "Both answers are fine, I would say 7 out of 10."
            if question == "refused question":
                return None  # "content": null, which the API allows (a refusal, a filtered reply)
            if self.malformed_left.get(question, 0) > 0:
                self.malformed_left[question] -= 1
                return "Assistant 1: 9, Assistant 2: 8"
        return f"{self.QUALITY[a1]} {self.QUALITY[a2]}"


@pytest.fixture
def stub_server():
    stub = StubJudge()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert self.path == "/v1/chat/completions"
            assert self.headers["Authorization"] == "Bearer test-key"
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": stub.reply(body)},
                                               "finish_reason": "stop"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", stub
    server.shutdown()
    server.server_close()


def test_parse_scores_as_air_bench():
    assert parse_scores("7 8") == (7, 8)
    assert parse_scores(" 10 3\n") == (10, 3)
    assert parse_scores("7 8\n") == (7, 8)
    assert parse_scores("7, 8") is None
    assert parse_scores("7  8") is None  # two spaces: three fields, as cal_score.py splits
    assert parse_scores("11 3") is None
    assert parse_scores("7.5 8") is None


def test_prompt_places_reference_first():
    p = judge_prompt("a dog barks", "What animal?", "A dog.", "A cat.")
    assert p.index("[Detailed Audio Description]\na dog barks\n") < p.index("[Question]\nWhat animal?\n")
    assert "[The Start of Assistant 1s Answer]\nA dog.\n" in p and "[The Start of Assistant 2s Answer]\nA cat.\n" in p
    assert p.endswith("The two scores are separated by a space.")


def test_round_trip_swaps_positions_and_averages(stub_server, monkeypatch):
    url, stub = stub_server
    monkeypatch.setenv("LALM_JUDGE_API_KEY", "test-key")
    judge = Judge(JudgeConfig(url=url, model="judge-x", temperature=1.0, retry_sleep_s=0.0, workers=2))
    records = [
        {"id": "1", "source": "speech_QA", "question": "q1", "meta_info": "m", "reference": "REF-GOOD",
         "prediction": "PRED-GREAT"},
        {"id": "2", "source": "sound_QA", "question": "q2", "meta_info": "m", "reference": "REF-OK",
         "prediction": "PRED-BAD"},
        {"id": "3", "source": "speech_and_music_QA", "question": "flaky question", "meta_info": "m",
         "reference": "REF-OK", "prediction": "PRED-MID"},
        {"id": "4", "source": "speech_and_sound_QA", "question": "hopeless question", "meta_info": "m",
         "reference": "REF-OK", "prediction": "PRED-MID"},
    ]
    res = score_chat(records, judge)
    # Every record was asked both ways round: reference first, then the model's answer first.
    for r in records[:3]:
        asked = [(q["a1"], q["a2"]) for q in stub.requests if q["question"] == r["question"]]
        assert (r["reference"], r["prediction"]) in asked and (r["prediction"], r["reference"]) in asked
    assert {q["model"] for q in stub.requests} == {"judge-x"}
    assert {q["max_tokens"] for q in stub.requests} == {1024}
    # The flaky question got one malformed reply, was retried, and then scored.
    assert records[2]["judge"] == {"model": [5, 5], "reference": [7, 7], "failures": 0}
    # The hopeless one was retried (1 + 3 tries per order), counted as failures, and never crashed the run.
    assert sum(q["question"] == "hopeless question" for q in stub.requests) == 8
    assert records[3]["judge"] == {"model": [], "reference": [], "failures": 2}
    by = res["by_source"]
    assert by["speech_QA"]["score"] == 8 and by["speech_QA"]["reference_score"] == 9
    assert by["sound_QA"]["score"] == 2
    assert by["speech_and_sound_QA"]["score"] is None and by["speech_and_sound_QA"]["judge_failures"] == 2
    assert res["metrics"]["score"] == pytest.approx((8 + 8 + 2 + 2 + 5 + 5) / 6)
    assert res["metrics"]["judge_failures"] == 2
    cats = res["metrics"]["categories"]
    assert cats["speech"] == 8 and cats["sound"] == 2 and cats["mixed"] == 5  # mixed: the one that scored


def test_unreachable_judge_counts_failures(monkeypatch):
    judge = Judge(JudgeConfig(url="http://127.0.0.1:9/v1", retries=1, retry_sleep_s=0.0, timeout_s=2))
    s = judge.score("m", "q", "ref", "pred")
    assert s.failures == 2 and s.score is None


def test_a_reply_without_text_is_a_failure_not_a_crash(stub_server, monkeypatch):
    url, stub = stub_server
    monkeypatch.setenv("LALM_JUDGE_API_KEY", "test-key")
    judge = Judge(JudgeConfig(url=url, retries=1, retry_sleep_s=0.0, workers=2))
    records = [
        {"id": "1", "source": "sound_QA", "question": "refused question", "meta_info": "m", "reference": "REF-OK",
         "prediction": "PRED-MID"},
        {"id": "2", "source": "sound_QA", "question": "q2", "meta_info": "m", "reference": "REF-OK",
         "prediction": "PRED-BAD"},
    ]
    res = score_chat(records, judge)  # a null "content" must not stop the run and lose the other scores
    assert sum(q["question"] == "refused question" for q in stub.requests) == 4  # retried, both orders
    assert records[0]["judge"] == {"model": [], "reference": [], "failures": 2}
    assert res["by_source"]["sound_QA"]["score"] == 2 and res["metrics"]["judge_failures"] == 2


def test_air_bench_average_is_the_mean_of_the_four_categories():
    """The leaderboard's Average (Qwen2-Audio: 6.93) averages speech, sound, music and mixed; the pooled
    mean over answers weighs the bigger categories more and is not comparable with it."""
    from lalm.eval import report
    from lalm.eval.judge import ChatScore

    by_source = {"speech_QA": 8, "sound_QA": 6, "music_QA": 5, "speech_and_sound_QA": 4, "speech_and_music_QA": 6}

    class FixedJudge:  # scores each answer by its task; what score_chat needs of a Judge
        config = JudgeConfig(url="http://unused", workers=1)

        def score(self, meta_info, question, reference, prediction):
            return ChatScore([by_source[prediction]] * 2, [9, 9], 0)

    sources = ["speech_QA"] * 3 + list(by_source)[1:]
    records = [{"id": str(i), "source": s, "question": "q", "reference": "r", "prediction": s}
               for i, s in enumerate(sources)]
    res = score_chat(records, FixedJudge())
    cats = res["metrics"]["categories"]
    assert cats["mixed"] == 5 and cats["average"] == pytest.approx((8 + 6 + 5 + 5) / 4)
    assert res["metrics"]["score"] == pytest.approx((8 * 3 + 6 + 5 + 4 + 6) / 7)  # pooled: speech counts 3 times
    row = next(r for r in report.table_rows({"chat": res}) if r["source"] == "airbench_average")
    assert (row["ours"], row["paper"]) == (pytest.approx(6.0), 6.93)
    # Without all four categories there is no average to compare.
    partial = score_chat([r for r in records if r["source"] != "music_QA"], FixedJudge())
    assert "average" not in partial["metrics"]["categories"]
