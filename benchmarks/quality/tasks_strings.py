"""Text-surface tasks: letter-level string transforms, word-level operations and ciphers.

Letter-level tasks show words with their letters separated by spaces (``"p l a n e t"``), so a
subword tokenizer gives the model one token per letter; the made-up words come from a generator,
so there are always enough distinct inputs.
"""

from __future__ import annotations

import random
import string

from .tasks_base import VOWELS, Task, article, join, pseudo_word, random_letters, spaced
from .tasks_vocab import ADJECTIVES, ANTONYMS, NOUNS, VERBS

_WORDS = NOUNS + ADJECTIVES + VERBS
_ALPHABET = string.ascii_lowercase
MORSE = dict(zip(_ALPHABET, (
    ".- -... -.-. -.. . ..-. --. .... .. .--- -.- .-.. -- -. --- .--. --.- .-. ... - ..- ...- .-- -..- -.-- --.."
).split()))
NATO = dict(zip(_ALPHABET, (
    "Alpha Bravo Charlie Delta Echo Foxtrot Golf Hotel India Juliett Kilo Lima Mike November Oscar Papa "
    "Quebec Romeo Sierra Tango Uniform Victor Whiskey Xray Yankee Zulu"
).split()))
LEET = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"}


def caesar(text: str, shift: int) -> str:
    """Shift each lowercase letter ``shift`` places along the alphabet, wrapping; other characters stay."""
    return "".join(_ALPHABET[(_ALPHABET.index(c) + shift) % 26] if c in _ALPHABET else c for c in text)


def atbash(text: str) -> str:
    """Mirror the alphabet: a <-> z, b <-> y, ..."""
    return "".join(_ALPHABET[25 - _ALPHABET.index(c)] if c in _ALPHABET else c for c in text)


def pluralize(noun: str) -> str:
    """Regular English plural (``box -> boxes``, ``city -> cities``, ``key -> keys``)."""
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in VOWELS:
        return noun[:-1] + "ies"
    return noun + "s"


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return rng.sample(_WORDS, rng.randint(lo, hi))


def _words_unique_extreme(rng: random.Random, lo: int, hi: int, pick) -> list[str]:
    """Words in which ``pick`` (min or max) of the lengths is reached by exactly one word."""
    while True:
        ws = _words(rng, lo, hi)
        lengths = [len(w) for w in ws]
        if lengths.count(pick(lengths)) == 1:
            return ws


# ----------------------------------------------------------------------------------------- strings
def reverse_letters(rng):
    w = random_letters(rng, 4, 7)
    return spaced(w), spaced(w[::-1])


def spell_word(rng):
    w = pseudo_word(rng, 4, 8)
    return w, spaced(w)


def join_letters(rng):
    w = pseudo_word(rng, 4, 8)
    return spaced(w), w


def remove_vowels(rng):
    w = pseudo_word(rng, 4, 8)
    return spaced(w), spaced("".join(c for c in w if c not in VOWELS))


def sort_letters(rng):
    w = random_letters(rng, 4, 7)
    return spaced(w), spaced(sorted(w))


def dedupe_letters(rng):
    alphabet = "".join(rng.sample(_ALPHABET, rng.randint(3, 5)))
    while True:
        w = random_letters(rng, 5, 8, alphabet)
        if len(set(w)) < len(w):
            return spaced(w), spaced(dict.fromkeys(w))


def nth_letter(rng):
    w = random_letters(rng, 4, 8)
    k = rng.randint(1, len(w))
    return f"position {k}: {spaced(w)}", w[k - 1]


def double_letters(rng):
    w = random_letters(rng, 3, 5)
    return spaced(w), spaced("".join(c + c for c in w))


