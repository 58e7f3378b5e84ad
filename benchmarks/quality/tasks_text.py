"""Tasks over generated sentences and passages: field extraction, reformatting, classification by
stated rules, short question answering and simple logic.

Classification generators draw the label first (``balanced``), so a constant answer scores about
one over the number of labels.
"""

from __future__ import annotations

import json
import random

from .tasks_base import Task, article, balanced, join, pseudo_word
from .tasks_numbers import date_text, random_date, random_record
from .tasks_vocab import ADJECTIVES, CATEGORIES, CITIES, COLORS, FIRST_NAMES, JOBS, LAST_NAMES, NOUNS, VERBS

_PLACES = "kitchen garden office hallway bedroom bathroom park cellar attic library".split()
_VEHICLES = "bus train ferry tram coach shuttle".split()
_DOMAINS = "mail.com post.org inbox.net example.io webmail.de letters.co".split()
_TLDS = "com org net io dev co".split()
_OBJECTS = "kite boat lamp bike hat scarf cup book bag ball car clock vase drum guitar mug chair tent".split()
_SHOP = ("pens", "notebooks", "candles", "tickets", "stamps", "mugs")


# ------------------------------------------------------------------------------------- extraction
_PERSON_TEMPLATES = (
    "{name}, who is {age}, works as {a_job} in {city} and joined the club in {year}.",
    "In {year}, {name} ({age}) moved to {city} to work as {a_job}.",
    "{name} has been {a_job} in {city} since {year} and is {age} years old.",
    "Meet {name}: {job}, age {age}, living in {city} since {year}.",
    "Since {year}, the {job} {name} has called {city} home; {first} turned {age} this spring.",
)


def _person(rng: random.Random) -> dict[str, str]:
    """A random person's fields and a sentence stating all of them (``"sentence"``)."""
    first, last, job = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES), rng.choice(JOBS)
    fields = {"first": first, "name": f"{first} {last}", "age": str(rng.randint(18, 79)), "job": job,
              "a_job": f"{article(job)} {job}", "city": rng.choice(CITIES), "year": str(rng.randint(1990, 2024))}
    return {**fields, "sentence": rng.choice(_PERSON_TEMPLATES).format(**fields)}


def _person_field(field: str):
    """A generator: a person sentence -> that person's ``field``."""
    def make(rng):
        p = _person(rng)
        return p["sentence"], p[field]
    make.__name__ = f"extract_{field}"
    return make


def extract_email(rng):
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    email = f"{first.lower()}{rng.choice(['.', '_', ''])}{last.lower()}@{rng.choice(_DOMAINS)}"
    noun = rng.choice(NOUNS)
    template = rng.choice([
        "Please write to {email} about the {noun}.",
        "For questions on the {noun}, contact {first} at {email} before Friday.",
        "{first}'s new address is {email}, not the old one.",
    ])
    return template.format(email=email, noun=noun, first=first), email


def extract_price(rng):
    price = f"{rng.randint(1, 499)}.{rng.randint(0, 99):02d}"
    count, adj, noun = rng.randint(2, 12), rng.choice(ADJECTIVES), rng.choice(NOUNS)
    template = rng.choice([
        "The {adj} {noun} costs ${price} at the market.",
        "We bought {count} of them, and each {noun} was ${price}.",
        "For ${price} you get one {adj} {noun}, delivered in {count} days.",
    ])
    return template.format(price=price, count=count, adj=adj, noun=noun), price


def extract_time(rng):
    time = f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d}"
    template = rng.choice([
        "The {vehicle} to {city} leaves from platform {n} at {time}.",
        "Doors open at {time} and the show has {n} acts.",
        "At {time} the {n} guests from {city} finally arrived by {vehicle}.",
    ])
    text = template.format(time=time, vehicle=rng.choice(_VEHICLES), city=rng.choice(CITIES), n=rng.randint(2, 30))
    return text, time


def extract_hashtags(rng):
    words = rng.sample(NOUNS + ADJECTIVES + VERBS, rng.randint(4, 7))
    tags = rng.sample(NOUNS + COLORS, rng.randint(1, 3))
    for tag in tags:
        words.insert(rng.randint(0, len(words)), f"#{tag}")
    return join(words, " "), join(w[1:] for w in words if w.startswith("#"))


