"""Spoken questions with exact short answers, for voice chat (and DPO pairs).

Answers are lower case; numbers are digits ("12"). Kinds: arithmetic, spelling, comparison,
counting, and facts from the small tables below (written for this project).
`question(rng)` -> (kind, spoken question, answer, wrong answer).
"""

from __future__ import annotations

import random

from lalm.data.sentences import DAYS, MONTHS, NOUNS, number_words

CAPITALS = {"france": "paris", "germany": "berlin", "spain": "madrid", "italy": "rome",
            "japan": "tokyo", "egypt": "cairo", "norway": "oslo", "austria": "vienna",
            "portugal": "lisbon", "ireland": "dublin", "england": "london", "russia": "moscow",
            "china": "beijing", "greece": "athens", "poland": "warsaw", "sweden": "stockholm",
            "canada": "ottawa", "kenya": "nairobi", "peru": "lima", "cuba": "havana",
            "finland": "helsinki", "denmark": "copenhagen", "belgium": "brussels",
            "hungary": "budapest", "thailand": "bangkok", "india": "delhi", "mexico": "mexico city",
            "argentina": "buenos aires", "australia": "canberra", "turkey": "ankara"}
ANIMAL_SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa",
                 "pig": "oink", "owl": "hoot", "lion": "roar", "horse": "neigh", "snake": "hiss",
                 "bee": "buzz", "frog": "croak", "mouse": "squeak", "rooster": "cockadoodledoo"}
LEGS = {"spider": 8, "dog": 4, "bird": 2, "cat": 4, "ant": 6, "horse": 4, "chicken": 2,
        "octopus": 8, "snake": 0, "fish": 0, "cow": 4, "bee": 6, "duck": 2, "human": 2}
COLOURS = {"the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow",
           "coal": "black", "a tomato": "red", "an orange": "orange", "chocolate": "brown",
           "a lemon": "yellow", "milk": "white", "a strawberry": "red", "the sun": "yellow"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad",
             "old": "young", "open": "closed", "light": "dark", "early": "late", "wet": "dry",
             "hard": "soft", "loud": "quiet", "full": "empty", "rich": "poor", "left": "right",
             "high": "low", "long": "short", "strong": "weak", "yes": "no", "day": "night",
             "in": "out", "first": "last", "win": "lose", "clean": "dirty"}
# (name, weight rank): higher = heavier / bigger
SIZES = {"mouse": 1, "cat": 3, "dog": 4, "sheep": 5, "horse": 7, "elephant": 9, "whale": 10,
         "ant": 0, "rabbit": 2, "cow": 7, "giraffe": 8, "bee": 0, "chicken": 2, "bear": 6}
COUNTS = {"days in a week": 7, "months in a year": 12, "hours in a day": 24,
          "minutes in an hour": 60, "seconds in a minute": 60, "days in a year": 365,
          "letters in the english alphabet": 26, "sides on a triangle": 3,
          "sides on a square": 4, "wheels on a bicycle": 2, "players on a football team": 11,
          "strings on a violin": 4, "continents on earth": 7, "colours in a rainbow": 7,
          "legs on a table": 4, "cards in a deck": 52, "planets in the solar system": 8,
          "weeks in a year": 52, "sides on a hexagon": 6, "years in a century": 100}

