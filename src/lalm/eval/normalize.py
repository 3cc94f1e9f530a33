"""Text normalisation for scoring, exactly as Qwen2-Audio's `eval_audio/evaluate_asr.py` does it.

The official ASR chain, per (reference, hypothesis) pair (spec section 6):
  1. `remove_sp`: every `<|...|>` tag becomes a space, whitespace collapses, spaces before
     `!,.?;:` go, the left edge is stripped, and for `zh` all whitespace is removed;
  2. a language normaliser: `yue` -> zhconv to zh-cn then Whisper's BasicTextNormalizer;
     `en` -> Whisper's EnglishTextNormalizer then *also* BasicTextNormalizer (the script's
     if/else applies both); `zh` -> speechio `cn_tn.TextNorm` with every option off;
     anything else -> BasicTextNormalizer;
  3. fairseq's `EvaluationTokenizer(tokenizer_type="none", lowercase=True,
     punctuation_removal=True)`: split on single spaces, drop tokens made only of Unicode-P
     characters, lowercase; then `.split()`. (The official copy, Qwen-Audio's
     evaluate_tokenizer.py, runs sacrebleu's 13a tokenizer first whatever tokenizer_type says;
     13a only splits ASCII punctuation, none of which survives step 2, so it only collapses
     whitespace, as `.split()` does: left out, and checked equal on random text);
  4. `zh` and `yue` are scored per character (tokens joined, then split into characters).

The Whisper normalisers come from the `whisper-normalizer` package, as the official script
vendors, less four contractions that package added to Whisper's English list (see
`_NOT_IN_WHISPER`). speechio's `cn_tn.py` is not on PyPI, so `ChineseTextNorm` below re-implements what
`TextNorm()` does with every option off: the non-standard-word rewrite (dates, money, phone
numbers, fractions, percentages, numbers with a measure word, digit strings, plain numbers
-> Chinese numerals, in that order, each stage finding its matches then rewriting the first
occurrence of each) followed by replacing Chinese and ASCII punctuation with spaces.
"""

from __future__ import annotations

import re
import string
import unicodedata
from functools import lru_cache

PUNCS = "!,.?;:"
_TAG = re.compile(r"<\|.*?\|>")
_SPACE_BEFORE_PUNC = re.compile(f" ?([{PUNCS}])")


def remove_sp(text: str, lang: str) -> str:
    """The official `remove_sp`: drop `<|...|>` tags and tidy spaces (all spaces for zh)."""
    text = _TAG.sub(" ", text)
    text = re.sub(r"\s+", " ", text)
    text = _SPACE_BEFORE_PUNC.sub(r"\1", text)
    text = text.lstrip(" ")
    if lang == "zh":
        text = re.sub(r"\s+", "", text)
    return text


# ----------------------------------------------------------------------------------------------
# Chinese: the speechio cn_tn TextNorm behaviour with every option off.
# ----------------------------------------------------------------------------------------------
_CN_DIGITS = "零一二三四五六七八九"
# (power of ten, character): the "mid" numbering system, 万 = 10^4, 亿 = 10^8, 兆 = 10^12, ...
_CN_UNITS = [(1, "十"), (2, "百"), (3, "千"), (4, "万")] + [
    (4 * (i + 2), c) for i, c in enumerate("亿兆京垓秭穰沟涧正载")
]
_CN_PUNCS = (
    "！？｡。"
    "＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃《》「」『』【】〔〕〖〗〘〙〚〛"
    "〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏·〈〉-"
)
_PUNCS_TO_SPACE = str.maketrans(_CN_PUNCS + string.punctuation, " " * len(_CN_PUNCS + string.punctuation))

