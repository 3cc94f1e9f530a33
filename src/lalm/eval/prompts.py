"""Prompts per task: the base model's official ones (spec section 4) and an Instruct variant.

The official eval jsonl files carry their prompts; the scripts prepend
`<|audio_bos|><|AUDIO|><|audio_eos|>` and feed the raw text to the *base* model (Qwen2-Audio
#135: the paper's ASR/S2TT numbers come from the base model). The ASR, MELD and VocalSound
prompts below are the ones third-party reproductions quote from those files; the S2TT one is
used by other third-party scripts and is unverified (spec section 4).

The Instruct variants are lalm's: short instructions in the style of the SFT data. The ASR
one is the canonical instruction the corpus trains on ("Transcribe this audio.").
"""

from __future__ import annotations

AUDIO_PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"

LANGUAGE_NAMES = {
    "en": "English", "zh": "Chinese", "yue": "Cantonese", "fr": "French", "de": "German",
    "es": "Spanish", "it": "Italian", "ja": "Japanese", "ru": "Russian", "pt": "Portuguese",
    "nl": "Dutch", "ar": "Arabic", "ko": "Korean", "tr": "Turkish", "fa": "Persian",
    "et": "Estonian", "mn": "Mongolian", "cy": "Welsh", "ca": "Catalan", "sl": "Slovenian",
    "lv": "Latvian", "sv": "Swedish", "ta": "Tamil", "id": "Indonesian",
}

# MELD's seven labels and VocalSound's six classes, as the scores compare them.
MELD_LABELS = ["neutral", "joy", "sadness", "anger", "surprise", "fear", "disgust"]
VOCALSOUND_LABELS = ["Laughter", "Sigh", "Cough", "Throat clearing", "Sneeze", "Sniff"]


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code, code)


def base_prompt(task: str, lang: str = "en", src_lang: str | None = None) -> str:
    """The raw text the base model sees after the audio (official eval prompts)."""
    if task == "asr":
        return f"Detect the language and recognize the speech: <|{lang}|>"
    if task == "s2tt":
        return f"Detect the language and translate the speech into {language_name(lang)}: <|{src_lang or 'en'}|>"
    if task == "ser":
        return "Recognize the emotion with keywords in English:"
    if task == "vsc":
        return "Classify the human vocal sound to VocalSound in English:"
    if task == "aac":
        return "Generate the caption in English:"
    raise KeyError(task)


def instruct_prompt(task: str, lang: str = "en", src_lang: str | None = None) -> str:
    """The text instruction given to an Instruct (chat) model beside the audio."""
    if task == "asr":
        return "Transcribe this audio."
    if task == "s2tt":
        return f"Translate the speech into {language_name(lang)}."
    if task == "ser":
        return (
            "What emotion does the speaker express? Answer with one word from: "
            + ", ".join(MELD_LABELS) + "."
        )
    if task == "vsc":
        return (
            "What human vocal sound is this? Answer with one of: "
            + ", ".join(VOCALSOUND_LABELS) + "."
        )
    if task == "aac":
        return "Describe this audio in one sentence."
    raise KeyError(task)