def extract_numbers(rng):
    words = rng.sample(NOUNS + ADJECTIVES, rng.randint(4, 7))
    for _ in range(rng.randint(2, 3)):
        words.insert(rng.randint(0, len(words)), str(rng.randint(0, 99)))
    return join(words, " "), join(w for w in words if w.isdigit())


def extract_domain(rng):
    domain = f"{pseudo_word(rng, 4, 8)}.{rng.choice(_TLDS)}"
    url = f"{rng.choice(['https', 'http'])}://{rng.choice(['', 'www.'])}{domain}/{rng.choice(NOUNS)}"
    template = rng.choice(["Visit {url} for {noun} tips.", "The {noun} guide moved to {url} last week.", "See {url}"])
    return template.format(url=url, noun=rng.choice(NOUNS)), domain


def json_get_value(rng):
    record = random_record(rng, rng.randint(3, 4))
    key = rng.choice(list(record))
    return f"{json.dumps(record)} -> {key}", str(record[key])


def csv_get_field(rng):
    record = random_record(rng, rng.randint(3, 4))
    key = rng.choice(list(record))
    return f"{join(record, ',')} / {join(record.values(), ',')} -> {key}", str(record[key])


_QUERY_VALUES = {
    "q": lambda r: r.choice(NOUNS),
    "page": lambda r: str(r.randint(1, 40)),
    "sort": lambda r: r.choice(["price", "name", "date", "rating"]),
    "lang": lambda r: r.choice(["en", "de", "fr", "es", "pt"]),
    "limit": lambda r: str(10 * r.randint(1, 10)),
    "color": lambda r: r.choice(COLORS),
}


def query_param_value(rng):
    params = {k: _QUERY_VALUES[k](rng) for k in rng.sample(sorted(_QUERY_VALUES), rng.randint(2, 4))}
    key = rng.choice(list(params))
    query = join((f"{k}={v}" for k, v in params.items()), "&")
    return f"https://{pseudo_word(rng, 4, 7)}.com/search?{query} -> {key}", params[key]


# ------------------------------------------------------------------------------------------ format
def phone_format(rng):
    digits = str(rng.randint(2, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(9))
    return digits, f"({digits[:3]}) {digits[3:6]}-{digits[6:]}"


def name_last_first(rng):
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    return f"{first} {last}", f"{last}, {first}"


def initials(rng):
    names = rng.sample(FIRST_NAMES, rng.randint(1, 2)) + [rng.choice(LAST_NAMES)]
    return join(names, " "), join((f"{n[0]}." for n in names), " ")


def slugify(rng):
    words = rng.sample(NOUNS + ADJECTIVES + VERBS, rng.randint(3, 5))
    title = join((w.title() for w in words), " ") + rng.choice(["", "!", "?", ""])
    return title, join(words, "-")


def number_the_items(rng):
    items = rng.sample(NOUNS, rng.randint(2, 4))
    return join(items, "; "), join((f"{i}. {x}" for i, x in enumerate(items, 1)), " ")


# ---------------------------------------------------------------------------------- classification
def _grade(score: int) -> str:
    return "A" if score >= 90 else "B" if score >= 80 else "C" if score >= 70 else "D" if score >= 60 else "F"


def grade_letter(rng):
    def draw(r):
        return f"{r.choice(FIRST_NAMES)}: {r.randint(0, 100)}"
    return balanced(rng, "ABCDF", draw, lambda x: _grade(int(x.split(": ")[1])))


def temperature_label(rng):
    def label(x):
        t = int(x.split(", ")[1][:-2])
        return "cold" if t < 10 else "mild" if t < 25 else "hot"
    return balanced(rng, ["cold", "mild", "hot"], lambda r: f"{r.choice(CITIES)}, {r.randint(-20, 40)}°C", label)


def age_group(rng):
    def label(x):
        age = int(x.rsplit(", ", 1)[1])
        return "child" if age < 13 else "teen" if age < 20 else "adult" if age < 65 else "senior"
    return balanced(rng, ["child", "teen", "adult", "senior"],
                    lambda r: f"{r.choice(FIRST_NAMES)} {r.choice(LAST_NAMES)}, {r.randint(1, 99)}", label)


def time_of_day(rng):
    def label(x):
        h = int(x.split(":")[0])
        return "morning" if 5 <= h < 12 else "afternoon" if 12 <= h < 17 else "evening" if 17 <= h < 21 else "night"
    def draw(r):
        return f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}"
    return balanced(rng, ["morning", "afternoon", "evening", "night"], draw, label)