_CURRENCY_UNITS = r"((亿|千万|百万|万|千|百)|(亿|千万|百万|万|千|百|)元|(亿|千万|百万|万|千|百|)块|角|毛|分)"
_MEASURE_WORDS = (
    "匹|张|座|回|场|尾|条|个|首|阙|阵|网|炮|顶|丘|棵|只|支|袭|辆|挑|担|颗|壳|窠|曲|墙|群|腔|砣|客|贯|扎|"
    "捆|刀|令|打|手|罗|坡|山|岭|江|溪|钟|队|单|双|对|出|口|头|脚|板|跳|枝|件|贴|针|线|管|名|位|身|堂|"
    "课|本|页|家|户|层|丝|毫|厘|分|钱|两|斤|铢|石|钧|锱|忽|(千|毫|微)克|寸|尺|丈|里|寻|常|铺|程|"
    "(千|分|厘|毫|微)米|撮|勺|合|升|斗|盘|碗|碟|叠|桶|笼|盆|盒|杯|斛|锅|簋|篮|罐|瓶|壶|卮|盏|箩|箱|"
    "煲|啖|袋|钵|年|月|日|季|刻|时|周|天|秒|旬|纪|岁|世|更|夜|春|夏|秋|冬|代|伏|辈|丸|泡|粒|幢|堆|"
    "根|道|面|片|块"
)
_DATE = re.compile(r"\D+((([089]\d|(19|20)\d{2})年)?(\d{1,2}月(\d{1,2}[日号])?)?)")
_MONEY = re.compile(r"\D+((\d+(\.\d+)?)[多余几]?" + _CURRENCY_UNITS + r"(\d" + _CURRENCY_UNITS + r"?)?)")
_MOBILE = re.compile(r"\D((\+?86 ?)?1([38]\d|5[0-35-9]|7[678]|9[89])\d{8})\D")
_LANDLINE = re.compile(r"\D((0(10|2[1-3]|[3-9]\d{2})-?)?[1-9]\d{6,7})\D")
_FRACTION = re.compile(r"(\d+/\d+)")
_PERCENT = re.compile(r"(\d+(\.\d+)?%)")
_NUM_MEASURE = re.compile(r"(\d+(\.\d+)?)[多余几]?(" + _MEASURE_WORDS + ")")
_DIGIT_STRING = re.compile(r"(\d{4,32})")
_NUMBER = re.compile(r"(\d+(\.\d+)?)")
_LETTER_2_LETTER = re.compile(r"(([a-zA-Z]+)二([a-zA-Z]+))")


def _spell_value(value: str) -> list:
    """Symbols of an integer string with units: ints are digits, ("u", power) are units.

    Leading zeros of a part become one 零 (e.g. "1001" -> 一 千 零 一), as cn_tn does.
    """
    stripped = value.lstrip("0")
    if not stripped:
        return []
    if len(stripped) == 1:
        return [0, int(stripped)] if len(value) != len(stripped) else [int(stripped)]
    power, char = next(u for u in reversed(_CN_UNITS) if u[0] < len(stripped))
    return _spell_value(value[:-power]) + [("u", power, char)] + _spell_value(stripped[-power:])


def num2chn(number: str, alt_two: bool = True, use_units: bool = True) -> str:
    """"12.5" -> "十二点五"; digits one by one when `use_units` is False ("2024" -> "二零二四")."""
    parts = number.split(".")
    if len(parts) > 2:
        raise ValueError(f"number with more than one dot: {number!r}")
    int_part, dec_part = parts[0], parts[1] if len(parts) == 2 else ""
    if use_units and len(int_part) > 1:
        symbols = _spell_value(int_part)
    else:
        symbols = [int(c) for c in int_part]
    if dec_part:
        symbols = symbols + ["."] + [int(c) for c in dec_part]
    out = []
    for i, s in enumerate(symbols):
        if isinstance(s, int):
            char = _CN_DIGITS[s]
            if alt_two and s == 2:
                # 两 before 百/千/万/亿... when the 2 does not follow 十 ("两千", but "二十", "十二").
                nxt = symbols[i + 1] if i + 1 < len(symbols) else None
                prev = symbols[i - 1] if i > 0 else None
                before_unit = isinstance(nxt, tuple) and nxt[1] != 1
                if before_unit and (prev is None or (isinstance(prev, tuple) and prev[1] != 1)):
                    char = "两"
            out.append(char)
        elif isinstance(s, tuple):
            out.append(s[2])
        else:
            out.append("点")
    result = "".join(out)
    if result.startswith("点"):
        return "零" + result
    if len(result) >= 2 and result[0] == "一" and result[1] == "十":  # 10..19 read 十, 十一...
        result = result[1:]
    return result


def _date_to_chn(date: str) -> str:
    try:
        year, other = date.strip().split("年", 1)
        year = num2chn(year, alt_two=False, use_units=False) + "年"
    except ValueError:
        other, year = date, ""
    month = day = ""
    if other:
        try:
            month, day = other.strip().split("月", 1)
            month = num2chn(month) + "月"
        except ValueError:
            day, month = date, ""
        if day:
            day = num2chn(day[:-1]) + day[-1]
    return year + month + day


def _money_to_chn(money: str) -> str:
    for m in _NUMBER.findall(money):
        money = money.replace(m[0], num2chn(m[0]))
    return money


def _phone_to_chn(phone: str, landline: bool) -> str:
    parts = phone.split("-") if landline else phone.strip("+").split()
    return "".join(num2chn(p, alt_two=False, use_units=False) for p in parts)


