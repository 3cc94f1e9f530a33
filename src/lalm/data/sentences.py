"""English text for the ASR and voice-chat tasks: a sentence generator with a broad vocabulary.

Targets are lower-case words without punctuation (numbers spelled out), which is what the
synthesisers say and what WER scoring normalises to anyway. Kinds of text:
- `everyday`: grammatical sentences from templates over a hand-written lexicon;
- `long`: two such clauses joined (8-20 words);
- `wordlist`: 4-9 words drawn from the `wordfreq` top-20k English list (broad coverage);
- `number`, `letters`, `nato`, `date`, `command`, `cards`: short domain utterances.
The eval sets draw from the same generators with other seeds; `build.py` keeps them disjoint.
"""

# ruff: noqa: SIM905  (word lists read better as one string split on spaces)

from __future__ import annotations

import random
import re

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
MONTHS = ("january february march april may june july august september october november "
          "december").split()
ORDINALS = ("first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth "
            "thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth "
            "twentieth").split()
NATO = ("alfa bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike november "
        "oscar papa quebec romeo sierra tango uniform victor whiskey x-ray yankee zulu").split()
LETTERS = list("abcdefghijklmnopqrstuvwxyz")
# What to say for a letter name: synthesisers read a lone "a" as the article.
LETTER_NAMES = dict(zip(LETTERS, (
    "ay bee see dee ee eff jee aitch eye jay kay el em en oh pee queue are ess tee you vee "
    "double-you ex why zed").split()))

NAMES = ("anna ben carla david emma frank grace henry isabel jack kate leo maria nick olivia "
         "peter rosa sam tom uma victor wendy james sarah michael laura daniel helen paul lucy "
         "mark alice john mary robert susan george linda thomas nancy").split()
PLACES = ("london paris berlin madrid rome tokyo cairo sydney boston chicago dublin oslo "
          "vienna lisbon toronto denver seattle the station the market the office the park "
          "the library the school the beach the airport the hospital the garden the kitchen "
          "the village the harbour the bridge the museum the bakery the farm").split(" ")
PLACES = [p for p in " ".join(PLACES).replace("the ", "the_").split()]
NOUNS = ("apple bag ball bank bed bike bird boat book bottle box boy bread brother bus cake "
         "camera car card cat chair child city clock coat computer cup dog door dress egg "
         "engine eye face family farmer father field finger fire fish floor flower friend "
         "game girl glass hand hat horse house idea island jacket key king lamp letter light "
         "lion machine man map meeting message milk minute mirror money moon morning mother "
         "mountain mouse music name newspaper night nurse ocean orange page painting paper "
         "pen pencil phone piano picture plane plate pocket question radio rain river road "
         "rock room school sea seat shirt shoe shop singer sister sky song star stone story "
         "street student sun table teacher ticket tiger town train tree truck umbrella "
         "village voice wall watch water window winter woman word world year doctor driver "
         "kitten puppy sandwich blanket candle basket ladder pillow wallet bucket "
         "hammer garden forest valley desert storm cloud island castle tower bridge tunnel "
         "engineer captain soldier pilot farmer baker lawyer artist writer chef").split()
ADJS = ("big small old new young long short tall happy sad quiet loud bright dark warm cold "
        "hot cool clean dirty heavy light fast slow early late rich poor strong weak soft "
        "hard sweet bitter fresh empty full busy lazy kind angry brave calm careful clever "
        "curious famous friendly funny gentle honest hungry lucky nervous polite proud "
        "serious simple strange tired wild wise red blue green yellow white black brown "
        "purple golden silver wooden broken hidden ancient modern huge tiny narrow wide "
        "deep shallow smooth rough sharp round square lovely ugly expensive cheap").split()
# (base, third person, past, -ing)
VERBS = [tuple(v.split("/")) for v in (
    "see/sees/saw/seeing find/finds/found/finding take/takes/took/taking make/makes/made/making "
    "bring/brings/brought/bringing buy/buys/bought/buying sell/sells/sold/selling "
    "carry/carries/carried/carrying open/opens/opened/opening close/closes/closed/closing "
    "paint/paints/painted/painting clean/cleans/cleaned/cleaning fix/fixes/fixed/fixing "
    "watch/watches/watched/watching read/reads/read/reading write/writes/wrote/writing "
    "draw/draws/drew/drawing hold/holds/held/holding push/pushes/pushed/pushing "
    "pull/pulls/pulled/pulling throw/throws/threw/throwing catch/catches/caught/catching "
    "follow/follows/followed/following visit/visits/visited/visiting need/needs/needed/needing "
    "want/wants/wanted/wanting like/likes/liked/liking love/loves/loved/loving "
    "hate/hates/hated/hating borrow/borrows/borrowed/borrowing lose/loses/lost/losing "
    "wash/washes/washed/washing cook/cooks/cooked/cooking order/orders/ordered/ordering "
    "check/checks/checked/checking move/moves/moved/moving build/builds/built/building "
    "break/breaks/broke/breaking drop/drops/dropped/dropping hide/hides/hid/hiding "
    "show/shows/showed/showing send/sends/sent/sending keep/keeps/kept/keeping").split()]