def triangle_type(rng):
    kind = rng.choice(["equilateral", "isosceles", "scalene"])
    while True:
        a = rng.randint(1, 999)
        sides = {"equilateral": [a, a, a], "isosceles": [a, a, rng.randint(1, 2 * a - 1)],
                 "scalene": [a, rng.randint(1, 999), rng.randint(1, 999)]}[kind]
        x, y, z = sorted(sides)
        if x + y > z and len(set(sides)) == {"equilateral": 1, "isosceles": 2, "scalene": 3}[kind]:
            rng.shuffle(sides)
            return join(sides), kind


def quadrant(rng):
    x, y = (rng.choice([-1, 1]) * rng.randint(1, 20) for _ in range(2))
    return f"({x}, {y})", {(True, True): "I", (False, True): "II", (False, False): "III", (True, False): "IV"}[x > 0, y > 0]


_SENTIMENT_WORDS = {
    "positive": "wonderful great lovely excellent delightful superb".split(),
    "negative": "awful terrible broken horrible dreadful useless".split(),
    "neutral": "blue square ordinary wooden plain average".split(),
}


def sentiment_keywords(rng):
    label = rng.choice(sorted(_SENTIMENT_WORDS))
    template = rng.choice([
        "The {noun} was {word}.",
        "I found the {noun} {word} today.",
        "Honestly, {name}'s {noun} looked {word}.",
        "Everyone said the {adj} {noun} seemed {word}.",
    ])
    text = template.format(noun=rng.choice(NOUNS), word=rng.choice(_SENTIMENT_WORDS[label]), name=rng.choice(FIRST_NAMES),
                           adj=rng.choice(["new", "old", "small", "large", "second"]))
    return text, label


_TICKET_KEYWORDS = {
    "billing": ["refund", "invoice", "double charge", "payment"],
    "technical": ["crash", "error message", "frozen screen", "bug"],
    "account": ["password", "login", "username", "two-factor code"],
    "shipping": ["delivery", "package", "tracking number", "courier"],
}


def route_ticket(rng):
    team = rng.choice(sorted(_TICKET_KEYWORDS))
    template = rng.choice([
        "Hi, I have a question about the {kw} for my {noun}.",
        "{name} here: the {kw} is a problem again since {day}.",
        "Urgent! {kw} issue with order {n}, please help.",
        "Can someone look at my {kw}? It concerns the {noun}.",
    ])
    text = template.format(kw=rng.choice(_TICKET_KEYWORDS[team]), noun=rng.choice(NOUNS), name=rng.choice(FIRST_NAMES),
                           day=rng.choice(["Monday", "Tuesday", "yesterday", "last week"]), n=rng.randint(1000, 9999))
    return text[0].upper() + text[1:], team


_FILE_TYPES = {
    "image": "png jpg gif svg".split(), "audio": "mp3 wav flac ogg".split(), "document": "pdf docx txt md".split(),
    "code": "py js rs go".split(), "archive": "zip tar gz 7z".split(),
}


def file_type(rng):
    kind = rng.choice(sorted(_FILE_TYPES))
    suffix = rng.choice(ADJECTIVES) if rng.random() < 0.5 else str(rng.randint(1, 99))
    stem = f"{rng.choice(NOUNS)}{rng.choice(['_', '-', ''])}{suffix}"
    return f"{stem}.{rng.choice(_FILE_TYPES[kind])}", kind