def normalize_nsw(raw: str) -> str:
    """Non-standard words (numbers, dates, money, phones...) -> Chinese characters."""
    text = "^" + raw + "$"
    for m in _DATE.findall(text):
        if m[0]:
            text = text.replace(m[0], _date_to_chn(m[0]), 1)
    for m in _MONEY.findall(text):
        text = text.replace(m[0], _money_to_chn(m[0]), 1)
    for m in _MOBILE.findall(text):
        text = text.replace(m[0], _phone_to_chn(m[0], landline=False), 1)
    for m in _LANDLINE.findall(text):
        text = text.replace(m[0], _phone_to_chn(m[0], landline=True), 1)
    for m in _FRACTION.findall(text):
        num, den = m.split("/")
        text = text.replace(m, num2chn(den) + "分之" + num2chn(num), 1)
    text = text.replace("％", "%")
    for m in _PERCENT.findall(text):
        text = text.replace(m[0], "百分之" + num2chn(m[0].strip().strip("%")), 1)
    for m in _NUM_MEASURE.findall(text):
        text = text.replace(m[0], num2chn(m[0]), 1)
    for m in _DIGIT_STRING.findall(text):
        text = text.replace(m, num2chn(m, alt_two=False, use_units=False), 1)
    for m in _NUMBER.findall(text):
        text = text.replace(m[0], num2chn(m[0]), 1)
    for m in _LETTER_2_LETTER.findall(text):  # keep P2P, B2B, O2O as written
        text = text.replace(m[0], m[1] + "2" + m[2], 1)
    return text.lstrip("^").rstrip("$")


def chinese_text_norm(text: str) -> str:
    """speechio `TextNorm()` with every option off: NSW rewrite, then punctuation -> space."""
    return normalize_nsw(text).translate(_PUNCS_TO_SPACE)


# ----------------------------------------------------------------------------------------------
# The per-language chain and the evaluation tokenizer.
# ----------------------------------------------------------------------------------------------
# Contractions the PyPI `whisper-normalizer` (0.1.x) expands but OpenAI Whisper's
# normalizers/english.py, which Qwen2-Audio's eval_audio vendors ("borrowed from Whisper",
# EVALUATION.md), does not: with them "kinda" scores as two words and "cause" == "because".
_NOT_IN_WHISPER = (r"\bkinda\b", r"\bsorta\b", r"\bdunno\b", r"\bcause\b")


@lru_cache(maxsize=1)
def _whisper_normalizers():
    # Imported lazily: only scoring needs the eval extra.
    from whisper_normalizer.basic import BasicTextNormalizer
    from whisper_normalizer.english import EnglishTextNormalizer

    english = EnglishTextNormalizer()
    for pattern in _NOT_IN_WHISPER:
        english.replacers.pop(pattern, None)
    return english, BasicTextNormalizer()


def english_normalize(text: str) -> str:
    return _whisper_normalizers()[0](text)


def basic_normalize(text: str) -> str:
    return _whisper_normalizers()[1](text)


def to_simplified(text: str) -> str:
    import zhconv

    return zhconv.convert(text, "zh-cn")


def language_normalize(text: str, lang: str) -> str:
    """Step 2 of the chain, with the official script's if/else structure kept literally."""
    if lang == "yue":
        text = to_simplified(text)
    if lang == "en":
        text = english_normalize(text)
    if lang == "zh":
        text = chinese_text_norm(text)
    else:  # en gets this too, after the English normaliser: the official code does the same
        text = basic_normalize(text)
    return text


def _is_punctuation_token(token: str) -> bool:
    # all() of an empty token is True, so empty tokens from double spaces go as well.
    return all(unicodedata.category(c)[0] == "P" for c in token)


def evaluation_tokenize(text: str) -> list[str]:
    """fairseq EvaluationTokenizer("none", lowercase=True, punctuation_removal=True), then split()."""
    kept = " ".join(t for t in text.split(" ") if not _is_punctuation_token(t))
    return kept.lower().split()


def wer_tokens(text: str, lang: str) -> list[str]:
    """The units an ASR output is scored in: words, or characters for zh and yue."""
    tokens = evaluation_tokenize(language_normalize(remove_sp(text, lang), lang))
    if lang in ("zh", "yue"):
        return list("".join(tokens))
    return tokens


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def answer_normalize(text: str, lang: str = "en") -> str:
    """Short answers (lalm's own tasks): Whisper normalisers, so "Twelve." == "12"."""
    text = remove_sp(text, lang).strip()
    if lang == "en":
        # Articles carry no answer ("A bell." is "bell"), as SQuAD-style answer matching drops them.
        text = _ARTICLES.sub(" ", english_normalize(text))
    if lang in ("zh", "yue"):
        text = chinese_text_norm(to_simplified(text))
        return "".join(evaluation_tokenize(text))
    return " ".join(evaluation_tokenize(basic_normalize(text)))