_OPS = (("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b),
        ("times", lambda a, b: a * b))


def _arith(rng):
    name, fn = rng.choice(_OPS)
    # Small operands: a few hundred facts per operation, so a tiny model can learn them all
    # from the corpus; held-out questions ask the same facts in other words.
    if name == "times":
        a, b = rng.randrange(2, 11), rng.randrange(2, 11)
    else:
        a, b = rng.randrange(0, 21), rng.randrange(0, 21)
        if name == "minus" and b > a:
            a, b = b, a
    ans = fn(a, b)
    q = f"{rng.choice(('what is', 'what is', 'how much is', 'calculate', 'what do you get for'))} " \
        f"{number_words(a)} {name} {number_words(b)}"
    return q, str(ans), str(ans + rng.choice((-10, -2, -1, 1, 2, 10)) if ans > 10 else ans + 1)


def _spell(rng):
    w = rng.choice([n for n in NOUNS if 3 <= len(n) <= 7])
    q = rng.choice((f"how do you spell {w}", f"spell the word {w}", f"can you spell {w}",
                    f"please spell {w}"))
    wrong = list(w)
    i = rng.randrange(len(wrong))
    wrong[i] = "e" if wrong[i] != "e" else "a"
    return q, " ".join(w), " ".join(wrong)


def _compare(rng):
    if rng.random() < 0.5:
        a, b = rng.sample(range(100), 2)
        big = rng.random() < 0.5
        word = rng.choice(("bigger", "larger", "greater")) if big else "smaller"
        ans = max(a, b) if big else min(a, b)
        other = min(a, b) if big else max(a, b)
        q = f"which is {word} {number_words(a)} or {number_words(b)}"
        return q, str(ans), str(other)
    a, b = rng.sample(sorted(SIZES), 2)
    while SIZES[a] == SIZES[b]:
        a, b = rng.sample(sorted(SIZES), 2)
    heavy = rng.random() < 0.5
    word = rng.choice(("heavier", "bigger")) if heavy else rng.choice(("lighter", "smaller"))
    hi, lo = (a, b) if SIZES[a] > SIZES[b] else (b, a)
    ans, other = (hi, lo) if heavy else (lo, hi)
    art = lambda x: ("an " if x[0] in "aeiou" else "a ") + x
    return f"which is {word} {art(a)} or {art(b)}", ans, other


def _count(rng):
    r = rng.random()
    if r < 0.4:
        w = rng.choice(NOUNS)
        q = rng.choice((f"how many letters are in the word {w}",
                        f"how many letters does {w} have", f"count the letters in {w}"))
        return q, str(len(w)), str(len(w) + rng.choice((-1, 1)))
    if r < 0.7:
        thing, n = rng.choice(sorted(COUNTS.items()))
        q = rng.choice((f"how many {thing} are there", f"how many {thing}",
                        f"tell me how many {thing} there are"))
        return q, str(n), str(n + rng.choice((-1, 1, 2)))
    animal, n = rng.choice(sorted(LEGS.items()))
    art = "an" if animal[0] in "aeiou" else "a"
    q = rng.choice((f"how many legs does {art} {animal} have", f"how many legs has {art} {animal}"))
    return q, str(n), str(n + 2)


def _fact(rng):
    r = rng.randrange(6)
    if r == 0:
        c, cap = rng.choice(sorted(CAPITALS.items()))
        q = rng.choice((f"what is the capital of {c}", f"what's the capital city of {c}",
                        f"name the capital of {c}", f"which city is the capital of {c}"))
        return q, cap, rng.choice([v for v in CAPITALS.values() if v != cap])
    if r == 1:
        a, s = rng.choice(sorted(ANIMAL_SOUNDS.items()))
        q = rng.choice((f"what sound does a {a} make", f"what does a {a} say",
                        f"which sound does a {a} make"))
        return q, s, rng.choice([v for v in ANIMAL_SOUNDS.values() if v != s])
    if r == 2:
        t, c = rng.choice(sorted(COLOURS.items()))
        q = rng.choice((f"what colour is {t}", f"what color is {t}", f"which colour is {t}"))
        return q, c, rng.choice([v for v in sorted(set(COLOURS.values())) if v != c])
    if r == 3:
        w, o = rng.choice(sorted(OPPOSITES.items()))
        if rng.random() < 0.5:
            w, o = o, w
        q = rng.choice((f"what is the opposite of {w}", f"what's the opposite of {w}",
                        f"give me the opposite of {w}"))
        return q, o, w
    seq = DAYS if r == 4 else MONTHS
    i = rng.randrange(len(seq))
    unit = "day" if r == 4 else "month"
    if rng.random() < 0.5:
        q = rng.choice((f"what {unit} comes after {seq[i]}", f"which {unit} follows {seq[i]}"))
        return q, seq[(i + 1) % len(seq)], seq[(i + 2) % len(seq)]
    q = rng.choice((f"what {unit} comes before {seq[i]}", f"which {unit} is before {seq[i]}"))
    return q, seq[i - 1], seq[(i + 1) % len(seq)]


KINDS = {"arithmetic": _arith, "spelling": _spell, "comparison": _compare, "counting": _count,
         "fact": _fact}


def question(rng: random.Random, kind: str | None = None) -> tuple[str, str, str, str]:
    """(kind, spoken question, exact answer, plausible wrong answer)."""
    kind = kind or rng.choice(list(KINDS))
    q, ans, wrong = KINDS[kind](rng)
    if wrong == ans:
        wrong = ans + "s"
    return kind, q, ans, wrong