def season_of_date(rng):
    d = random_date(rng)
    return date_text(d), ["winter", "spring", "summer", "autumn"][d.month % 12 // 3]


def sign_and_parity(rng):
    n = rng.choice([-1, 1]) * rng.randint(1, 999)
    return str(n), f"{'positive' if n > 0 else 'negative'} {'even' if n % 2 == 0 else 'odd'}"


def odd_one_out(rng):
    main, other = rng.sample(sorted(CATEGORIES), 2)
    intruder = rng.choice(CATEGORIES[other])
    items = rng.sample(CATEGORIES[main], 3) + [intruder]
    rng.shuffle(items)
    return join(items), intruder


# --------------------------------------------------------------------------------------------- qa
def _people(rng: random.Random, n: int) -> list[str]:
    return rng.sample(FIRST_NAMES, n)


def _owners(rng: random.Random) -> tuple[list[str], list[str], list[str], str]:
    """Three people, each with an object of their own colour, and the passage saying so."""
    people, things, colors = _people(rng, 3), rng.sample(_OBJECTS, 3), rng.sample(COLORS, 3)
    passage = join((f"{p} has {article(c)} {c} {t}." for p, t, c in zip(people, things, colors)), " ")
    return people, things, colors, passage


def qa_who_has(rng):
    people, things, _, passage = _owners(rng)
    i = rng.randrange(3)
    return f"{passage} Question: Who has the {things[i]}?", people[i]


def qa_what_color(rng):
    people, things, colors, passage = _owners(rng)
    i = rng.randrange(3)
    return f"{passage} Question: What color is {people[i]}'s {things[i]}?", colors[i]


def qa_where_is(rng):
    people = _people(rng, rng.randint(2, 3))
    where, lines = {}, []
    for _ in range(rng.randint(3, 5)):
        p, place = rng.choice(people), rng.choice(_PLACES)
        where[p] = place
        lines.append(f"{p} {rng.choice(['went to', 'moved to', 'walked into', 'ran to'])} the {place}.")
    p = rng.choice(sorted(where))
    return f"{join(lines, ' ')} Question: Where is {p}?", where[p]


def qa_items_left(rng):
    a, b = _people(rng, 2)
    noun = rng.choice(["apples", "pears", "cards", "coins", "stamps", "marbles"])
    have, give, get = rng.randint(5, 20), rng.randint(1, 5), rng.randint(1, 9)
    text = (f"{a} had {have} {noun}. {a} gave {give} to {b}. Then {a} found {get} more. "
            f"Question: How many {noun} does {a} have now?")
    return text, str(have - give + get)


def qa_departure_time(rng):
    vehicles = rng.sample(_VEHICLES, 3)
    times = [f"{rng.randint(5, 22)}:{rng.randint(0, 11) * 5:02d}" for _ in vehicles]
    i = rng.randrange(3)
    (v1, v2, v3), (t1, t2, t3) = vehicles, times
    text = f"The {v1} leaves at {t1}, the {v2} at {t2} and the {v3} at {t3}."
    return f"{text} Question: When does the {vehicles[i]} leave?", times[i]


def qa_youngest(rng):
    people, years = _people(rng, 3), rng.sample(range(1940, 2020), 3)
    text = join((f"{p} was born in {y}." for p, y in zip(people, years)), " ")
    return f"{text} Question: Who is the youngest?", people[years.index(max(years))]


def qa_total_cost(rng):
    name = rng.choice(FIRST_NAMES)
    count, each, other = rng.randint(2, 5), rng.randint(1, 9), rng.randint(1, 30)
    things, single = rng.choice(_SHOP), rng.choice(["book", "lamp", "jacket", "bag", "umbrella", "scarf"])
    text = (f"{name} bought {count} {things} at ${each} each and {article(single)} {single} for ${other}. "
            f"Question: How much did {name} spend?")
    return text, f"${count * each + other}"


def qa_where_item(rng):
    things = rng.sample(["keys", "book", "cup", "phone", "hat", "ball", "pen", "map"], 3)
    spots = rng.sample(["in the drawer", "on the shelf", "under the bed", "in the car", "on the table",
                        "behind the door", "in the box", "next to the lamp"], 3)
    text = join((f"The {t} {'are' if t.endswith('s') else 'is'} {s}." for t, s in zip(things, spots)), " ")
    i = rng.randrange(3)
    verb = "are" if things[i].endswith("s") else "is"
    return f"{text} Question: Where {verb} the {things[i]}?", spots[i]


# ------------------------------------------------------------------------------------------ logic
def _ordering(rng: random.Random, more: str, less: str) -> tuple[list[str], str]:
    """Three people in a hidden order (first = most) and two shuffled statements that fix it."""
    a, b, c = _people(rng, 3)
    facts = [rng.choice([f"{a} is {more} than {b}.", f"{b} is {less} than {a}."]),
             rng.choice([f"{b} is {more} than {c}.", f"{c} is {less} than {b}."])]
    rng.shuffle(facts)
    return [a, b, c], join(facts, " ")


def tallest_of_three(rng):
    order, text = _ordering(rng, "taller", "shorter")
    return text, order[0]


def first_to_arrive(rng):
    a, b, c = _people(rng, 3)  # arrival order a, b, c
    facts = [rng.choice([f"{a} arrived before {b}.", f"{b} arrived after {a}."]),
             rng.choice([f"{b} arrived before {c}.", f"{c} arrived after {b}."])]
    rng.shuffle(facts)
    return join(facts, " "), a


def middle_seat(rng):
    a, b, c = _people(rng, 3)  # seated left to right
    facts = [rng.choice([f"{a} sits left of {b}.", f"{b} sits right of {a}."]),
             rng.choice([f"{b} sits left of {c}.", f"{c} sits right of {b}."])]
    rng.shuffle(facts)
    return join(facts, " "), b


def syllogism(rng):
    x, y = (pseudo_word(rng, 4, 6) for _ in range(2))
    name = rng.choice(FIRST_NAMES)
    kind = rng.choice(["yes", "no", "unknown"])
    premise = {
        "yes": f"All {x}s are {y}s. {name} is {article(x)} {x}.",
        "no": f"No {x}s are {y}s. {name} is {article(x)} {x}.",
        "unknown": f"All {x}s are {y}s. {name} is {article(y)} {y}.",
    }[kind]
    asked = x if kind == "unknown" else y
    question = f"Is {name} {article(asked)} {asked}?"
    return f"{premise} {question}", kind


_BOOLEAN_FORMS = (
    ("{a} and {b}", lambda a, b: a and b), ("{a} or {b}", lambda a, b: a or b),
    ("not {a}", lambda a, b: not a), ("{a} and not {b}", lambda a, b: a and not b),
    ("not ({a} or {b})", lambda a, b: not (a or b)), ("{a} xor {b}", lambda a, b: a != b),
)


def boolean_pair(rng):
    values = {v: rng.random() < 0.5 for v in "pqr"}
    parts, answers = [], []
    for label in "12":
        (form, fn), (a, b) = rng.choice(_BOOLEAN_FORMS), rng.sample("pqr", 2)
        parts.append(f"({label}) {form.format(a=a, b=b)}")
        answers.append("true" if fn(values[a], values[b]) else "false")
    setting = join((f"{v}={'true' if t else 'false'}" for v, t in values.items()), ", ")
    return f"{setting}. {join(parts, ' ')}", join(answers, " ")


def if_then_rule(rng):
    thing = rng.choice(["light", "flag", "door", "card"])
    c1, c2 = rng.sample(COLORS, 2)
    w1, w2 = rng.sample(NOUNS, 2)
    actual = rng.choice([c1, c2, rng.choice(COLORS)])
    text = f"If the {thing} is {c1}, say {w1}; otherwise say {w2}. The {thing} is {actual}."
    return text, w1 if actual == c1 else w2


# ------------------------------------------------------------------------------------------- table
TASKS = [
    # extraction
    Task("extract_age", "extraction", "How old is the person described?", _person_field("age")),
    Task("extract_city", "extraction", "Which city does the sentence mention?", _person_field("city")),
    Task("extract_person_name", "extraction",
         "Give the full name of the person in the sentence.", _person_field("name")),
    Task("extract_year", "extraction", "Extract the year from the sentence.", _person_field("year")),
    Task("extract_job", "extraction",
         "What is the person's profession? Answer with the job title only.", _person_field("job")),
    Task("extract_email", "extraction", "Pull out the email address.", extract_email),
    Task("extract_price", "extraction", "What is the price in dollars? Give just the number.", extract_price),
    Task("extract_time", "extraction", "At what clock time does it happen?", extract_time),
    Task("extract_hashtags", "extraction",
         "List the hashtags without the # sign, in order of appearance.", extract_hashtags),
    Task("extract_numbers", "extraction", "List all the numbers in the text, in order.", extract_numbers),
    Task("extract_domain", "extraction", "Give the domain name of the link, without www.", extract_domain),
    Task("json_get_value", "extraction", "Look up the field named after the arrow in the JSON object.", json_get_value),
    Task("csv_get_field", "extraction",
         "The text is a CSV header and one row. Give the value of the column after the arrow.", csv_get_field),
    Task("query_param_value", "extraction",
         "Return the value of the URL query parameter named after the arrow.", query_param_value),
    # format
    Task("phone_format", "format", "Format the ten digits as a US phone number like (555) 123-4567.", phone_format),
    Task("name_last_first", "format", "Rewrite the name as Last, First.", name_last_first),
    Task("initials", "format", "Abbreviate the name to initials with periods.", initials),
    Task("slugify", "format", "Make a URL slug: lowercase words joined by hyphens, punctuation removed.", slugify),
    Task("number_the_items", "format", "Number the items: 1. first 2. second ...", number_the_items),
    # classification
    Task("grade_letter", "classification",
         "Give the letter grade: A for 90+, B for 80-89, C for 70-79, D for 60-69, F below 60.", grade_letter),
    Task("temperature_label", "classification",
         "Label the temperature: cold below 10°C, mild from 10 to 24°C, hot from 25°C.", temperature_label),
    Task("age_group", "classification",
         "Classify the age: child under 13, teen 13-19, adult 20-64, senior 65 and over.", age_group),
    Task("time_of_day", "classification",
         "Say morning (5-11h), afternoon (12-16h), evening (17-20h) or night (21-4h).", time_of_day),
    Task("triangle_type", "classification",
         "Given the three side lengths, is the triangle equilateral, isosceles or scalene?", triangle_type),
    Task("quadrant", "classification", "In which quadrant (I, II, III or IV) does the point lie?", quadrant),
    Task("sentiment_keywords", "classification",
         "Rule: words like wonderful or great mean positive, awful or broken mean negative, anything else is neutral. "
         "Label the sentence.",
         sentiment_keywords),
    Task("route_ticket", "classification",
         "Route the support ticket to billing, technical, account or shipping.", route_ticket),
    Task("file_type", "classification",
         "From the file extension, is it an image, audio, document, code or archive?", file_type),
    Task("season_of_date", "classification",
         "Which meteorological season (northern hemisphere) does the date fall in?", season_of_date),
    Task("sign_and_parity", "classification",
         "Describe the number as positive or negative, and even or odd.", sign_and_parity),
    Task("odd_one_out", "classification", "Which item does not belong with the others?", odd_one_out),
    # question answering over a passage
    Task("qa_who_has", "qa", "Answer the question about the passage with a name.", qa_who_has),
    Task("qa_what_color", "qa", "Read the passage and answer with a color.", qa_what_color),
    Task("qa_where_is", "qa", "Track where each person goes and answer with the place.", qa_where_is),
    Task("qa_items_left", "qa", "Solve the word problem and answer with a number.", qa_items_left),
    Task("qa_departure_time", "qa", "Answer from the timetable.", qa_departure_time),
    Task("qa_youngest", "qa", "Use the birth years to answer.", qa_youngest),
    Task("qa_total_cost", "qa", "Compute the total amount spent, in dollars.", qa_total_cost),
    Task("qa_where_item", "qa", "Say where the object is, as in the passage.", qa_where_item),
    # logic
    Task("tallest_of_three", "logic", "Who is the tallest?", tallest_of_three),
    Task("first_to_arrive", "logic", "Who arrived first?", first_to_arrive),
    Task("middle_seat", "logic", "Three people sit in a row. Who sits in the middle?", middle_seat),
    Task("syllogism", "logic", "Answer yes, no or unknown using only the statements.", syllogism),
    Task("boolean_pair", "logic", "Evaluate both boolean expressions and answer true or false for each.", boolean_pair),
    Task("if_then_rule", "logic", "Follow the rule and give the word it says.", if_then_rule),
]
