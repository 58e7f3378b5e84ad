"""Numeric tasks: arithmetic, number formats, conversions (units, bases, roman numerals, dates, times,
key-values), sequence continuation and comparisons.

Every generator takes a ``random.Random`` and returns ``(input, output)``. Numbers stay small enough
for a 135M model: sums of a few digits, products with one single-digit factor.
"""

from __future__ import annotations

import datetime as dt
import json
import random

from .tasks_base import Task, balanced, decimal_str, distinct_ints, join, ordinal
from .tasks_vocab import CITIES, COLORS, FIRST_NAMES, NOUNS

MONTHS = "January February March April May June July August September October November December".split()
_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ROMAN = ((1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),
          (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I"))


# ----------------------------------------------------------------------------------------- helpers
def number_to_words(n: int) -> str:
    """English words for 0 <= n < 1,000,000 (``342 -> "three hundred forty-two"``; no "and")."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else "")
    if n < 1000:
        return f"{_ONES[n // 100]} hundred" + (f" {number_to_words(n % 100)}" if n % 100 else "")
    return f"{number_to_words(n // 1000)} thousand" + (f" {number_to_words(n % 1000)}" if n % 1000 else "")


def to_roman(n: int) -> str:
    """Roman numeral of 1 <= n <= 3999 (``1994 -> "MCMXCIV"``)."""
    out = []
    for value, symbol in _ROMAN:
        count, n = divmod(n, value)
        out.append(symbol * count)
    return "".join(out)


def random_date(rng: random.Random, first_year: int = 1950, last_year: int = 2049) -> dt.date:
    """A uniformly random date between 1 January ``first_year`` and 31 December ``last_year``."""
    start, end = dt.date(first_year, 1, 1), dt.date(last_year, 12, 31)
    return start + dt.timedelta(days=rng.randint(0, (end - start).days))


def date_text(d: dt.date) -> str:
    """``"March 7, 2021"``."""
    return f"{MONTHS[d.month - 1]} {d.day}, {d.year}"


def time_12h(hour: int, minute: int) -> str:
    """``(14, 5) -> "2:05 PM"``, ``(0, 30) -> "12:30 AM"``."""
    return f"{(hour - 1) % 12 + 1}:{minute:02d} {'AM' if hour < 12 else 'PM'}"


# -------------------------------------------------------------------------------------- arithmetic
def add_two_numbers(rng):
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return f"{a} + {b}", str(a + b)


def subtract_numbers(rng):
    a, b = rng.randint(0, 199), rng.randint(0, 199)
    return f"{a} - {b}", str(a - b)


def multiply_by_digit(rng):
    a, b = rng.randint(10, 199), rng.randint(2, 9)
    return f"{a} * {b}", str(a * b)


def times_table_plus(rng):
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 99)
    return f"{a} x {b} + {c}", str(a * b + c)


def sum_of_list(rng):
    xs = [rng.randint(1, 30) for _ in range(rng.randint(3, 6))]
    return join(xs), str(sum(xs))


def absolute_difference(rng):
    a, b = rng.randint(0, 500), rng.randint(0, 500)
    return f"{a} and {b}", str(abs(a - b))


def double_number(rng):
    n = rng.randint(10, 4999)
    return str(n), str(2 * n)


def halve_even_number(rng):
    n = 2 * rng.randint(5, 4999)
    return str(n), str(n // 2)


def midpoint(rng):
    a = rng.randint(0, 200)
    b = a + 2 * rng.randint(1, 100)
    a, b = (a, b) if rng.random() < 0.5 else (b, a)
    return f"{a} ... {b}", str((a + b) // 2)


_EXPRESSIONS = (
    ("({a} + {b}) - {c}", lambda a, b, c: a + b - c),
    ("{a} - ({b} - {c})", lambda a, b, c: a - b + c),
    ("{a} - ({b} + {c})", lambda a, b, c: a - b - c),
    ("{a} + {b} + {c}", lambda a, b, c: a + b + c),
)


def evaluate_expression(rng):
    a, b, c = (rng.randint(1, 50) for _ in range(3))
    form, value = rng.choice(_EXPRESSIONS)
    return form.format(a=a, b=b, c=c), str(value(a, b, c))


def digit_sum(rng):
    n = rng.randint(100, 99999)
    return str(n), str(sum(int(d) for d in str(n)))


def complement_to_thousand(rng):
    n = rng.randint(1, 999)
    return str(n), str(1000 - n)


def make_change(rng):
    paid = rng.choice([5, 10, 20])
    price = 5 * rng.randint(1, paid * 20 - 1)  # cents, below what was paid
    change = paid * 100 - price
    return f"price ${price // 100}.{price % 100:02d}, paid ${paid}", f"${change // 100}.{change % 100:02d}"


def percent_of_number(rng):
    pct, n = rng.choice([5, 10, 20, 25, 30, 50, 75]), 20 * rng.randint(1, 200)
    return f"{pct}% of {n}", str(pct * n // 100)


def solve_for_x(rng):
    x, a = rng.randint(1, 99), rng.randint(1, 99)
    form = rng.randrange(4)
    if form == 0:
        return f"x + {a} = {x + a}", str(x)
    if form == 1:
        return f"x - {a} = {x - a}", str(x)
    if form == 2:
        return f"{x + a} - x = {a}", str(x)
    k = rng.randint(2, 9)
    x = rng.randint(1, 20)
    return f"{k}x = {k * x}", str(x)


# ---------------------------------------------------------------------------------- number formats
def number_to_words_task(rng):
    n = rng.randint(0, 9999) if rng.random() < 0.8 else rng.randint(0, 999)
    return str(n), number_to_words(n)


def words_to_number(rng):
    n = rng.randint(0, 9999) if rng.random() < 0.8 else rng.randint(0, 999)
    return number_to_words(n), str(n)


def thousands_separator(rng):
    n = rng.randint(1000, 10 ** rng.randint(4, 8) - 1)
    return str(n), f"{n:,}"


def round_to_hundred(rng):
    n = rng.randint(0, 99999)
    return str(n), str((n + 50) // 100 * 100)


def ordinal_suffix(rng):
    n = rng.randint(1, 100) if rng.random() < 0.3 else rng.randint(1, 9999)
    return str(n), ordinal(n)


def scientific_notation(rng):
    mantissa, exponent = rng.randint(100, 999), rng.randint(2, 8)
    digits = str(mantissa).rstrip("0")
    mant_str = digits[0] + (f".{digits[1:]}" if len(digits) > 1 else "")
    return str(mantissa * 10 ** (exponent - 2)), f"{mant_str}e{exponent}"


def percent_to_decimal(rng):
    tenths = rng.randint(1, 4000) if rng.random() < 0.5 else 10 * rng.randint(1, 400)
    return f"{decimal_str(tenths, 1)}%", decimal_str(tenths, 3)


def format_currency(rng):
    cents = rng.randint(0, 10 ** rng.randint(3, 7))
    return decimal_str(cents, 2), f"${cents // 100:,}.{cents % 100:02d}"


# ------------------------------------------------------------------------------------- conversions
def int_to_roman(rng):
    n = rng.randint(1, 3999) if rng.random() < 0.7 else rng.randint(1, 100)
    return str(n), to_roman(n)


def roman_to_int(rng):
    n = rng.randint(1, 3999) if rng.random() < 0.7 else rng.randint(1, 100)
    return to_roman(n), str(n)


def decimal_to_binary(rng):
    n = rng.randint(16, 1023)
    return str(n), format(n, "b")


def binary_to_decimal(rng):
    n = rng.randint(16, 1023)
    return format(n, "b"), str(n)


def _nibbles(n: int, digits: int) -> str:
    """``n`` in binary, four bits per hex digit, groups separated by spaces (``0x3F -> "0011 1111"``)."""
    return " ".join(format(int(d, 16), "04b") for d in format(n, f"0{digits}X"))


def hex_to_binary(rng):
    digits = rng.choice([2, 3])
    n = rng.randrange(16**digits)
    return f"0x{n:0{digits}X}", _nibbles(n, digits)


def binary_to_hex(rng):
    digits = rng.choice([2, 3])
    n = rng.randrange(16**digits)
    return _nibbles(n, digits), f"{n:0{digits}X}"


def km_to_m(rng):
    hundredths = rng.randint(1, 9999)
    return f"{decimal_str(hundredths, 2)} km", f"{hundredths * 10} m"


def grams_to_kg(rng):
    grams = rng.randint(1, 99999)
    return f"{grams} g", f"{decimal_str(grams, 3)} kg"


def minutes_to_hours(rng):
    n = rng.randint(60, 1439)
    return f"{n} minutes", f"{n // 60} h {n % 60} min"


def duration_to_minutes(rng):
    h, m = rng.randint(1, 23), rng.randint(0, 59)
    return f"{h} hour{'s' if h > 1 else ''} {m} minutes", str(60 * h + m)


def seconds_to_mmss(rng):
    s = rng.randint(0, 3599)
    return f"{s} s", f"{s // 60}:{s % 60:02d}"


def time_24_to_12(rng):
    h, m = rng.randint(0, 23), rng.randint(0, 59)
    return f"{h:02d}:{m:02d}", time_12h(h, m)


def time_12_to_24(rng):
    h, m = rng.randint(0, 23), rng.randint(0, 59)
    return time_12h(h, m), f"{h:02d}:{m:02d}"


def date_iso_to_text(rng):
    d = random_date(rng)
    return d.isoformat(), date_text(d)


def date_text_to_iso(rng):
    d = random_date(rng)
    return f"{d.day} {MONTHS[d.month - 1]} {d.year}", d.isoformat()


def date_us_to_iso(rng):
    d = random_date(rng)
    return f"{d.month:02d}/{d.day:02d}/{d.year}", d.isoformat()


_KV_WORDS = {"name": FIRST_NAMES, "city": CITIES, "color": COLORS, "item": NOUNS}
_KV_NUMBERS = {"age": (18, 90), "size": (1, 50), "count": (0, 999), "id": (100, 9999), "score": (0, 100)}


def random_record(rng: random.Random, k: int) -> dict[str, object]:
    """``k`` random fields (name, city, age, ...) with plausible values."""
    keys = rng.sample(sorted(_KV_WORDS) + sorted(_KV_NUMBERS), k)
    return {key: rng.choice(_KV_WORDS[key]) if key in _KV_WORDS else rng.randint(*_KV_NUMBERS[key]) for key in keys}


def key_values_to_json(rng):
    record = random_record(rng, 2)
    return join((f"{k}={v}" for k, v in record.items()), "; "), json.dumps(record)


def json_to_key_values(rng):
    record = random_record(rng, rng.randint(2, 3))
    return json.dumps(record), join((f"{k}: {v}" for k, v in record.items()), " | ")


# --------------------------------------------------------------------------------------- sequences
def next_arithmetic(rng):
    start, step = rng.randint(1, 99), rng.choice([s for s in range(-9, 13) if s])
    terms = [start + i * step for i in range(5)]
    return join(terms[:4]), str(terms[4])


def next_two_step(rng):
    x, up, down = rng.randint(1, 50), rng.randint(2, 9), rng.randint(1, 5)
    terms = [x]
    for i in range(6):
        terms.append(terms[-1] + (up if i % 2 == 0 else -down))
    return join(terms[:6]), str(terms[6])


def missing_in_arithmetic(rng):
    start, step = rng.randint(1, 60), rng.randint(2, 15)
    terms = [str(start + i * step) for i in range(5)]
    hole = rng.randint(1, 3)
    answer, terms[hole] = terms[hole], "?"
    return join(terms), answer


def next_fibonacci_like(rng):
    terms = [rng.randint(1, 40), rng.randint(1, 40)]
    while len(terms) < 5:
        terms.append(terms[-1] + terms[-2])
    return join(terms[:4]), str(terms[4])


def next_in_repeating_pattern(rng):
    pattern = rng.sample(COLORS + ["circle", "square", "star", "moon"], rng.randint(2, 3))
    n = rng.randint(len(pattern) + 2, 8)
    seq = [pattern[i % len(pattern)] for i in range(n + 1)]
    return join(seq[:n], " "), seq[n]


def nth_term(rng):
    first, step, n = rng.randint(1, 50), rng.randint(2, 9), rng.randint(3, 12)
    return f"first {first}, step {step}, term {n}", str(first + (n - 1) * step)


# -------------------------------------------------------------------------------------- comparison
def compare_numbers(rng):
    def draw(r):
        a = r.randint(0, 9999)
        b = a if r.random() < 0.4 else max(0, a + r.randint(-50, 50))
        return f"{a} vs {b}"

    def label(x):
        a, b = (int(t) for t in x.split(" vs "))
        return "greater" if a > b else "less" if a < b else "equal"

    return balanced(rng, ["greater", "less", "equal"], draw, label)


def larger_decimal(rng):
    whole = rng.randint(0, 20)
    a, b = rng.sample(range(1, 100), 2)
    x, y = f"{whole}.{a}", f"{whole + rng.choice([0, 0, 1])}.{b}"  # one or two decimals: "3.5" vs "3.45"
    pair = [x, y] if rng.random() < 0.5 else [y, x]
    if float(pair[0]) == float(pair[1]):
        return larger_decimal(rng)
    return f"{pair[0]} or {pair[1]}", max(pair, key=float)


def earlier_date(rng):
    d1 = random_date(rng, 1990, 2030)
    d2 = d1 + dt.timedelta(days=rng.choice([-1, 1]) * rng.randint(1, 400))
    return f"{date_text(d1)} or {date_text(d2)}", date_text(min(d1, d2))


def later_time(rng):
    a, b = rng.sample(range(24 * 60), 2)
    ta, tb = time_12h(*divmod(a, 60)), time_12h(*divmod(b, 60))
    return f"{ta} or {tb}", ta if a > b else tb


def closest_to_target(rng):
    target = rng.randint(10, 100)
    while True:
        xs = distinct_ints(rng, 3, 4, 0, 120)
        gaps = sorted(abs(x - target) for x in xs)
        if gaps[0] != gaps[1]:
            break
    return f"target {target}: {join(xs)}", str(min(xs, key=lambda x: abs(x - target)))


def older_person(rng):
    names = rng.sample(FIRST_NAMES, 2)
    ages = rng.sample(range(5, 90), 2)
    return f"{names[0]} is {ages[0]}, {names[1]} is {ages[1]}", names[ages.index(max(ages))]


# -------------------------------------------------------------------------------------------- table
TASKS = [
    # arithmetic
    Task("add_two_numbers", "arithmetic", "Compute the sum.", add_two_numbers),
    Task("subtract_numbers", "arithmetic", "Work out the subtraction. The result may be negative.", subtract_numbers),
    Task("multiply_by_digit", "arithmetic", "Multiply the two numbers.", multiply_by_digit),
    Task("times_table_plus", "arithmetic", "Evaluate: first the multiplication, then the addition.", times_table_plus),
    Task("sum_of_list", "arithmetic", "Add up every number in the list.", sum_of_list),
    Task("absolute_difference", "arithmetic",
         "How far apart are the two numbers on the number line?", absolute_difference),
    Task("double_number", "arithmetic", "Write twice the given number.", double_number),
    Task("halve_even_number", "arithmetic", "Divide the number by two.", halve_even_number),
    Task("midpoint", "arithmetic", "Give the number exactly halfway between the two numbers.", midpoint),
    Task("evaluate_expression", "arithmetic",
         "Evaluate the expression, respecting the parentheses.", evaluate_expression),
    Task("digit_sum", "arithmetic", "Add together the digits of the number.", digit_sum),
    Task("complement_to_thousand", "arithmetic",
         "What must be added to this number to make 1000?", complement_to_thousand),
    Task("make_change", "arithmetic",
         "How much change does the customer get back? Answer in dollars with cents.", make_change),
    Task("percent_of_number", "arithmetic", "Calculate the percentage of the number.", percent_of_number),
    Task("solve_for_x", "arithmetic", "Solve the equation for x and give only the value of x.", solve_for_x),
    # number formats
    Task("number_to_words", "numbers",
         "Write the number in English words, using hyphens for compounds like forty-two.", number_to_words_task),
    Task("words_to_number", "numbers", "Convert the English words into digits.", words_to_number),
    Task("thousands_separator", "numbers", "Insert commas as thousands separators.", thousands_separator),
    Task("round_to_hundred", "numbers", "Round the number to the nearest hundred (halves round up).", round_to_hundred),
    Task("ordinal_suffix", "numbers", "Turn the number into an ordinal such as 1st, 2nd, 3rd or 4th.", ordinal_suffix),
    Task("scientific_notation", "numbers", "Write the number in e-notation, like 4.5e3 for 4500.", scientific_notation),
    Task("percent_to_decimal", "numbers", "Express the percentage as a decimal number.", percent_to_decimal),
    Task("format_currency", "numbers",
         "Format the amount as US dollars with a $ sign, thousands commas and two decimals.", format_currency),
    # conversions
    Task("int_to_roman", "conversion", "Write the number as a Roman numeral.", int_to_roman),
    Task("roman_to_int", "conversion", "What number does this Roman numeral stand for?", roman_to_int),
    Task("decimal_to_binary", "conversion", "Convert the decimal number to binary.", decimal_to_binary),
    Task("binary_to_decimal", "conversion", "Convert the binary number to decimal.", binary_to_decimal),
    Task("hex_to_binary", "conversion",
         "Write the hexadecimal value in binary, four bits per hex digit, groups separated by spaces.", hex_to_binary),
    Task("binary_to_hex", "conversion",
         "Read each group of four bits as one hex digit and give the hexadecimal value without a prefix.",
         binary_to_hex),
    Task("km_to_m", "conversion", "Convert the distance from kilometres to metres.", km_to_m),
    Task("grams_to_kg", "conversion", "Convert the mass from grams to kilograms.", grams_to_kg),
    Task("minutes_to_hours", "conversion", "Express the duration in hours and minutes.", minutes_to_hours),
    Task("duration_to_minutes", "conversion", "How many minutes is this in total?", duration_to_minutes),
    Task("seconds_to_mmss", "conversion", "Write the number of seconds as minutes:seconds.", seconds_to_mmss),
    Task("time_24_to_12", "conversion", "Convert the 24-hour time to 12-hour time with AM or PM.", time_24_to_12),
    Task("time_12_to_24", "conversion", "Convert the time to the 24-hour clock (HH:MM).", time_12_to_24),
    Task("date_iso_to_text", "conversion", "Rewrite the ISO date as Month Day, Year.", date_iso_to_text),
    Task("date_text_to_iso", "conversion", "Rewrite the date in ISO format (YYYY-MM-DD).", date_text_to_iso),
    Task("date_us_to_iso", "conversion", "The date is written month/day/year. Give it as YYYY-MM-DD.", date_us_to_iso),
    Task("key_values_to_json", "conversion",
         "Turn the key=value pairs into a JSON object; numbers stay numbers.", key_values_to_json),
    Task("json_to_key_values", "conversion", "List the JSON fields as key: value, separated by |.", json_to_key_values),
    # sequences
    Task("next_arithmetic", "sequences", "Continue the sequence: what number comes next?", next_arithmetic),
    Task("next_two_step", "sequences",
         "The sequence alternates between two steps. Give the next number.", next_two_step),
    Task("missing_in_arithmetic", "sequences",
         "Replace the ? with the number that fits the evenly spaced sequence.", missing_in_arithmetic),
    Task("next_fibonacci_like", "sequences",
         "Each number is the sum of the two before it. What is the next number?", next_fibonacci_like),
    Task("next_in_repeating_pattern", "sequences",
         "The words repeat in a cycle. Which word comes next?", next_in_repeating_pattern),
    Task("nth_term", "sequences", "Give the requested term of the arithmetic sequence.", nth_term),
    # comparison
    Task("compare_numbers", "comparison",
         "Is the first number greater than, less than or equal to the second? Answer greater, less or equal.",
         compare_numbers),
    Task("larger_decimal", "comparison", "Which of the two decimal numbers is larger?", larger_decimal),
    Task("earlier_date", "comparison", "Which date comes first in time?", earlier_date),
    Task("later_time", "comparison", "Which time of day is later?", later_time),
    Task("closest_to_target", "comparison", "Which number in the list is closest to the target?", closest_to_target),
    Task("older_person", "comparison", "Who is older?", older_person),
]
