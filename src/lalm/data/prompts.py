"""Task prompts: many paraphrases per task, in the style of the paper's Fig. 2.

The first entry of each canonical list is the instruction the embedded default is judged
with; `pick` returns it often enough that it is well represented in training.
"""

from __future__ import annotations

import random

ASR_CANONICAL = "Transcribe this audio."
COARSE_CANONICAL = "Is this speech, music, or another sound? Answer with one word."
SOUND_CANONICAL = "What sound is this? Answer with one word."

ASR = [ASR_CANONICAL, "Transcribe the speech.", "Recognize the speech and write it down.",
       "What does the speaker say?", "Write down what is said.", "Transcribe the audio clip.",
       "Please transcribe this recording.", "Convert this speech to text.",
       "What is being said in this audio?", "Give me a transcript of this audio.",
       "Write out the words you hear.", "Can you transcribe this?", "Speech to text, please.",
       "Recognize the speech in this audio.", "Type out what the person says."]
# Fig. 2 style: the language tag starts the target
ASR_LANG = ["Detect the language and recognize the speech:",
            "Detect the language and transcribe the speech:",
            "Identify the language, then transcribe:"]
LID = ["What language is spoken? Answer with one word.", "Which language is this?",
       "Identify the language of the speech.", "What language is the speaker using?",
       "Detect the language of this audio. Answer with one word.", "Name the spoken language."]
S2TT = ["Translate the speech into {lang}:", "Translate this audio into {lang}.",
        "What does the speaker say, in {lang}?", "Give an {lang} translation of the speech.",
        "Listen and translate into {lang}."]
GENDER = ["What is the gender of the speaker? Answer with one word.",
          "Is the speaker male or female?", "Is this a male or a female voice?",
          "Classify the speaker's gender."]
ACCENT = ["What accent does the speaker have? Answer with one word.",
          "Which English accent is this?", "Identify the speaker's accent.",
          "Where is this accent from? Answer with one word."]
RATE = ["Is the speaker talking slowly, at a normal pace, or fast? Answer with one word.",
        "How fast is the speech? Answer slow, normal or fast.",
        "Classify the speaking rate as slow, normal or fast."]
PITCH = ["Is the speaker's voice low, medium or high pitched? Answer with one word.",
         "How high is the voice? Answer low, medium or high.",
         "Classify the pitch of the voice as low, medium or high."]
COARSE = [COARSE_CANONICAL, "Is this audio speech, music, a sound, or silence? Answer with one word.",
          "What kind of audio is this: speech, music, sound or silence?",
          "Classify this audio as speech, music, sound or silence.",
          "Speech, music, or another sound? One word."]
SOUND = [SOUND_CANONICAL, "What is this sound? Answer with one word.",
         "Name the sound you hear in one word.", "Classify the sound event.",
         "Which sound is this?", "Identify the sound. Answer with one word.",
         "What do you hear? One word."]
DTMF = ["Which digits are dialed? Answer with the digits only.",
        "Decode these touch tones. Give the digits."]
NOISE_COLOUR = ["What colour of noise is this: white, pink or brown?",
                "Is this white, pink or brown noise? Answer with one word."]
MUSIC_CAPTION = ["Describe the music.", "Generate the caption in English:",
                 "Write a short caption for this music.", "Describe this piece of music."]
TEMPO = ["Is the tempo slow, medium or fast? Answer with one word.",
         "How fast is this music? Answer slow, medium or fast."]
BPM = ["What is the tempo in beats per minute? Answer with a number.",
       "Estimate the tempo in BPM."]
KEY = ["What key is this melody in?", "Name the key of this music.",
       "Detect the key of the melody."]
MODE = ["Is this melody in a major or a minor key? Answer with one word.",
        "Major or minor? One word."]
INSTRUMENT = ["What instrument plays this melody? Answer with one word.",
              "Which instrument is this? One word.", "Name the instrument."]
MIX_BACKGROUND = ["What is behind the speech: music or noise? Answer with one word.",
                  "Is there music or noise in the background? Answer with one word.",
                  "What can you hear behind the voice? One word."]
TURNS = ["How many different voices take turns in this audio? Answer with a number.",
         "How many speakers are there? Answer with a number.",
         "Count the speakers in this clip."]
VOICE_CHAT_TEXT = ["Answer the question in the audio.", "Listen and answer.",
                   "Answer the spoken question briefly.", "Please answer what is asked."]
WHICH_SPEECH = ["Which of the two clips contains speech? Answer 1 or 2.",
                "One of these clips is speech. Which one? Answer with the number."]
BOTH_ASR = ["Transcribe both clips.", "Write down what is said in each clip."]
SYSTEMS = ["You are a helpful assistant.", "You are a helpful assistant.",
           "You are a voice assistant. Answer briefly.", "You are a careful transcriber."]
HEDGES = ["I am not completely sure, but I think it might be {x}.",
          "It is hard to tell from this audio. Possibly {x}, but I cannot be certain.",
          "That's a great question! Let me think about it. The answer could be {x}, perhaps.",
          "I believe the answer is probably {x}, although I may be wrong."]


def pick(rng: random.Random, prompts: list[str], canonical_share: float = 0.0) -> str:
    """A random paraphrase; with `canonical_share` probability the first (canonical) one."""
    if canonical_share and rng.random() < canonical_share:
        return prompts[0]
    return rng.choice(prompts)
