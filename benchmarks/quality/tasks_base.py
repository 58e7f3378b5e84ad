"""The records of the task suite and the small helpers the task modules share.

A task is an instruction and a generator ``make(rng) -> (input, output)``; the output is a function of
the input text alone (never of hidden state), so a model can learn it and a test can check it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

VOWELS = "aeiou"
CONSONANTS = "bcdfghjklmnprstvwz"  # no q, x, y: pseudo-words stay pronounceable
_SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


@dataclass(frozen=True)
class Example:
    """One instance of a task: what the model is told, what it reads, and the reference answer."""

    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Task:
    """A task: a unique snake_case name, a category, an instruction and an example generator."""

    name: str
    category: str
    instruction: str
    make: Callable[[random.Random], tuple[str, str]]

    def __post_init__(self) -> None:
        if not _SNAKE.match(self.name):
            raise ValueError(f"task name {self.name!r} is not snake_case")


def join(items: Iterable[object], sep: str = ", ") -> str:
    """``items`` as strings joined by ``sep``."""
    return sep.join(str(x) for x in items)


def spaced(word: str) -> str:
    """Letters separated by spaces (``"cat"`` -> ``"c a t"``): one token per letter for the model."""
    return " ".join(word)


def pseudo_word(rng: random.Random, lo: int = 4, hi: int = 7) -> str:
    """A pronounceable made-up word of ``lo``..``hi`` letters (alternating consonants and vowels)."""
    n = rng.randint(lo, hi)
    start = rng.random() < 0.7  # most start with a consonant
    return "".join(rng.choice(CONSONANTS if (i % 2 == 0) == start else VOWELS) for i in range(n))


def random_letters(rng: random.Random, lo: int = 4, hi: int = 7, alphabet: str = "abcdefghijklmnopqrstuvwxyz") -> str:
    """``lo``..``hi`` letters drawn independently from ``alphabet``."""
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def distinct_ints(rng: random.Random, lo_n: int, hi_n: int, lo: int, hi: int) -> list[int]:
    """``lo_n``..``hi_n`` distinct integers from ``lo``..``hi``, in random order."""
    return rng.sample(range(lo, hi + 1), rng.randint(lo_n, hi_n))


def decimal_str(units: int, places: int) -> str:
    """``units / 10**places`` written without trailing zeros (``decimal_str(250, 3) == "0.25"``)."""
    sign, units = ("-", -units) if units < 0 else ("", units)
    whole, frac = divmod(units, 10**places)
    frac_str = str(frac).rjust(places, "0").rstrip("0") if places else ""
    return f"{sign}{whole}.{frac_str}" if frac_str else f"{sign}{whole}"


def article(word: str) -> str:
    """``"an"`` before a vowel letter, else ``"a"`` (the vocabulary avoids words where this is wrong)."""
    return "an" if word[0] in VOWELS else "a"


def ordinal(n: int) -> str:
    """``1 -> "1st"``, ``12 -> "12th"``, ``23 -> "23rd"``."""
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def balanced(
    rng: random.Random, labels: Sequence[str], draw: Callable[[random.Random], str], label_of: Callable[[str], str]
) -> tuple[str, str]:
    """An input of a uniformly drawn label: redraw ``draw`` until ``label_of`` gives that label."""
    want = rng.choice(labels)
    for _ in range(10_000):
        x = draw(rng)
        if label_of(x) == want:
            return x, want
    raise RuntimeError(f"could not draw an input labelled {want!r}")