def swap_adjacent_letters(rng):
    w = random_letters(rng, 2, 3) + random_letters(rng, 2, 3)
    w = w[: len(w) // 2 * 2]
    return spaced(w), spaced("".join(w[i + 1] + w[i] for i in range(0, len(w), 2)))


def mask_vowels(rng):
    w = pseudo_word(rng, 4, 8)
    return spaced(w), spaced("".join("*" if c in VOWELS else c for c in w))


def snake_to_camel(rng):
    ws = _words(rng, 2, 4)
    return "_".join(ws), ws[0] + "".join(w.title() for w in ws[1:])


def camel_to_snake(rng):
    ws = _words(rng, 2, 4)
    return ws[0] + "".join(w.title() for w in ws[1:]), "_".join(ws)


def acronym(rng):
    ws = _words(rng, 3, 5)
    return join(ws, " "), "".join(w[0] for w in ws).upper()


def last_letters(rng):
    ws = _words(rng, 3, 5)
    return join(ws, " "), join((w[-1] for w in ws), " ")


def add_article(rng):
    phrase = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    return phrase, f"{article(phrase)} {phrase}"


def repeat_word(rng):
    w, n = rng.choice(_WORDS), rng.randint(2, 6)
    return f"{w} x{n}", join([w] * n, " ")


# ------------------------------------------------------------------------------------------- words
def longest_word(rng):
    ws = _words_unique_extreme(rng, 3, 6, max)
    return join(ws, " "), max(ws, key=len)


def shortest_word(rng):
    ws = _words_unique_extreme(rng, 3, 6, min)
    return join(ws, " "), min(ws, key=len)


def nth_word(rng):
    ws = _words(rng, 3, 8)
    k = rng.randint(1, len(ws))
    return f"word #{k} of: {join(ws, ' ')}", ws[k - 1]


def remove_word(rng):
    target = rng.choice(_WORDS)
    ws = rng.sample([w for w in _WORDS if w != target], rng.randint(2, 6))
    for _ in range(rng.randint(1, 3)):
        ws.insert(rng.randint(0, len(ws)), target)
    return f"drop '{target}': {join(ws, ' ')}", join((w for w in ws if w != target), " ")


def first_alphabetically(rng):
    ws = _words(rng, 3, 7)
    return join(ws), min(ws)


def words_starting_with(rng):
    ws = _words(rng, 4, 7)
    letter = rng.choice(ws)[0] if rng.random() < 0.8 else rng.choice("abcdefghlmoprstw")
    matches = [w for w in ws if w[0] == letter]
    return f"{letter}: {join(ws, ' ')}", join(matches, " ") if matches else "none"


def replace_word(rng):
    old, new = rng.sample(NOUNS, 2)
    ws = rng.sample([w for w in _WORDS if w not in (old, new)], rng.randint(2, 5))
    for _ in range(rng.randint(1, 2)):
        ws.insert(rng.randint(0, len(ws)), old)
    return f"{old} -> {new}: {join(ws, ' ')}", join((new if w == old else w for w in ws), " ")


def word_after(rng):
    ws = _words(rng, 4, 8)
    k = rng.randrange(len(ws) - 1)
    return f"after '{ws[k]}': {join(ws, ' ')}", ws[k + 1]


def pluralize_phrase(rng):
    adjective, noun = rng.choice(ADJECTIVES), rng.choice(NOUNS)
    return f"one {adjective} {noun}", f"two {adjective} {pluralize(noun)}"


def antonyms(rng):
    ws = rng.sample(sorted(ANTONYMS), 2)
    return join(ws), join(ANTONYMS[w] for w in ws)


def first_and_last_word(rng):
    ws = _words(rng, 3, 8)
    return join(ws, " "), f"{ws[0]} {ws[-1]}"


# ----------------------------------------------------------------------------------------- ciphers
def caesar_encode(rng):
    w = random_letters(rng, 4, 7)
    return spaced(w), spaced(caesar(w, 3))


def caesar_decode(rng):
    w = random_letters(rng, 4, 7)
    return spaced(caesar(w, 3)), spaced(w)


def rot13(rng):
    w = random_letters(rng, 4, 7)
    return spaced(w), spaced(caesar(w, 13))


def atbash_task(rng):
    w = random_letters(rng, 4, 7)
    return spaced(w), spaced(atbash(w))


def letters_to_positions(rng):
    w = random_letters(rng, 3, 5)
    return spaced(w), join((_ALPHABET.index(c) + 1 for c in w), " ")


def positions_to_letters(rng):
    w = random_letters(rng, 3, 5)
    return join((_ALPHABET.index(c) + 1 for c in w), "-"), spaced(w)


def leetspeak(rng):
    w = pseudo_word(rng, 4, 8)
    return spaced(w), spaced("".join(LEET.get(c, c) for c in w))


def morse_encode(rng):
    w = random_letters(rng, 2, 3)
    return w.upper(), join((MORSE[c] for c in w), " / ")


def nato_spelling(rng):
    w = random_letters(rng, 3, 5)
    return w.upper(), join((NATO[c] for c in w), " ")


def digit_complement(rng):
    digits = "".join(rng.choice(string.digits) for _ in range(rng.randint(4, 6)))
    return digits, "".join(str(9 - int(d)) for d in digits)


def vowel_rotation(rng):
    w = pseudo_word(rng, 4, 8)
    return spaced(w), spaced("".join(VOWELS[(VOWELS.index(c) + 1) % 5] if c in VOWELS else c for c in w))


# -------------------------------------------------------------------------------------------- table
TASKS = [
    # strings
    Task("reverse_letters", "strings", "Write the letters in reverse order.", reverse_letters),
    Task("spell_word", "strings", "Spell the word letter by letter, separated by spaces.", spell_word),
    Task("join_letters", "strings", "Join the letters into a single word.", join_letters),
    Task("remove_vowels", "strings", "Delete every vowel and keep the consonants.", remove_vowels),
    Task("sort_letters", "strings", "Arrange the letters in alphabetical order.", sort_letters),
    Task("dedupe_letters", "strings", "Keep only the first occurrence of each letter.", dedupe_letters),
    Task("nth_letter", "strings", "Which letter stands at the given position?", nth_letter),
    Task("double_letters", "strings", "Write every letter twice.", double_letters),
    Task("swap_adjacent_letters", "strings",
         "Swap the letters in pairs: 1st with 2nd, 3rd with 4th, and so on.", swap_adjacent_letters),
    Task("mask_vowels", "strings", "Replace each vowel with an asterisk.", mask_vowels),
    Task("snake_to_camel", "strings", "Convert the identifier from snake_case to camelCase.", snake_to_camel),
    Task("camel_to_snake", "strings", "Convert the identifier from camelCase to snake_case.", camel_to_snake),
    Task("acronym", "strings", "Form an acronym from the first letters of the words.", acronym),
    Task("last_letters", "strings", "Give the last letter of each word.", last_letters),
    Task("add_article", "strings", "Put the correct indefinite article (a or an) in front of the phrase.", add_article),
    Task("repeat_word", "strings", "Repeat the word as many times as shown after the x.", repeat_word),
    # words
    Task("longest_word", "words", "Which word has the most letters?", longest_word),
    Task("shortest_word", "words", "Return the shortest word.", shortest_word),
    Task("nth_word", "words", "Return the word at the given position.", nth_word),
    Task("remove_word", "words", "Remove every occurrence of the quoted word and keep the rest.", remove_word),
    Task("first_alphabetically", "words", "Which word would come first in a dictionary?", first_alphabetically),
    Task("words_starting_with", "words",
         "List the words that begin with the given letter, or answer none.", words_starting_with),
    Task("replace_word", "words",
         "Replace the word on the left of the arrow with the word on its right.", replace_word),
    Task("word_after", "words", "Which word comes right after the quoted word?", word_after),
    Task("pluralize_phrase", "words", "Rewrite the phrase for two of the things.", pluralize_phrase),
    Task("antonyms", "words", "Give the opposite of each word.", antonyms),
    Task("first_and_last_word", "words", "Keep only the first and the last word.", first_and_last_word),
    # ciphers
    Task("caesar_encode", "ciphers",
         "Encrypt with a Caesar cipher: shift each letter three places forward.", caesar_encode),
    Task("caesar_decode", "ciphers",
         "Decrypt the Caesar cipher: each letter was shifted three places forward.", caesar_decode),
    Task("rot13", "ciphers", "Apply ROT13 to the letters.", rot13),
    Task("atbash", "ciphers", "Encode with the Atbash cipher (a becomes z, b becomes y, and so on).", atbash_task),
    Task("letters_to_positions", "ciphers",
         "Replace each letter by its position in the alphabet (a=1).", letters_to_positions),
    Task("positions_to_letters", "ciphers", "Decode the alphabet positions (1=a) into a word.", positions_to_letters),
    Task("leetspeak", "ciphers", "Write it in leetspeak: a->4, e->3, i->1, o->0, s->5, t->7.", leetspeak),
    Task("morse_encode", "ciphers", "Translate into Morse code, separating letters with a slash.", morse_encode),
    Task("nato_spelling", "ciphers", "Spell it with the NATO phonetic alphabet.", nato_spelling),
    Task("digit_complement", "ciphers", "Replace each digit d by 9 minus d.", digit_complement),
    Task("vowel_rotation", "ciphers", "Replace each vowel by the next vowel (a->e->i->o->u->a).", vowel_rotation),
]
