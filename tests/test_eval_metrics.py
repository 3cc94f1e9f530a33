"""Scores equal the official computation: WER/CER against jiwer, BLEU against sacrebleu.

Run: .venv/bin/pytest -q tests/test_eval_metrics.py
"""

import jiwer
import pytest
import sacrebleu
from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer

from lalm.eval import metrics
from lalm.eval.normalize import (
    chinese_text_norm,
    evaluation_tokenize,
    num2chn,
    remove_sp,
    wer_tokens,
)

EN = [
    ("<|en|>Mr. Smith paid $20 for twenty-one apples.", "mister smith paid twenty dollars for 21 apple"),
    ("The quick brown fox, jumps over the lazy dog!", "<|en|>the quick brown fox jumped over a lazy dog"),
    ("I can't believe it's already 3:30 PM.", "i cannot believe its already three thirty p m"),
    ("Hello world", "hello world hello"),
]
ZH = [
    ("<|zh|>今天是2024年3月5日，天气很好。", "今天是二零二四年三月五号 天气很好"),
    ("我有200块钱", "我有两百块"),
    ("他的电话是13812345678。", "他的电话是一三八一二三四五六七八"),
    ("百分之五十的人同意", "50%的人不同意"),
]
FR = [
    ("Bonjour, l'été est là !", "<|fr|>bonjour l'été est la"),
    ("Où est la bibliothèque ?", "ou est la bibliotheque"),
    ("Il a 25 ans.", "il a vingt-cinq ans"),
]


def test_remove_sp_is_the_official_one():
    assert remove_sp("<|en|>Hello  ,world !", "en") == "Hello,world!"
    assert remove_sp("  <|zh|>你 好 ， 世界", "zh") == "你好，世界"
    assert remove_sp("a <|x|> b\n\tc ;", "fr") == "a b c;"


def test_evaluation_tokenizer_drops_punctuation_only_tokens():
    assert evaluation_tokenize("Hello , world -- «ok» 3.5 !?") == ["hello", "world", "«ok»", "3.5"]
    assert evaluation_tokenize("a  b") == ["a", "b"]


def test_english_wer_equals_jiwer_with_whisper_normalisers():
    eng, basic = EnglishTextNormalizer(), BasicTextNormalizer()
    refs = [basic(eng(remove_sp(r, "en"))) for r, _ in EN]
    hyps = [basic(eng(remove_sp(h, "en"))) for _, h in EN]
    expected = jiwer.wer(refs, hyps)
    got = metrics.wer([r for r, _ in EN], [h for _, h in EN], "en")
    assert expected > 0.05
    assert got == pytest.approx(expected, abs=1e-9)


def test_french_wer_equals_jiwer_with_basic_normaliser():
    basic = BasicTextNormalizer()
    refs = [basic(remove_sp(r, "fr")) for r, _ in FR]
    hyps = [basic(remove_sp(h, "fr")) for _, h in FR]
    expected = jiwer.wer(refs, hyps)
    assert expected > 0.05
    assert metrics.wer([r for r, _ in FR], [h for _, h in FR], "fr") == pytest.approx(expected, abs=1e-9)


def test_chinese_cer_equals_jiwer_after_cn_tn():
    def norm(t):
        return "".join(chinese_text_norm(remove_sp(t, "zh")).split())

    expected = jiwer.cer([norm(r) for r, _ in ZH], [norm(h) for _, h in ZH])
    got = metrics.wer([r for r, _ in ZH], [h for _, h in ZH], "zh")
    assert expected > 0.02
    assert got == pytest.approx(expected, abs=1e-9)
    # The numbers are spelled out: "2024年3月5日" vs "二零二四年三月五号" differs in one character.
    assert metrics.wer_counts(["2024年3月5日"], ["二零二四年三月五号"], "zh") == (1, 9)


def test_cantonese_is_converted_to_simplified_then_scored_per_character():
    assert wer_tokens("這個問題，好難。", "yue") == list("这个问题好难")
    assert metrics.wer(["這個問題"], ["这个问题"], "yue") == 0.0


def test_english_applies_both_whisper_normalisers():
    # EnglishTextNormalizer keeps "$20.50"; the basic normaliser after it splits it, as the script does.
    assert wer_tokens("He paid $20.50.", "en") == ["he", "paid", "20", "50"]


@pytest.mark.parametrize("number, spoken", [
    ("10", "十"), ("15", "十五"), ("20", "二十"), ("200", "两百"), ("2000", "两千"), ("1001", "一千零一"),
    ("10000", "一万"), ("12.5", "十二点五"), ("0.5", "零点五"), ("22", "二十二"), ("120000", "十二万"),
])
def test_num2chn(number, spoken):
    assert num2chn(number) == spoken


