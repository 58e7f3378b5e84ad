"""Collection tasks: list operations, set operations and counting."""

from __future__ import annotations

import random

from .tasks_base import Task, distinct_ints, join, pseudo_word, spaced
from .tasks_vocab import ADJECTIVES, CATEGORIES, NOUNS, VERBS

_WORDS = NOUNS + ADJECTIVES + VERBS


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return rng.sample(_WORDS, rng.randint(lo, hi))


def _set_str(xs) -> str:
    return "{" + join(sorted(xs)) + "}"


def _sorted_or_none(xs) -> str:
    return join(sorted(xs)) if xs else "none"


def _two_sets(rng: random.Random) -> tuple[set[int], set[int]]:
    """Two sets of 2-6 numbers from 1..15 that usually overlap."""
    a = set(rng.sample(range(1, 16), rng.randint(3, 5)))
    shared = rng.sample(sorted(a), rng.randint(0, 3))
    b = set(shared) | set(rng.sample(range(1, 16), rng.randint(1, 3)))
    return a, b


# ------------------------------------------------------------------------------------------- lists
def sort_ascending(rng):
    xs = distinct_ints(rng, 4, 6, 0, 99)
    return join(xs), join(sorted(xs))


def sort_descending(rng):
    xs = distinct_ints(rng, 4, 6, 0, 99)
    return join(xs, " "), join(sorted(xs, reverse=True), " ")


def second_largest(rng):
    xs = distinct_ints(rng, 5, 8, 0, 99)
    return join(xs), str(sorted(xs)[-2])


def third_smallest(rng):
    xs = distinct_ints(rng, 6, 8, 0, 199)
    return join(xs, " "), str(sorted(xs)[2])


