"""Each benchmark reader on a miniature copy of its released layout, built here with generated audio.

Run: .venv/bin/pytest -q tests/test_eval_adapters.py
"""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lalm.errors import AudioError, ConfigError
from lalm.eval import adapters
from lalm.eval.runner import conversation


def _tone(path: Path, seconds: float = 0.1, freq: float = 440.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(path, (0.1 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)
    return path


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_librispeech(tmp_path):
    root = tmp_path / "LibriSpeech"
    for split in ("test-clean", "dev-other"):
        chap = root / split / "1089" / "134686"
        _write(chap / "1089-134686.trans.txt", "1089-134686-0000 HE HOPED THERE WOULD BE STEW\n"
                                               "1089-134686-0001 STUFF IT INTO YOU\n")
        _tone(chap / "1089-134686-0000.flac")
        _tone(chap / "1089-134686-0001.flac")
    assert adapters.detect(tmp_path) == "librispeech"
    items = adapters.load(tmp_path)
    assert [it.source for it in items] == ["librispeech_dev_other"] * 2 + ["librispeech_test_clean"] * 2
    it = items[2]
    assert (it.id, it.task, it.lang, it.reference) == ("1089-134686-0000", "asr", "en", "HE HOPED THERE WOULD BE STEW")
    assert Path(it.audio[0]).is_file() and Path(it.audio[0]).is_absolute()
    assert it.prompt == "Detect the language and recognize the speech: <|en|>"
    assert conversation(it, "base") == {
        "prompt": "<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech: <|en|>",
        "audios": [it.audio[0]]}
    assert conversation(it, "instruct") == [{"role": "user", "content": [
        {"type": "audio", "audio": it.audio[0]}, {"type": "text", "text": "Transcribe this audio."}]}]
    assert len(adapters.load(tmp_path, limit=1)) == 2  # one per source
    (root / "test-clean" / "1089" / "134686" / "1089-134686-0001.flac").unlink()
    with pytest.raises(AudioError, match="1089-134686-0001"):
        adapters.load(tmp_path)


def test_common_voice(tmp_path):
    for locale, sentence in (("zh-CN", "今天天气很好"), ("yue", "今日天氣好好"), ("fr", "Bonjour à tous")):
        d = tmp_path / "cv-corpus-15.0-2023-09-08" / locale
        _write(d / "test.tsv", "client_id\tpath\tsentence\tup_votes\n"
                               f"abc\tcommon_voice_{locale}_1.mp3\t\"{sentence}\"\t2\n")
        _tone(d / "clips" / f"common_voice_{locale}_1.mp3".replace(".mp3", ".mp3"))
    assert adapters.detect(tmp_path) == "commonvoice"
    items = {it.source: it for it in adapters.load(tmp_path)}
    assert set(items) == {"cv15_zh", "cv15_yue", "cv15_fr"}
    assert items["cv15_fr"].reference == '"Bonjour à tous"'  # quoting off, as the release is read
    assert items["cv15_yue"].prompt.endswith("<|yue|>") and items["cv15_zh"].lang == "zh"


def test_fleurs(tmp_path):
    d = tmp_path / "fleurs" / "cmn_hans_cn"
    _write(d / "test.tsv", "1906\t10004.wav\t这是一个测试。\t这是一个测试\t这 是 一个 测试\t32000\tMALE\n")
    _tone(d / "audio" / "test" / "10004.wav")
    assert adapters.detect(tmp_path) == "fleurs"
    (it,) = adapters.load(tmp_path)
    assert (it.source, it.lang, it.reference, it.id) == ("fleurs_zh", "zh", "这是一个测试。", "10004")


def test_aishell2(tmp_path):
    for device in ("iOS", "Android", "Mic"):
        d = tmp_path / "AISHELL-2-EVAL" / device / "test"
        _write(d / "wav.scp", "IT0011W0001 wav/IT0011W0001.wav\n")
        _write(d / "trans.txt", "IT0011W0001\t换一首歌\n")
        _tone(d / "wav" / "IT0011W0001.wav")
    assert adapters.detect(tmp_path) == "aishell2"
    items = adapters.load(tmp_path)
    assert sorted(it.source for it in items) == ["aishell2_android_test", "aishell2_ios_test", "aishell2_mic_test"]
    assert all(it.reference == "换一首歌" and it.lang == "zh" for it in items)


def test_covost2(tmp_path):
    _write(tmp_path / "covost" / "covost_v2.en_zh.test.tsv",
           "path\tsentence\ttranslation\tclient_id\ncommon_voice_en_1.mp3\tGood morning.\t早上好。\tx\n")
    _write(tmp_path / "covost" / "covost_v2.fr_en.test.tsv",
           "path\tsentence\ttranslation\tclient_id\ncommon_voice_fr_1.mp3\tBonjour.\tHello.\tx\n")
    _tone(tmp_path / "cv-corpus-4" / "en" / "clips" / "common_voice_en_1.mp3")
    _tone(tmp_path / "cv-corpus-4" / "fr" / "clips" / "common_voice_fr_1.mp3")
    assert adapters.detect(tmp_path) == "covost2"
    items = {it.source: it for it in adapters.load(tmp_path)}
    zh = items["covost2_en_zh_test"]
    assert (zh.task, zh.lang, zh.src_lang, zh.reference) == ("s2tt", "zh", "en", "早上好。")
    assert zh.prompt == "Detect the language and translate the speech into Chinese: <|en|>"
    assert items["covost2_fr_en_test"].audio[0].endswith("fr/clips/common_voice_fr_1.mp3")


def test_meld(tmp_path):
    root = tmp_path / "MELD.Raw"
    _write(root / "test_sent_emo.csv",
           "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode\n"
           '1,"Why do all you\'re coffee mugs have numbers on the bottom?",Mark,surprise,positive,0,0,3,19\n'
           "2,Oh.,Rachel,neutral,neutral,0,1,3,19\n")
    clips = root / "output_repeated_splits_test"
    _tone(clips / "dia0_utt0.wav")
    _write(clips / "dia0_utt1.mp4", "not really a video")
    _tone(clips / "dia0_utt1.flac")  # an extracted track wins over the video
    assert adapters.detect(tmp_path) == "meld"
    items = adapters.load(tmp_path)
    assert [(it.id, it.reference, it.source) for it in items] == [("dia0_utt0", "surprise", "meld_test"),
                                                                  ("dia0_utt1", "neutral", "meld_test")]
    assert items[1].audio[0].endswith(".flac")
    assert items[0].prompt == "Recognize the emotion with keywords in English:"


def test_vocalsound(tmp_path):
    for name in ("f0003_0_cough", "m0100_2_throatclearing", "f0004_0_laughter"):
        _tone(tmp_path / "audio_16k" / f"{name}.wav")
    _tone(tmp_path / "audio_16k" / "unrelated.wav")
    assert adapters.detect(tmp_path) == "vocalsound"
    items = adapters.load(tmp_path)
    assert [it.reference for it in items] == ["Cough", "Laughter", "Throat clearing"]
    assert items[0].prompt == "Classify the human vocal sound to VocalSound in English:"
    assert {it.task for it in items} == {"vsc"}


def test_airbench_chat(tmp_path):
    chat = tmp_path / "AIR-Bench" / "Chat"
    meta = [{"task_name": "speech_QA", "dataset_name": "common_voice", "uniq_id": 7, "path": "a.wav",
             "question": "What does the speaker ask for?", "answer_gt": "A glass of water.",
             "meta_info": "A woman asks for a glass of water."}]
    _write(chat / "Chat_meta.json", json.dumps(meta))
    _tone(chat / "speech_QA_common_voice" / "a.wav")
    assert adapters.detect(tmp_path) == "airbench"
    (it,) = adapters.load(tmp_path)
    assert (it.id, it.source, it.task, it.question, it.reference, it.meta_info) == (
        "7", "speech_QA", "chat", "What does the speaker ask for?", "A glass of water.",
        "A woman asks for a glass of water.")
    assert conversation(it, "base")[0]["content"][1] == {"type": "text", "text": "What does the speaker ask for?"}


def test_official_jsonl(tmp_path):
    wav = _tone(tmp_path / "a.wav")
    f = _write(tmp_path / "asr" / "cv15_asr_fr_eval.jsonl", json.dumps({
        "audio": str(wav), "prompt": "Detect the language and recognize the speech: <|fr|>", "gt": "Bonjour",
        "source": "cv15_fr"}) + "\n")
    assert adapters.detect(f) == "official"
    (it,) = adapters.load(f)
    assert (it.task, it.lang, it.source, it.reference) == ("asr", "fr", "cv15_fr", "Bonjour")


def test_official_jsonl_without_a_language_tag_takes_the_source_language(tmp_path):
    """A prompt with no <|xx|> tag: the language comes from the dataset (official ds_collections),
    so a Chinese set is scored by characters, not as one English 'word'."""
    wav = _tone(tmp_path / "a.wav")
    rows = [("aishell2_test", "zh"), ("cv15_yue", "yue"), ("fleurs_zh", "zh"), ("librispeech_test_clean", "en")]
    f = _write(tmp_path / "asr" / "x.jsonl", "".join(json.dumps({
        "audio": str(wav), "prompt": "Recognize the speech.", "gt": "x", "source": src}) + "\n" for src, _ in rows))
    assert [it.lang for it in adapters.load(f)] == [lang for _, lang in rows]


def test_lalm_manifests_folder(tmp_path):
    _tone(tmp_path / "audio" / "q.wav")
    rows = {
        "asr_dev": {"id": "1", "source": "piper_joe", "task": "asr", "lang": "en", "reference": "hello there",
                    "messages": [{"role": "user", "content": [{"type": "audio", "audio": "../audio/q.wav"},
                                                              {"type": "text", "text": "Transcribe this audio."}]}]},
        "voice_chat_dev": {"id": "2", "source": "piper_joe_chat", "task": "voice_chat",
                           "messages": [{"role": "user", "content": [{"type": "audio", "audio": "../audio/q.wav"}]},
                                        {"role": "assistant", "content": "4"}]},
    }
    for name, row in rows.items():
        _write(tmp_path / "eval" / f"{name}.jsonl", json.dumps(row) + "\n")
    assert adapters.detect(tmp_path / "eval") == "manifests"
    items = adapters.load(tmp_path / "eval")
    assert [(it.task, it.reference) for it in items] == [("asr", "hello there"), ("voice_chat", "4")]
    # Grouped by eval set (the file), provenance kept beside.
    assert [(it.source, it.extra["origin"]) for it in items] == [("asr_dev", "piper_joe"),
                                                               ("voice_chat_dev", "piper_joe_chat")]
    audio = items[1].messages[0]["content"][0]["audio"]
    assert Path(audio).is_absolute() and Path(audio).is_file()
    assert len(items[1].messages) == 1  # the answer is the reference, not part of the prompt
    assert adapters.load(tmp_path / "eval", task="asr")[0].id == "1"
    _write(tmp_path / "bad" / "x.jsonl", '{"id": 1, "messages": []}\n')
    with pytest.raises(ConfigError, match="x.jsonl:1: field 'messages'"):
        adapters.load(tmp_path / "bad" / "x.jsonl")


def test_unknown_layout_is_a_clear_error(tmp_path):
    _write(tmp_path / "readme.txt", "nothing here")
    with pytest.raises(ConfigError, match="no known benchmark layout"):
        adapters.load(tmp_path)