def test_chinese_nsw_rewrites():
    assert chinese_text_norm("2020年3月5日") == "二零二零年三月五日"
    assert chinese_text_norm("增长了12%") == "增长了百分之十二"
    assert chinese_text_norm("3/4的人") == "四分之三的人"
    assert chinese_text_norm("15个人") == "十五个人"
    assert chinese_text_norm("编号1001") == "编号一零零一"
    assert chinese_text_norm("P2P，你好！") == "P2P 你好 "


def test_bleu_equals_sacrebleu_with_the_target_language_tokenizer():
    recs = [
        {"source": "covost2_en_de_test", "lang": "de", "prediction": "Das ist ein kleiner Test.",
         "reference": "Das ist ein Test."},
        {"source": "covost2_en_de_test", "lang": "de", "prediction": "Guten Morgen, Welt!", "reference": "Guten Morgen Welt!"},
        {"source": "covost2_en_zh_test", "lang": "zh", "prediction": "今天天气很好。", "reference": "今天的天气很好。"},
        {"source": "covost2_en_ja_test", "lang": "ja", "prediction": "今日は良い天気です", "reference": "今日は良い天気でした"},
    ]
    res = metrics.score_s2tt(recs)["by_source"]
    de = sacrebleu.corpus_bleu(["Das ist ein kleiner Test.", "Guten Morgen, Welt!"],
                               [["Das ist ein Test.", "Guten Morgen Welt!"]], tokenize="13a").score
    zh = sacrebleu.corpus_bleu(["今天天气很好。"], [["今天的天气很好。"]], tokenize="zh").score
    assert res["covost2_en_de_test"]["bleu"] == pytest.approx(de, abs=1e-9)
    assert res["covost2_en_zh_test"]["bleu"] == pytest.approx(zh, abs=1e-9)
    assert zh != pytest.approx(sacrebleu.corpus_bleu(["今天天气很好。"], [["今天的天气很好。"]], tokenize="13a").score)
    pytest.importorskip("MeCab")
    ja = sacrebleu.corpus_bleu(["今日は良い天気です"], [["今日は良い天気でした"]], tokenize="ja-mecab").score
    assert res["covost2_en_ja_test"]["bleu"] == pytest.approx(ja, abs=1e-9)


def test_target_language_from_source_name_as_the_official_script():
    assert metrics.covost_target_lang("covost2_en_zh_test") == "zh"
    recs = [{"source": "covost2_en_zh_test", "prediction": "今天天气很好", "reference": "今天天气很好"}]  # no "lang"
    assert metrics.score_s2tt(recs)["by_source"]["covost2_en_zh_test"]["bleu"] == pytest.approx(100.0)


def test_exact_and_lenient_accuracy():
    refs = ["joy", "anger", "neutral", "sadness"]
    hyps = [" joy", "Anger", "The speaker sounds neutral, not angry.", "anger and sadness"]
    assert metrics.exact_accuracy(refs, hyps) == 0.25  # lstrip only, case matters, as sklearn on raw strings
    # lenient: the first label named counts; "anger" comes before "sadness" in the last answer.
    assert metrics.lenient_accuracy(refs, hyps) == 0.75
    # Inflections and everyday words for a label count; a different label named first does not.
    labels = ["Sneeze", "Cough", "Throat clearing", "joy", "sadness"]
    assert metrics.lenient_accuracy(
        ["Sneeze", "Throat clearing", "joy", "sadness", "Cough"],
        ["Someone is sneezing.", "a person clearing their throat, then a cough", "She sounds happy!",
         "sad", "It is a sneeze, not a cough."], labels) == 0.8


def test_short_answer_match_normalises_numbers_and_punctuation():
    assert metrics.answer_match("12", "Twelve.")
    assert metrics.answer_match("Front Left", "front left")
    assert not metrics.answer_match("dog", "a dog barking")
    assert metrics.answer_contains("dog", "a dog barking")
    assert not metrics.answer_contains("dog", "hotdog")


def test_score_asr_groups_by_source_and_pools_overall():
    recs = [
        {"source": "a", "lang": "en", "prediction": "hello world", "reference": "hello world"},
        {"source": "b", "lang": "en", "prediction": "hello", "reference": "hello there world"},
    ]
    res = metrics.score_asr(recs)
    assert res["by_source"]["a"] == {"wer": 0.0, "count": 1}
    assert res["by_source"]["b"]["wer"] == pytest.approx(2 / 3)
    assert res["metrics"]["wer"] == pytest.approx(2 / 5)