INTRANS = [tuple(v.split("/")) for v in (
    "sleep/sleeps/slept/sleeping run/runs/ran/running walk/walks/walked/walking "
    "sing/sings/sang/singing dance/dances/danced/dancing laugh/laughs/laughed/laughing "
    "wait/waits/waited/waiting work/works/worked/working swim/swims/swam/swimming "
    "smile/smiles/smiled/smiling arrive/arrives/arrived/arriving leave/leaves/left/leaving "
    "rest/rests/rested/resting travel/travels/travelled/travelling talk/talks/talked/talking "
    "listen/listens/listened/listening study/studies/studied/studying").split()]
ADVS = ("quickly slowly quietly loudly carefully happily suddenly slowly again today "
        "yesterday tomorrow tonight outside inside early late together alone often never "
        "always sometimes already soon").split()
TIMES = ("in the morning", "at night", "after lunch", "before dinner", "last week", "next year",
         "on monday", "every day", "this evening", "in the summer", "at noon", "on the weekend")
COMMANDS = ("turn on the lights", "turn off the radio", "open the door", "close the window",
            "stop the music", "play the next song", "call my sister", "set an alarm",
            "go forward", "go back", "turn left", "turn right", "move up", "move down",
            "start the engine", "stop here", "wait a moment", "pause the video",
            "volume up", "volume down", "take a picture", "read my messages", "lock the door",
            "go to sleep", "wake me up", "show the map", "cancel that", "say it again")
SUITS = ("clubs", "hearts", "spades", "diamonds")
RANKS = ("ace", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "jack", "queen", "king")


