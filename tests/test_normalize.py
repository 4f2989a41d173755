import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.text import normalize
from realtime.text.english import cardinal, number_words, ordinal, year
from realtime.text.segment import ClauseSegmenter


@pytest.mark.parametrize(
    "n, words",
    [
        (0, "zero"),
        (7, "seven"),
        (13, "thirteen"),
        (20, "twenty"),
        (21, "twenty-one"),
        (100, "one hundred"),
        (101, "one hundred one"),
        (999, "nine hundred ninety-nine"),
        (1000, "one thousand"),
        (1_000_001, "one million one"),
        (2_500_000_000, "two billion five hundred million"),
        (-42, "minus forty-two"),
    ],
)
def test_cardinal(n, words):
    assert cardinal(n) == words


def test_cardinal_beyond_trillions_reads_digits():
    assert cardinal(10**16) == "one " + "zero " * 15 + "zero"


@pytest.mark.parametrize(
    "n, words",
    [
        (1, "first"),
        (2, "second"),
        (3, "third"),
        (5, "fifth"),
        (12, "twelfth"),
        (20, "twentieth"),
        (23, "twenty-third"),
        (101, "one hundred first"),
        (1000, "one thousand"),
    ],
)
def test_ordinal(n, words):
    assert ordinal(n) == (words if n != 1000 else "one thousandth")


@pytest.mark.parametrize(
    "n, words",
    [
        (1999, "nineteen ninety-nine"),
        (2024, "twenty twenty-four"),
        (2005, "two thousand five"),
        (1900, "nineteen hundred"),
        (1905, "nineteen oh five"),
        (2000, "two thousand"),
    ],
)
def test_year(n, words):
    assert year(n) == words


def test_number_words_decimals_and_groups():
    assert number_words("3.14") == "three point one four"
    assert number_words("-0.5") == "minus zero point five"
    assert number_words("1,000,000") == "one million"


@pytest.mark.parametrize(
    "raw, spoken",
    [
        ("I have 3 apples and 21 pears.", "I have three apples and twenty-one pears."),
        ("It costs $5.", "It costs five dollars."),
        ("It costs $1.", "It costs one dollar."),
        ("It costs $3.50 today", "It costs three dollars and fifty cents today"),
        ("only $0.99", "only ninety-nine cents"),
        ("€20 and £1,000", "twenty euros and one thousand pounds"),
        ("$1.2M raised from 5k users", "one point two million dollars raised from five thousand users"),
        ("a loss of -$5", "a loss of minus five dollars"),
        ("Meet at 3:45 pm", "Meet at three forty-five p.m."),
        ("Meet at 3:45", "Meet at three forty-five"),
        ("Meet at 3.45 pm", "Meet at three forty-five p.m."),
        ("pi is 3.14159", "pi is three point one four one five nine"),
        ("it is 3.45 m", "it is three point four five meters"),
        ("at 12:00", "at twelve o'clock"),
        ("at 3:05 a.m.", "at three oh five a.m."),
        ("at 7pm", "at seven p.m."),
        ("50% of 3.5", "fifty percent of three point five"),
        ("down 2.5 %", "down two point five percent"),
        ("-12 outside", "minus twelve outside"),
        ("The 1st, 2nd, 23rd and 101st", "The first, second, twenty-third and one hundred first"),
        ("In 1999 and 2024.", "In nineteen ninety-nine and twenty twenty-four."),
        ("1,234,567", "one million two hundred thirty-four thousand five hundred sixty-seven"),
        ("On 2024-03-15", "On March fifteenth, twenty twenty-four"),
        ("March 3, 2024", "March third, twenty twenty-four"),
        ("1/2 cup", "one half cup"),
        ("3/4 mile", "three quarters mile"),
        ("pages 10-20", "pages ten to twenty"),
        ("2+2=4", "two plus two equals four"),
        ("5 * 3", "five times three"),
        ("#1 fan", "number one fan"),
        ("a # b", "a b"),
        ("Version 2.0.1", "Version two point zero point one"),
        ("007", "zero zero seven"),
        ("COVID-19 and GPT-4", "COVID nineteen and GPT four"),
        ("open 24/7", "open twenty-four seven"),
        ("the 1990s and '80s", "the nineteen nineties and eighties"),
        ("$5/month", "five dollars per month"),
        ("5-10%", "five to ten percent"),
        ("10am-2pm", "ten a.m. to two p.m."),
        ("$100-$200", "one hundred dollars to two hundred dollars"),
        ("rated 4.5/5", "rated four point five out of five"),
        ("a 2:1 ratio", "a two to one ratio"),
        ("~5 minutes", "about five minutes"),
    ],
)
def test_numbers_currency_times(raw, spoken):
    assert normalize(raw) == spoken