def median_of_list(rng):
    xs = rng.sample(range(100), rng.choice([5, 7]))
    return join(xs, "; "), str(sorted(xs)[len(xs) // 2])


def dedupe_keep_order(rng):
    while True:
        xs = [rng.randint(1, 9) for _ in range(rng.randint(5, 8))]
        if len(set(xs)) < len(xs):
            break
    return join(xs), join(dict.fromkeys(xs))


def reverse_list(rng):
    ws = _words(rng, 4, 6)
    return join(ws), join(reversed(ws))


def rotate_right(rng):
    ws = _words(rng, 4, 6)
    return join(ws, " "), join([ws[-1]] + ws[:-1], " ")


def every_other_item(rng):
    ws = _words(rng, 5, 8)
    return join(ws), join(ws[::2])


def keep_even_numbers(rng):
    while True:
        xs = [rng.randint(1, 99) for _ in range(rng.randint(4, 7))]
        if any(x % 2 == 0 for x in xs):
            break
    return join(xs), join(x for x in xs if x % 2 == 0)


def keep_greater_than(rng):
    threshold = rng.randint(10, 90)
    xs = distinct_ints(rng, 4, 6, 0, 99)
    kept = [x for x in xs if x > threshold]
    return f"above {threshold}: {join(xs)}", join(kept) if kept else "none"


def cumulative_sum(rng):
    xs = [rng.randint(1, 9) for _ in range(rng.randint(4, 5))]
    totals = [sum(xs[: i + 1]) for i in range(len(xs))]
    return join(xs, " "), join(totals, " ")


def pairwise_differences(rng):
    xs = [rng.randint(0, 50) for _ in range(rng.randint(4, 5))]
    return join(xs), join(b - a for a, b in zip(xs, xs[1:]))


def index_of_largest(rng):
    xs = distinct_ints(rng, 4, 8, 0, 99)
    return join(xs), str(xs.index(max(xs)) + 1)


def interleave_lists(rng):
    n = rng.randint(2, 4)
    numbers = [rng.randint(1, 9) for _ in range(n)]
    letters = rng.sample("abcdefghijklmnopqrstuvwxyz", n)
    merged = [x for pair in zip(numbers, letters) for x in pair]
    return f"{join(numbers, ' ')} | {join(letters, ' ')}", join(merged, " ")


def swap_first_last(rng):
    ws = _words(rng, 3, 6)
    return join(ws), join([ws[-1]] + ws[1:-1] + [ws[0]])


def sort_words(rng):
    ws = _words(rng, 4, 6)
    return join(ws, " "), join(sorted(ws), " ")


def range_of_list(rng):
    xs = distinct_ints(rng, 4, 7, 0, 99)
    return join(xs), str(max(xs) - min(xs))


# -------------------------------------------------------------------------------------------- sets
def set_intersection(rng):
    a, b = _two_sets(rng)
    return f"{_set_str(a)} and {_set_str(b)}", _sorted_or_none(a & b)


def set_union(rng):
    a, b = _two_sets(rng)
    return f"{_set_str(a)} and {_set_str(b)}", join(sorted(a | b))


def set_difference(rng):
    a, b = _two_sets(rng)
    return f"A = {_set_str(a)}, B = {_set_str(b)}", _sorted_or_none(a - b)


def symmetric_difference(rng):
    a, b = _two_sets(rng)
    return f"{_set_str(a)} and {_set_str(b)}", _sorted_or_none(a ^ b)


def set_relation(rng):
    universe = rng.sample(range(1, 31), 8)
    kind = rng.choice(["subset", "superset", "equal", "disjoint", "overlap"])
    base = universe[: rng.randint(2, 4)]
    other = {
        "subset": lambda: base + universe[4 : 4 + rng.randint(1, 3)],
        "superset": lambda: base[: rng.randint(1, len(base) - 1)],
        "equal": lambda: rng.sample(base, len(base)),
        "disjoint": lambda: universe[4 : 4 + rng.randint(1, 4)],
        "overlap": lambda: base[:1] + universe[4 : 4 + rng.randint(1, 3)],
    }[kind]()
    rng.shuffle(base)
    rng.shuffle(other)
    return f"A = {{{join(base)}}}, B = {{{join(other)}}}", kind


def missing_number(rng):
    n = rng.randint(6, 10)
    xs = list(range(1, n + 1))
    gone = xs.pop(rng.randrange(n))
    rng.shuffle(xs)
    return f"1 to {n}: {join(xs, ' ')}", str(gone)


def common_letters(rng):
    a, b = pseudo_word(rng, 4, 6), pseudo_word(rng, 4, 6)
    shared = sorted(set(a) & set(b))
    return f"{spaced(a)} / {spaced(b)}", join(shared, " ") if shared else "none"


# ---------------------------------------------------------------------------------------- counting
def count_letter(rng):
    target = rng.choice("abcdefghijklmnoprstuvw")
    letters = list(pseudo_word(rng, 4, 7))
    for _ in range(rng.randint(0, 3)):
        letters.insert(rng.randint(0, len(letters)), target)
    return f"'{target}' in {spaced(''.join(letters))}", str(letters.count(target))


def count_words(rng):
    ws = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
    return join(ws, " "), str(len(ws))


def count_vowels(rng):
    word = pseudo_word(rng, 4, 9)
    return spaced(word), str(sum(c in "aeiou" for c in word))


def count_greater_than(rng):
    threshold = rng.randint(10, 90)
    xs = [rng.randint(0, 99) for _ in range(rng.randint(4, 8))]
    return f"above {threshold}: {join(xs, ' ')}", str(sum(x > threshold for x in xs))


def count_distinct(rng):
    xs = [rng.randint(1, 9) for _ in range(rng.randint(5, 10))]
    return join(xs), str(len(set(xs)))


def count_even_numbers(rng):
    xs = [rng.randint(1, 99) for _ in range(rng.randint(4, 8))]
    return join(xs, " "), str(sum(x % 2 == 0 for x in xs))


def count_category_items(rng):
    category, *others = rng.sample(sorted(CATEGORIES), 3)
    k = rng.randint(0, 4)
    distractors = CATEGORIES[others[0]] + CATEGORIES[others[1]]
    items = rng.sample(CATEGORIES[category], k) + rng.sample(distractors, rng.randint(1, 4))
    rng.shuffle(items)
    return f"{category}: {join(items)}", str(k)


def count_word_occurrences(rng):
    target = rng.choice(NOUNS)
    ws = rng.sample([w for w in _WORDS if w != target], rng.randint(3, 8))
    for _ in range(rng.randint(0, 4)):
        ws.insert(rng.randint(0, len(ws)), target)
    return f"'{target}' in: {join(ws, ' ')}", str(ws.count(target))


def count_capitalized(rng):
    ws = [w.title() if rng.random() < 0.4 else w for w in (rng.choice(_WORDS) for _ in range(rng.randint(3, 9)))]
    return join(ws, " "), str(sum(w[0].isupper() for w in ws))


# -------------------------------------------------------------------------------------------- table
TASKS = [
    # lists
    Task("sort_ascending", "lists", "Sort the numbers from smallest to largest.", sort_ascending),
    Task("sort_descending", "lists", "Order the numbers from largest to smallest.", sort_descending),
    Task("second_largest", "lists", "Which number is the second largest?", second_largest),
    Task("third_smallest", "lists", "Find the third smallest number.", third_smallest),
    Task("median_of_list", "lists", "Give the median of the numbers.", median_of_list),
    Task("dedupe_keep_order", "lists",
         "Remove repeated numbers, keeping the first occurrence of each in its original order.", dedupe_keep_order),
    Task("reverse_list", "lists", "Reverse the order of the items.", reverse_list),
    Task("rotate_right", "lists", "Move the last word to the front and keep the others in order.", rotate_right),
    Task("every_other_item", "lists", "Keep the 1st, 3rd, 5th, ... items and drop the rest.", every_other_item),
    Task("keep_even_numbers", "lists", "Keep only the even numbers, in their original order.", keep_even_numbers),
    Task("keep_greater_than", "lists",
         "List the numbers above the threshold, in order; answer none if there are none.", keep_greater_than),
    Task("cumulative_sum", "lists", "Write the running total after each number.", cumulative_sum),
    Task("pairwise_differences", "lists",
         "Subtract each number from the one after it and list the differences.", pairwise_differences),
    Task("index_of_largest", "lists", "At which position (counting from 1) is the largest number?", index_of_largest),
    Task("interleave_lists", "lists",
         "Merge the two lists by alternating their items, starting with the first list.", interleave_lists),
    Task("swap_first_last", "lists", "Swap the first and the last item.", swap_first_last),
    Task("sort_words", "lists", "Put the words in alphabetical order.", sort_words),
    Task("range_of_list", "lists", "Subtract the smallest number from the largest.", range_of_list),
    # sets
    Task("set_intersection", "sets",
         "List the elements the two sets have in common, sorted; answer none if there are none.", set_intersection),
    Task("set_union", "sets", "Give the union of the two sets as a sorted list.", set_union),
    Task("set_difference", "sets",
         "List the elements of A that are not in B, sorted; answer none if there are none.", set_difference),
    Task("symmetric_difference", "sets",
         "List the elements in exactly one of the two sets, sorted; answer none if there are none.",
         symmetric_difference),
    Task("set_relation", "sets",
         "Describe A relative to B with one word: subset, superset, equal, disjoint or overlap.", set_relation),
    Task("missing_number", "sets", "One number of the range is missing. Which one?", missing_number),
    Task("common_letters", "sets",
         "Which letters appear in both words? List them alphabetically, or answer none.", common_letters),
    # counting
    Task("count_letter", "counting", "How many times does the quoted letter occur?", count_letter),
    Task("count_words", "counting", "Count the words.", count_words),
    Task("count_vowels", "counting", "How many vowels (a, e, i, o, u) are there?", count_vowels),
    Task("count_greater_than", "counting", "How many of the numbers are above the threshold?", count_greater_than),
    Task("count_distinct", "counting", "How many different numbers appear in the list?", count_distinct),
    Task("count_even_numbers", "counting", "How many even numbers are in the list?", count_even_numbers),
    Task("count_category_items", "counting",
         "How many items in the list belong to the named category?", count_category_items),
    Task("count_word_occurrences", "counting",
         "How often does the quoted word appear in the text?", count_word_occurrences),
    Task("count_capitalized", "counting", "How many words start with a capital letter?", count_capitalized),
]