def number_words(n: int) -> str:
    """0 <= n < 1,000,000 -> 'four hundred and two' style words (no hyphens)."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))
    rest = n % 1000
    head = number_words(n // 1000) + " thousand"
    if rest == 0:
        return head
    return head + (" and " if rest < 100 else " ") + number_words(rest)


_WORD_RE = re.compile(r"^[a-z]{2,14}$")
_VOWEL_RE = re.compile(r"[aeiouy]")
# Contractions with the apostrophe stripped, abbreviations and words not wanted in a corpus.
_SKIP = set("im ive ill id dont doesnt didnt cant wont isnt arent wasnt ain th nd rd st uk us "
            "usa tv ok pm am vs etc dr mr mrs ms jr sr co inc ltd www com org net http https "
            "porn sex sexy fuck fucking shit nude nigga nigger bitch dick pussy cock ass xxx "
            "fucked whore slut rape gay lol omg wtf".split())
_IRREGULAR = {"man": "men", "woman": "women", "child": "children", "mouse": "mice",
              "foot": "feet", "tooth": "teeth", "person": "people", "fish": "fish"}


def plural(noun: str) -> str:
    if noun in _IRREGULAR:
        return _IRREGULAR[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def wordfreq_vocab(n: int = 20000) -> list[str]:
    """The top-n English words of `wordfreq`, letters only (the list the generator draws from)."""
    from wordfreq import top_n_list

    words = [w for w in top_n_list("en", n)
             if _WORD_RE.match(w) and _VOWEL_RE.search(w) and w not in _SKIP
             and (len(w) > 2 or w in ("an", "as", "at", "be", "by", "do", "go", "he", "if",
                                      "in", "is", "it", "me", "my", "no", "of", "on", "or",
                                      "so", "to", "up", "we"))]
    return words + ["a", "i"]


def _np(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.15:
        return rng.choice(NAMES)
    noun = rng.choice(NOUNS)
    det = rng.choice(("the", "the", "a", "my", "your", "our", "this", "that", "his", "her"))
    if det == "a" and noun[0] in "aeiou":
        det = "an"
    if rng.random() < 0.45:
        adj = rng.choice(ADJS)
        if det == "an" and adj[0] not in "aeiou":
            det = "a"
        if det == "a" and adj[0] in "aeiou":
            det = "an"
        return f"{det} {adj} {noun}"
    return f"{det} {noun}"


def _place(rng: random.Random) -> str:
    return rng.choice(PLACES).replace("_", " ")


def everyday(rng: random.Random) -> str:
    """One grammatical sentence from a dozen shapes over the lexicon."""
    s, o = _np(rng), _np(rng)
    v, iv = rng.choice(VERBS), rng.choice(INTRANS)
    shape = rng.randrange(14)
    if shape == 0:
        return f"{s} {v[2]} {o} {rng.choice(TIMES)}"
    if shape == 1:
        return f"{s} {v[1]} {o} every day"
    if shape == 2:
        return f"{s} is {v[3]} {o} at {_place(rng)}"
    if shape == 3:
        return f"did you {v[0]} {o} {rng.choice(TIMES)}"
    if shape == 4:
        return f"please {v[0]} {o} {rng.choice(ADVS)}"
    if shape == 5:
        return f"{s} {iv[2]} {rng.choice(ADVS)} near {_place(rng)}"
    if shape == 6:
        return f"i think {s} will {iv[0]} {rng.choice(TIMES)}"
    if shape == 7:
        return f"{s} is {rng.choice(ADJS)} and {rng.choice(ADJS)}"
    if shape == 8:
        return f"we went to {_place(rng)} with {rng.choice(NAMES)} {rng.choice(TIMES)}"
    if shape == 9:
        return f"there are {number_words(rng.randrange(2, 40))} {plural(rng.choice(NOUNS))} in {_place(rng)}"
    if shape == 10:
        return f"why does {s} {v[0]} {o}"
    if shape == 11:
        return f"{rng.choice(NAMES)} said that {s} {v[2]} {o}"
    if shape == 12:
        return f"the {rng.choice(NOUNS)} was {rng.choice(ADJS)} but {s} {iv[2]}"
    return f"when {s} {iv[1]} {rng.choice(NAMES)} {iv[1]} too"


def wordlist(rng: random.Random, vocab: list[str]) -> str:
    """4-9 words from the frequency list: no grammar, broad vocabulary."""
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(4, 9)))


def number(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.4:
        return number_words(rng.randrange(0, 100))
    if r < 0.7:
        return number_words(rng.randrange(100, 10000))
    if r < 0.85:  # a digit string, e.g. a phone number or a code
        return " ".join(ONES[rng.randrange(10)] for _ in range(rng.randint(3, 7)))
    return number_words(rng.randrange(10000, 1000000))


def letters(rng: random.Random) -> str:
    return " ".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 6)))


def nato(rng: random.Random) -> str:
    return " ".join(rng.choice(NATO) for _ in range(rng.randint(2, 5)))


def date(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.3:
        return rng.choice(DAYS)
    if r < 0.5:
        return rng.choice(MONTHS)
    if r < 0.8:
        return f"{rng.choice(DAYS)} the {rng.choice(ORDINALS)} of {rng.choice(MONTHS)}"
    return f"{rng.choice(MONTHS)} {number_words(rng.randrange(1, 29))} {number_words(rng.randrange(1990, 2031))}"


def command(rng: random.Random) -> str:
    c = rng.choice(COMMANDS)
    if c.startswith("go ") and rng.random() < 0.5:
        c += f" {number_words(rng.randrange(2, 30))} {rng.choice(('meters', 'steps', 'feet'))}"
    return c


def cards(rng: random.Random) -> str:
    hand = [f"{rng.choice(RANKS)} of {rng.choice(SUITS)}" for _ in range(rng.randint(1, 3))]
    return " ".join(hand)


# kind -> share of the English ASR text (sums to 1)
KIND_WEIGHTS = {"everyday": 0.38, "long": 0.08, "wordlist": 0.23, "number": 0.08,
                "letters": 0.04, "nato": 0.04, "date": 0.05, "command": 0.06, "cards": 0.04}


def spoken(kind: str, text: str) -> str:
    """The text to synthesise for a target: letter names for spelled letters."""
    if kind == "letters":
        return ", ".join(LETTER_NAMES[c] for c in text.split())
    return text


def sentence(rng: random.Random, vocab: list[str], kind: str | None = None) -> tuple[str, str]:
    """(kind, text) for one ASR utterance."""
    if kind is None:
        kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    if kind == "wordlist":
        return kind, wordlist(rng, vocab)
    if kind == "long":  # two clauses, 8-20 words, like the longer real-speech sentences
        joint = rng.choice(("and", "but", "because", "so", "while", "after"))
        return kind, f"{everyday(rng)} {joint} {everyday(rng)}"
    fn = {"everyday": everyday, "number": number, "letters": letters, "nato": nato,
          "date": date, "command": command, "cards": cards}[kind]
    return kind, " ".join(fn(rng).split())