@pytest.mark.parametrize(
    "raw, spoken",
    [
        ("Dr. Smith is here", "Doctor Smith is here"),
        ("Mr. and Mrs. Jones", "Mister and Missus Jones"),
        ("Main St. near St. Louis", "Main Street near Saint Louis"),
        ("fruit, e.g. apples", "fruit, for example apples"),
        ("one thing, i.e. this", "one thing, that is this"),
        ("apples, pears, etc.", "apples, pears, et cetera."),
        ("apples vs. oranges", "apples versus oranges"),
        ("approx. 5 km", "approximately five kilometers"),
        ("1 km", "one kilometer"),
        ("10kg of flour", "ten kilograms of flour"),
        ("20°C or 70 °F", "twenty degrees Celsius or seventy degrees Fahrenheit"),
        ("a 3x speedup", "a three times speedup"),
        ("60 mph", "sixty miles per hour"),
        ("16 GB", "sixteen gigabytes"),
        ("Tom & Jerry", "Tom and Jerry"),
    ],
)
def test_abbreviations_and_units(raw, spoken):
    assert normalize(raw) == spoken


@pytest.mark.parametrize(
    "raw, spoken",
    [
        ("**bold** and _it_ and `code`", "bold and it and code"),
        ("~~gone~~ here", "gone here"),
        ("# Header\nText", "Header, Text"),
        ("## Steps\n- item one\n- item two\n* item three", "Steps, item one, item two, item three"),
        ("1. first\n2. second", "first, second"),
        ("> quoted text", "quoted text"),
        ("```python\nx = y\n```", "x equals y"),
        ("see [the docs](https://x.org/a) now", "see the docs now"),
        ("visit https://www.example.com/path?q=1 today", "visit example dot com today"),
        ("mail john.doe@example.com", "mail john dot doe at example dot com"),
        ("go to docs.python.org now", "go to docs dot python dot org now"),
        ("example.com.", "example dot com."),
        ("Great job! 🎉👍", "Great job!"),
        ("thumbs 👍🏽 up ❤️", "thumbs up"),
        ("<b>bold</b> and <br/> break", "bold and break"),
        ("snake_case_name", "snake case name"),
        ("| a | b |", "a, b,"),
        ("• one - two", "one, two"),
        ("café naïve", "café naïve"),
    ],
)
def test_markup(raw, spoken):
    assert normalize(raw) == spoken


def test_link_split_across_clauses_keeps_its_text():
    # The segmenter may cut inside a link's text; the tail "](url)" must still vanish.
    assert normalize("[one, two") + " " + normalize("three](http://a.b/c) end") == "one, two three end"


def test_markup_keeps_words():
    assert normalize("**Note:** use `pip`") == "Note: use pip"


def test_empty_and_punctuation_only():
    assert normalize("") == ""
    assert normalize("  \n ") == ""
    assert normalize("**") == ""
    assert normalize(" , ") == ""


NUMERIC = st.one_of(
    st.integers(-(10**18), 10**18).map(str),
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False).map(lambda f: f"{f:.3f}"),
    st.integers(0, 10**9).map(lambda n: f"${n:,}"),
    st.integers(0, 10**6).map(lambda n: f"{n}%"),
    st.tuples(st.integers(0, 23), st.integers(0, 59)).map(lambda t: f"{t[0]}:{t[1]:02d}"),
    st.integers(1, 200).map(lambda n: f"{n}th"),
)


@given(NUMERIC)
def test_numeric_input_has_no_digits_left(raw):
    out = normalize(raw)
    assert out and not re.search(r"\d", out)


ALPHABET = st.characters(
    codec="utf-8",
    categories=("L", "N", "P", "S", "Z", "Cc"),
    exclude_characters="\x00",
)


@settings(max_examples=300)
@given(st.text(ALPHABET, max_size=80))
def test_never_raises_never_leaves_markup_or_digits(raw):
    out = normalize(raw)
    assert not re.search(r"[*#`\d<>_~\[\]]", out)
    assert out == out.strip() and "  " not in out


TOKENS = st.sampled_from(
    [
        "Hello",
        "world",
        "the",
        "apples",
        "Dr.",
        "Smith",
        "U.S.",
        "e.g.",
        "etc.",
        "3.5",
        "$5",
        "$3.50",
        "1,000",
        "2024",
        "3:45",
        "pm",
        "50%",
        "1st",
        "km",
        "**bold**",
        "`code`",
        "[link](http://a.b)",
        "https://example.com/x",
        "😀",
        ",",
        ".",
        "!",
        "?",
        ";",
        ":",
        "—",
        "-",
        "...",
        "\n",
        "\n- ",
        "\n1. ",
        "# ",
        "and",
        "is",
        "a",
        "St.",
        "Mr.",
        "i.e.",
        "vs.",
        "$1.2M",
        "5k",
        "3:45 pm",
        "7pm",
        "#1",
        "(",
        ")",
        '"',
        "1/2",
        "-5",
        "20°C",
        "2024-03-15",
        "March",
        "3rd",
        "\n\n",
        "```",
        "> ",
        "<b>",
        "a@b.com",
        "100",
        "%",
    ]
)


def _words(s: str) -> list[str]:
    return re.findall(r"\w[\w'-]*", s)


@settings(max_examples=120, deadline=None)
@given(st.lists(TOKENS, max_size=40), st.lists(st.sampled_from([" ", "", "  "]), min_size=40, max_size=40))
def test_clause_wise_normalisation_speaks_the_same_words(tokens, seps):
    text = "".join(t + s for t, s in zip(tokens, seps, strict=False))
    seg = ClauseSegmenter()
    segments = seg.push(text) + seg.end()
    clause_wise = " ".join(normalize(s.text) for s in segments)
    assert _words(clause_wise) == _words(normalize(text))
