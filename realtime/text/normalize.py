"""English text normalisation in front of the default voice's G2P.

LLM output is markdown with numbers in it; a phonemiser wants words.  Everything here is a pure
function of its input so the engine can normalise one clause at a time: the segmenter only cuts at
whitespace after punctuation, so no token this module rewrites (``$1,000``, ``3:45 pm``, ``Dr.``)
is ever seen in two halves.  The output never contains a digit, markdown emphasis, a backtick or
an emoji, whatever the input.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["normalize", "strip_markup", "cardinal", "ordinal", "year", "number_words"]

# -- numbers -------------------------------------------------------------------------------------

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_ORDINAL_WORDS = {
    "one": "first",
    "two": "second",
    "three": "third",
    "five": "fifth",
    "eight": "eighth",
    "nine": "ninth",
    "twelve": "twelfth",
}


def _under_thousand(n: int) -> str:
    words = []
    if n >= 100:
        words.append(f"{_ONES[n // 100]} hundred")
        n %= 100
    if n >= 20:
        words.append(_TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else ""))
    elif n or not words:
        words.append(_ONES[n])
    return " ".join(words)


def cardinal(n: int) -> str:
    """Beyond the trillions a number is read digit by digit: nobody says "a quintillion" aloud
    from a chat answer, and the words would run for seconds."""
    if n < 0:
        return "minus " + cardinal(-n)
    if n >= 10**15:
        return " ".join(_ONES[int(d)] for d in str(n))
    words = []
    for value, name in _SCALES:
        if n >= value:
            words.append(f"{_under_thousand(n // value)} {name}")
            n %= value
    if n or not words:
        words.append(_under_thousand(n))
    return " ".join(words)


def ordinal(n: int) -> str:
    words = cardinal(n)
    head, sep, last = words.rpartition(" ")
    pre, dash, unit = last.rpartition("-")
    if unit in _ORDINAL_WORDS:
        unit = _ORDINAL_WORDS[unit]
    elif unit.endswith("y"):
        unit = unit[:-1] + "ieth"
    else:
        unit += "th"
    return head + sep + pre + dash + unit


def year(n: int) -> str:
    """Years are read in pairs ("nineteen ninety-nine") except 2000-2009 and round hundreds."""
    if not 1000 <= n <= 2999 or 2000 <= n <= 2009:
        return cardinal(n)
    hi, lo = divmod(n, 100)
    if lo == 0:
        return f"{cardinal(hi)} hundred"
    return f"{cardinal(hi)} {'oh ' if lo < 10 else ''}{cardinal(lo)}"


def _digits(s: str) -> str:
    return " ".join(_ONES[int(d)] for d in s)


def number_words(s: str) -> str:
    """A numeral as written ("1,000", "-3.25", ".5") -> words."""
    neg = s.startswith(("-", "−"))
    s = s.lstrip("-−").replace(",", "")
    whole, _, frac = s.partition(".")
    words = cardinal(int(whole)) if whole else "zero"
    if frac:
        words += " point " + _digits(frac)
    return ("minus " + words) if neg else words


# -- markup --------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[\w+-]*")
_LINK = re.compile(r"!?\[([^\]\n]*)\]\([^)\s]*\)")
_LINK_TAIL = re.compile(r"\]\([^)\s]*\)")  # a link whose "[text" part went to an earlier clause
_HTML = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>")
_URL = re.compile(r"\b(?:https?://|www\.)([A-Za-z0-9.-]+)[^\s<>()\[\]—–]*")
_DOMAIN = re.compile(
    r"\b(?:[A-Za-z0-9-]+\.)+(?:com|org|net|io|ai|dev|edu|gov|app|co|uk|de|fr|ca|us)\b(?!\.?\w)"
    r"(?:/\S*[^\s.,;:!?)])?"
)
_EMAIL = re.compile(r"\b([\w.+-]+)@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)\b")
_HEADER = re.compile(r"^[ \t]*#{1,6}[ \t]+", re.M)
# At the start of the text or of a line.  Not after leading spaces at the very start: a clause the
# segmenter cut mid-line starts with the space that confirmed its boundary, and "10) " there is
# not a list marker.
_BULLET = re.compile(r"(?:\A|(?<=\n)[ \t]*)(?:[-*+•]|\d{1,3}[.)])[ \t]+")
_QUOTE = re.compile(r"^[ \t]*>+[ \t]?", re.M)
_RULE = re.compile(r"^[ \t]*(?:[-*_][ \t]*){3,}$", re.M)
_EMPHASIS = re.compile(r"[*~`]+|(?<![A-Za-z0-9])_+|_+(?![A-Za-z0-9])")
_ABOUT = re.compile(r"~(?=\s?[$€£¥]?\d)")
_HASH_NUMBER = re.compile(r"#(?=\d)")
_STAR_TIMES = re.compile(r"(?<=\d)\s+\*\s+(?=\d)")
_DROP_CATEGORIES = {"So", "Sk", "Co", "Cn", "Cs", "Cf", "Mn", "Me"}


def _speak_host(host: str) -> str:
    host = host.rstrip(".").lower()
    if host.startswith("www."):
        host = host[4:]
    return " dot ".join(p for p in host.split(".") if p)


def _drop_symbols(text: str) -> str:
    # Emoji, dingbats, variation selectors and joiners have no reading; accented letters survive
    # because we compose first and only drop combining marks that are left over.
    text = unicodedata.normalize("NFC", text)
    return "".join(" " if unicodedata.category(c) in _DROP_CATEGORIES and c not in "°^" else c for c in text)


def strip_markup(text: str) -> str:
    """Markdown, HTML and emoji that LLM output carries -> plain text with the same words."""
    text = _FENCE.sub(" ", text)
    text = _STAR_TIMES.sub(" times ", text)  # "5 * 3" is arithmetic, not emphasis
    text = _LINK.sub(r"\1", text)
    text = _LINK_TAIL.sub("", text)
    text = _HTML.sub(" ", text)
    text = _EMAIL.sub(lambda m: f"{m[1].replace('.', ' dot ')} at {_speak_host(m[2])}", text)
    text = _URL.sub(lambda m: _speak_host(m[1]), text)
    text = _DOMAIN.sub(lambda m: _speak_host(m[0].split("/")[0]), text)
    text = _RULE.sub("", text)
    text = _HEADER.sub("", text)
    text = _QUOTE.sub("", text)
    text = _BULLET.sub("", text)
    text = _ABOUT.sub("about ", text)
    text = _EMPHASIS.sub("", text)
    text = (
        _HASH_NUMBER.sub(" number ", text)
        .replace("#", " ")
        .replace("[", " ")
        .replace("]", " ")
        .replace("|", ", ")
    )
    return _drop_symbols(text)


# -- abbreviations and units ---------------------------------------------------------------------

_ABBREV = [
    (r"\bDr\.(?=[ \t]+[A-Z])", "Doctor"),
    (r"\bDr\.", "Drive"),
    (r"\bMr\.", "Mister"),
    (r"\bMrs\.", "Missus"),
    (r"\bMs\.", "Miz"),
    (r"\bProf\.", "Professor"),
    (r"\bSt\.(?=[ \t]+[A-Z])", "Saint"),
    (r"\bSt\.", "Street"),
    (r"\bJr\.", "Junior"),
    (r"\bSr\.", "Senior"),
    (r"\bMt\.", "Mount"),
    (r"\b[eE]\.\s?[gG]\.(?=\s|$|,)", "for example"),
    (r"\b[iI]\.\s?[eE]\.(?=\s|$|,)", "that is"),
    (r"\betc\.(?=\s*$|\s+[A-Z])", "et cetera."),
    (r"\betc\.", "et cetera"),
    (r"\bvs\.?(?=\s|$)", "versus"),
    (r"\bapprox\.", "approximately"),
    (r"\bNo\.(?=\s*\d)", "number"),
    (r"\b[aA]\.[mM]\.", "a.m."),
    (r"\b[pP]\.[mM]\.", "p.m."),
]
_ABBREV_RE = [(re.compile(p), r) for p, r in _ABBREV]

_UNITS = {
    "km/h": "kilometers per hour",
    "mph": "miles per hour",
    "km": "kilometers",
    "cm": "centimeters",
    "mm": "millimeters",
    "m": "meters",
    "mi": "miles",
    "kg": "kilograms",
    "mg": "milligrams",
    "g": "grams",
    "lb": "pounds",
    "lbs": "pounds",
    "oz": "ounces",
    "ml": "milliliters",
    "l": "liters",
    "L": "liters",
    "ft": "feet",
    "in": "inches",
    "kWh": "kilowatt hours",
    "kW": "kilowatts",
    "W": "watts",
    "V": "volts",
    "Hz": "hertz",
    "kHz": "kilohertz",
    "MHz": "megahertz",
    "GHz": "gigahertz",
    "KB": "kilobytes",
    "kB": "kilobytes",
    "MB": "megabytes",
    "GB": "gigabytes",
    "TB": "terabytes",
    "ms": "milliseconds",
    "sec": "seconds",
    "min": "minutes",
    "hrs": "hours",
    "hr": "hours",
    "h": "hours",
    "°C": "degrees Celsius",
    "°F": "degrees Fahrenheit",
    "°": "degrees",
    "x": "times",
}
_SINGULAR = {"feet": "foot", "inches": "inch", "hours": "hour", "times": "time"}
_NUM = r"-?\d(?:[\d,]*\d)?(?:\.\d+)?"
# "in" and "m" and "x" are only units straight after a numeral, never after a space, so "5 in a row"
# and "3 m" stay safe enough; the longer units accept a space.
_UNIT_RE = re.compile(
    rf"(?<![\w.])({_NUM})(?:[ ]?(°[CF]?)|(km/h|x)|[ ]?({'|'.join(sorted((u for u in _UNITS if u[0] != '°' and u not in ('in', 'x', 'km/h')), key=len, reverse=True))})|(in))(?![\w/])"
)


def _unit(m: re.Match[str]) -> str:
    num = m[1]
    unit = _UNITS[m[2] or m[3] or m[4] or m[5]]
    if num.lstrip("-") == "1":
        first, _, rest = unit.partition(" ")
        first = _SINGULAR.get(first, first[:-1] if first.endswith("s") and first != "Celsius" else first)
        unit = f"{first} {rest}".strip()
    return f"{number_words(num)} {unit}"


# -- money, times, dates -------------------------------------------------------------------------

_CURRENCY = {"$": ("dollar", "cent"), "€": ("euro", "cent"), "£": ("pound", "penny"), "¥": ("yen", "")}
_MAGNITUDE = {"k": "thousand", "m": "million", "b": "billion", "bn": "billion", "t": "trillion"}
_MONEY = re.compile(
    r"(-?)([$€£¥])\s?(\d[\d,]*(?:\.\d+)?)(?:\s?(thousand|million|billion|trillion|bn|[kKmMbBtT])\b)?"
)
_MONTHS = "January February March April May June July August September October November December".split()
_MONTH_RE = "|".join(_MONTHS + [m[:3] + r"\.?" for m in _MONTHS])
_ISO_DATE = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")
_MONTH_DAY = re.compile(rf"\b({_MONTH_RE})\s+(\d{{1,2}})(?:st|nd|rd|th)?\b(?:,?\s+(\d{{4}})\b)?")
_TIME = re.compile(
    r"(?<![\d.,])\b(\d{1,2})(?::|\.(?=\d\d\s*[aApP]\.?[mM]\b))(\d{2})(?::(\d{2}))?(?:\s*([aApP])\.?[mM]\.?(?![A-Za-z]))?"
)
_AMPM = re.compile(r"(?<![\d.,:])\b(\d{1,2})\s*([aApP])\.?[mM]\.?(?![A-Za-z])")
_PERCENT = re.compile(rf"({_NUM})\s?%")
_ORDINAL = re.compile(r"\b(\d+)(?:st|nd|rd|th)\b")
_YEAR = re.compile(r"(?<![\d,.$€£¥-])\b(1[1-9]\d\d|20\d\d)\b(?!\d|[,.]\d)")
_RANGE = re.compile(r"(?:(?<=[\d%])|(?<=[aApP][mM]))[ ]?[-–][ ]?(?=[$€£¥]?\d)")  # 3-5, 10am-2pm
_LETTER_DASH_DIGIT = re.compile(r"(?<=[A-Za-z])-(?=\d)")  # COVID-19, GPT-4, mid-2020s
_RATIO = re.compile(r"(?<=\d):(?=\d)")  # what _TIME left: 2:1, 16:9
_DECADE = re.compile(r"(?<![\d.,])'?(\d0|1\d\d0|20\d0)'?s\b")
_PER = re.compile(r"\s*/\s*(?=(?:month|mo|year|yr|week|day|night|hour|hr|person|user|unit|seat)\b)")
_FRACTION = re.compile(r"(?<![\d/.])(\d{1,3}(?:\.\d+)?)/(\d{1,3})(?![\d/])")
_NUMBER = re.compile(r"(?:(?<=\s)|(?<=^)|(?<=[(\[\"']))[-−](?=\d)|\d{1,3}(?:,\d{3})+(?!\d)|\d+")
_DECIMAL = re.compile(r"(?<![\d.])(-?\d[\d,]*\.\d+|\.\d+)(?![\d.])")
_ARITH = [
    (re.compile(r"(?<=\d)\s*\+\s*(?=\d)"), " plus "),
    (re.compile(r"(?<=\d)\s*[*×]\s*(?=\d)"), " times "),
    (re.compile(r"(?<=\d)\s*=\s*(?=\d)"), " equals "),
    (re.compile(r"(?<=\d)\s*\^\s*(?=\d)"), " to the power of "),
]
_DIGIT_DOT = re.compile(r"(?<=\d)\.(?=\d)")
_SCALED = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(k|K|M|B|bn|T)\b")


def _money(m: re.Match[str]) -> str:
    sign, sym, amount, mag = m[1], m[2], m[3].replace(",", ""), m[4]
    unit, sub = _CURRENCY[sym]
    prefix = "minus " if sign else ""
    if mag:
        scale = _MAGNITUDE.get(mag.lower(), mag.lower())
        return f"{prefix}{number_words(amount)} {scale} {unit}s"
    whole, _, frac = amount.partition(".")
    n = int(whole or 0)
    words = f"{cardinal(n)} {unit}{'s' if n != 1 and unit != 'yen' else ''}"
    if len(frac) == 2 and sub:
        cents = int(frac)
        if cents:
            sub_words = "pence" if sub == "penny" and cents != 1 else sub + ("s" if cents != 1 else "")
            words = f"{words} and {cardinal(cents)} {sub_words}" if n else f"{cardinal(cents)} {sub_words}"
    elif frac:
        words = f"{number_words(amount)} {unit}s"
    return prefix + words


def _clock(m: re.Match[str]) -> str:
    h, mins, secs, ampm = int(m[1]), int(m[2]), m[3], m[4]
    if h > 24 or mins > 59:
        return f"{cardinal(h)} {cardinal(mins)}"
    if mins == 0:
        words = cardinal(h) + ("" if ampm else " o'clock")
    elif mins < 10:
        words = f"{cardinal(h)} oh {cardinal(mins)}"
    else:
        words = f"{cardinal(h)} {cardinal(mins)}"
    if secs:
        words += f" and {cardinal(int(secs))} seconds"
    if ampm:
        words += f" {ampm.lower()}.m."
    return words


def _month_day(m: re.Match[str]) -> str:
    month = next(x for x in _MONTHS if x.startswith(m[1][:3]))
    day = int(m[2])
    if not 1 <= day <= 31:
        return m[0]
    return f"{month} {ordinal(day)}" + (f", {year(int(m[3]))}" if m[3] else "")


def _iso_date(m: re.Match[str]) -> str:
    mo, d = int(m[2]), int(m[3])
    if not (1 <= mo <= 12 and 1 <= d <= 31):
        return m[0]
    return f"{_MONTHS[mo - 1]} {ordinal(d)}, {year(int(m[1]))}"


def _decade(m: re.Match[str]) -> str:
    n = int(m[1])
    words = year(n) if n >= 1000 else cardinal(n)
    return words[:-1] + "ies" if words.endswith("y") else words + ("es" if words.endswith("x") else "s")


def _fraction(m: re.Match[str]) -> str:
    if "." in m[1]:
        return f"{number_words(m[1])} out of {cardinal(int(m[2]))}"  # a rating: 4.5/5
    a, b = int(m[1]), int(m[2])
    if (a, b) == (24, 7):
        return "twenty-four seven"
    if a >= b or b > 10:
        return f"{cardinal(a)} {cardinal(b)}" if a == b else f"{cardinal(a)} over {cardinal(b)}"
    if b == 2:
        den = "half" if a == 1 else "halves"
    elif b == 4:
        den = "quarter" + ("s" if a != 1 else "")
    elif 3 <= b <= 31:
        den = ordinal(b) + ("s" if a != 1 else "")
    else:
        return f"{cardinal(a)} over {cardinal(b)}"
    return f"{cardinal(a)} {den}"


def _numbers(text: str) -> str:
    text = _ISO_DATE.sub(_iso_date, text)
    text = _RANGE.sub(" to ", text)
    text = _LETTER_DASH_DIGIT.sub(" ", text)
    text = _DECADE.sub(_decade, text)
    text = _MONEY.sub(_money, text)
    text = _PER.sub(" per ", text)
    text = _PERCENT.sub(lambda m: f"{number_words(m[1])} percent", text)
    text = _TIME.sub(_clock, text)
    text = _AMPM.sub(lambda m: f"{cardinal(int(m[1]))} {m[2].lower()}.m.", text)
    text = _MONTH_DAY.sub(_month_day, text)
    text = _ORDINAL.sub(lambda m: ordinal(int(m[1])), text)
    text = _UNIT_RE.sub(_unit, text)
    text = _SCALED.sub(lambda m: f"{number_words(m[1])} {_MAGNITUDE[m[2].lower()]}", text)
    text = _FRACTION.sub(_fraction, text)
    text = _YEAR.sub(lambda m: year(int(m[1])), text)
    for pattern, words in _ARITH:
        text = pattern.sub(words, text)
    text = _RATIO.sub(" to ", text)
    text = _DECIMAL.sub(lambda m: number_words(m[1]), text)
    text = _DIGIT_DOT.sub(" point ", text)  # what is left: "2.0.1", "1.2.3.4"
    # Whatever is left: every digit run is a cardinal, every leading minus is "minus".
    return _NUMBER.sub(
        lambda m: (
            "minus "
            if m[0] in "-−"
            else f" {number_words(m[0])} "
            if m[0][0] != "0" or len(m[0]) == 1
            else f" {_digits(m[0])} "
        ),
        text,
    )


# -- the whole pipeline --------------------------------------------------------------------------

_SYMBOLS = {
    "&": " and ",
    "@": " at ",
    "+": " plus ",
    "=": " equals ",
    "/": " ",
    "\\": " ",
    "^": " ",
    "<": " ",
    ">": " ",
    "{": " ",
    "}": " ",
    "_": " ",
    "°": " degrees ",
    "•": " ",
}
_LINE_BREAK = re.compile(r"([^\s.,;:!?])[ \t]*\n\s*(?=\S)")
_LONE_DASH = re.compile(r"(?<!\S)-+(?!\S)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])")
_REPEATED_PUNCT = re.compile(r"([,;:])(?:\s*[,;:])+")
_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Raw LLM text (one clause or a whole answer) -> words a phonemiser can read.

    Line breaks inside the text become commas so that list items keep a pause between them.
    """
    text = strip_markup(text)
    text = _LINE_BREAK.sub(r"\1,\n", text)
    for pattern, words in _ABBREV_RE:
        text = pattern.sub(words, text)
    text = _numbers(text)
    text = "".join(_SYMBOLS.get(c, c) for c in text)
    text = _LONE_DASH.sub(", ", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _REPEATED_PUNCT.sub(r"\1", text)
    text = _SPACES.sub(" ", text).strip()
    return text.lstrip(",;:. ").strip()
