"""English readings: number words, and the lexer that turns one piece of LLM text into spans.

The lexer is one regular expression made of every rule below (first rule wins at a position), run
over the piece with the whole text around it visible to look-behinds.  A rule's match is one
source token said as one unit ("3:45 pm", "$12.50", "60 km/h", "555-0123", a URL), so a word
timer can report it as one word; what no rule matches is plain text, read character by character
(words as they are, markup and emoji as nothing, a few symbols as words).  The output never
contains a digit, markdown, a backtick or an emoji, whatever the input.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["cardinal", "ordinal", "year", "number_words", "digits", "lex", "Raw"]

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
        return digits(str(n))
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


def digits(s: str) -> str:
    """Digit by digit: "007" -> "zero zero seven" (codes, phone numbers, leading zeros)."""
    return " ".join(_ONES[int(d)] for d in s if d.isdigit())


def number_words(s: str) -> str:
    """A numeral as written ("1,000", "-3.25", ".5") -> words."""
    neg = s.startswith(("-", "−"))
    s = s.lstrip("-−").replace(",", "")
    whole, _, frac = s.partition(".")
    if len(whole) > 1 and whole.startswith("0"):
        words = digits(whole)
    else:
        words = cardinal(int(whole)) if whole else "zero"
    if frac:
        words += " point " + digits(frac)
    return ("minus " + words) if neg else words


# -- rules ---------------------------------------------------------------------------------------

_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_MONTHS = "January February March April May June July August September October November December".split()
_MONTH_RE = "|".join(_MONTHS + [m[:3] + r"\.?" for m in _MONTHS if m != "May"] + ["Sept\\.?"])
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_DAY_RE = "|".join(_DAYS + ["Mon", "Tues?", "Wed", "Thu(?:rs?)?", "Fri", "Sat", "Sun"])
_CURRENCY = {"$": ("dollar", "cent"), "€": ("euro", "cent"), "£": ("pound", "penny"), "¥": ("yen", "")}
_MAGNITUDE = {"k": "thousand", "m": "million", "b": "billion", "bn": "billion", "t": "trillion"}

# unit -> its reading after any number but one; the singular is derived (_singular)
_UNITS = {
    "km/h": "kilometers per hour",
    "kph": "kilometers per hour",
    "mph": "miles per hour",
    "m/s": "meters per second",
    "km/s": "kilometers per second",
    "ft/s": "feet per second",
    "m/s²": "meters per second squared",
    "m/s2": "meters per second squared",
    "km²": "square kilometers",
    "m²": "square meters",
    "cm²": "square centimeters",
    "ft²": "square feet",
    "m³": "cubic meters",
    "cm³": "cubic centimeters",
    "km": "kilometers",
    "cm": "centimeters",
    "mm": "millimeters",
    "µm": "micrometers",
    "nm": "nanometers",
    "m": "meters",
    "mi": "miles",
    "kg": "kilograms",
    "mg": "milligrams",
    "g": "grams",
    "lb": "pounds",
    "lbs": "pounds",
    "oz": "ounces",
    "ml": "milliliters",
    "mL": "milliliters",
    "l": "liters",
    "L": "liters",
    "ft": "feet",
    "yd": "yards",
    "kWh": "kilowatt hours",
    "kW": "kilowatts",
    "MW": "megawatts",
    "W": "watts",
    "V": "volts",
    "mA": "milliamps",
    "mAh": "milliamp hours",
    "Hz": "hertz",
    "kHz": "kilohertz",
    "MHz": "megahertz",
    "GHz": "gigahertz",
    "dB": "decibels",
    "KB": "kilobytes",
    "kB": "kilobytes",
    "MB": "megabytes",
    "GB": "gigabytes",
    "TB": "terabytes",
    "MB/s": "megabytes per second",
    "GB/s": "gigabytes per second",
    "Mbps": "megabits per second",
    "Gbps": "gigabits per second",
    "fps": "frames per second",
    "rpm": "revolutions per minute",
    "kcal": "kilocalories",
    "cal": "calories",
    "ms": "milliseconds",
    "µs": "microseconds",
    "ns": "nanoseconds",
    "sec": "seconds",
    "secs": "seconds",
    "min": "minutes",
    "mins": "minutes",
    "hrs": "hours",
    "hr": "hours",
    "h": "hours",
    "°C": "degrees Celsius",
    "℃": "degrees Celsius",
    "°F": "degrees Fahrenheit",
    "°": "degrees",
    "in": "inches",
    "x": "times",
}
_TIGHT_UNITS = ("in", "x")  # only straight after the numeral: "5 in a row", "3 x 4"
_SINGULAR = {"feet": "foot", "inches": "inch", "hours": "hour", "times": "time", "hertz": "hertz"}
_UNIT_ALTS = "|".join(re.escape(u) for u in sorted(_UNITS, key=len, reverse=True) if u not in _TIGHT_UNITS)

_SYMBOL_WORDS = {
    "&": " and ",
    "@": " at ",
    "+": " plus ",
    "=": " equals ",
    "%": " percent ",
    "°": " degrees ",
    "×": " times ",
    "÷": " divided by ",
    "≈": " approximately ",
    "≠": " is not equal to ",
    "≤": " is less than or equal to ",
    "≥": " is greater than or equal to ",
    "±": " plus or minus ",
    "∞": " infinity ",
    "π": " pi ",
    "√": " square root of ",
    "→": " to ",
    "²": " squared ",
    "³": " cubed ",
    "|": ", ",
    "…": "...",
    "，": ", ",
    "。": ". ",
    "！": "! ",
    "？": "? ",
    "；": "; ",
    "：": ": ",
    "、": ", ",
    "（": " (",
    "）": ") ",
    "“": '"',
    "”": '"',
    "‘": "'",
    "’": "'",
}
_SILENT_SYMBOLS = set("#*`~_[]{}<>\\/^•·")
_DROP_CATEGORIES = {"So", "Sk", "Co", "Cn", "Cs", "Cf", "Me", "Sc"}
_ENTITIES = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'", "nbsp": " "}


def _singular(unit: str) -> str:
    first, _, rest = unit.partition(" ")
    if first in _SINGULAR:
        first = _SINGULAR[first]
    elif first.endswith("s") and first not in ("Celsius", "degrees"):
        first = first[:-1]
    elif first == "degrees":
        first = "degree"
    return f"{first} {rest}".strip()


def _spell(name: str) -> str:
    """A name in an address: its digits as words ("web3" -> "web three"), dots said."""
    name = re.sub(r"\d+", lambda m: f" {number_words(m[0])} ", name)
    name = re.sub(r"[._+-]+", lambda m: " dot " if "." in m[0] else " ", name)
    return " ".join(name.split())


def _speak_host(host: str) -> str:
    host = host.rstrip(".").lower()
    if host.startswith("www."):
        host = host[4:]
    return _spell(host)


def _money(m: re.Match[str]) -> str:
    sign, sym, amount, mag = m[1], m[2], m[3].replace(",", ""), m[4]
    unit, sub = _CURRENCY[sym]
    prefix = "minus " if sign else ""
    plural = "" if unit == "yen" else "s"
    if mag:
        scale = _MAGNITUDE.get(mag.lower(), mag.lower())
        return f"{prefix}{number_words(amount)} {scale} {unit}{plural}"
    whole, _, frac = amount.partition(".")
    n = int(whole or 0)
    words = f"{cardinal(n)} {unit}{plural if n != 1 else ''}"
    if len(frac) == 2 and sub:
        cents = int(frac)
        if cents:
            sub_words = "pence" if sub == "penny" and cents != 1 else sub + ("s" if cents != 1 else "")
            words = f"{words} and {cardinal(cents)} {sub_words}" if n else f"{cardinal(cents)} {sub_words}"
    elif frac:
        words = f"{number_words(amount)} {unit}{plural}"
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


def _day(name: str) -> str:
    return next(x for x in _DAYS if x.startswith(name[:3]))


def _month(name: str) -> str:
    return next(x for x in _MONTHS if x.startswith(name[:3]))


def _month_day(m: re.Match[str]) -> str | None:
    day = int(m[2])
    if not 1 <= day <= 31:
        return None
    return f"{_month(m[1])} {ordinal(day)}" + (f", {year(int(m[3]))}" if m[3] else "")


def _day_month(m: re.Match[str]) -> str | None:
    day = int(m[1])
    if not 1 <= day <= 31:
        return None
    return f"the {ordinal(day)} of {_month(m[2])}" + (f", {year(int(m[3]))}" if m[3] else "")


def _iso_date(m: re.Match[str]) -> str | None:
    mo, d = int(m[2]), int(m[3])
    if not (1 <= mo <= 12 and 1 <= d <= 31):
        return None
    return f"{_MONTHS[mo - 1]} {ordinal(d)}, {year(int(m[1]))}"


def _us_date(m: re.Match[str]) -> str | None:
    mo, d, y = int(m[1]), int(m[2]), m[3]
    if not (1 <= mo <= 12 and 1 <= d <= 31):
        return None
    y_words = year(int(y)) if len(y) == 4 else f"{'oh ' if y[0] == '0' else ''}{cardinal(int(y))}"
    return f"{_MONTHS[mo - 1]} {ordinal(d)}, {y_words}"


def _decade(m: re.Match[str]) -> str:
    n = int(m[1])
    if n % 1000 == 0:  # "1000s of users", "the 2000s"
        return "thousands" if n == 1000 else cardinal(n) + "s"
    words = year(n) if n >= 1000 else cardinal(n)
    return words[:-1] + "ies" if words.endswith("y") else words + ("es" if words.endswith("x") else "s")


def _fraction(m: re.Match[str]) -> str:
    if "." in m[1]:
        return f"{number_words(m[1])} out of {cardinal(int(m[2]))}"  # a rating: 4.5/5
    a, b = int(m[1]), int(m[2])
    if (a, b) == (24, 7):
        return "twenty-four seven"
    if (a, b) == (50, 50):
        return "fifty-fifty"
    if a <= b and b in (5, 10, 100):  # a score: 8/10
        return f"{cardinal(a)} out of {cardinal(b)}"
    if b == 0 or a >= b or b > 10:
        return f"{cardinal(a)} over {cardinal(b)}"
    if b == 2:
        den = "half" if a == 1 else "halves"
    elif b == 4:
        den = "quarter" + ("s" if a != 1 else "")
    else:
        den = ordinal(b) + ("s" if a != 1 else "")
    return f"{cardinal(a)} {den}"


def _unit(m: re.Match[str]) -> str:
    num, unit = m[1], m[2] or m[3]
    words = _UNITS[unit]
    if num.lstrip("-−") == "1":
        words = _singular(words)
    return f"{number_words(num)} {words}"


def _feet_inches(m: re.Match[str]) -> str:
    feet, inches = int(m[1]), int(m[2])
    return f"{cardinal(feet)} {'foot' if feet == 1 else 'feet'} {cardinal(inches)} {'inch' if inches == 1 else 'inches'}"


def _phone(m: re.Match[str]) -> str:
    groups = re.findall(r"\d+", m[0])
    lead = "plus " if m[0].startswith("+") else ""
    return lead + ", ".join(digits(g) for g in groups)


def _time_words(m: re.Match[str]) -> str:
    return f"{cardinal(int(m[1]))} {m[2].lower()}.m."


def _version(m: re.Match[str]) -> str:
    return " point ".join(number_words(p) for p in m[0].split("."))


def _number(m: re.Match[str]) -> str:
    return number_words(m[0])


def _entity(m: re.Match[str]) -> str:
    name = m[1]
    if name.startswith("#"):
        try:
            c = chr(int(name[2:], 16) if name[1:2] in "xX" else int(name[1:]))
        except (ValueError, OverflowError):
            return " "
        return _SYMBOL_WORDS.get(c, c if c.isalnum() else " ")
    return _SYMBOL_WORDS.get(_ENTITIES.get(name, " "), _ENTITIES.get(name, " "))


_ABBREVIATIONS = {
    "mr": "Mister",
    "mrs": "Missus",
    "ms": "Miz",
    "prof": "Professor",
    "jr": "Junior",
    "sr": "Senior",
    "mt": "Mount",
    "vs": "versus",
    "approx": "approximately",
    "incl": "including",
    "excl": "excluding",
    "inc": "Incorporated",
    "ltd": "Limited",
    "corp": "Corporation",
    "fig": "figure",
    "dept": "department",
    "eg": "for example",
    "ie": "that is",
    "am": "a.m.",
    "pm": "p.m.",
}


def _abbreviation(text: str, m: re.Match[str]) -> str:
    key = m[0].replace(".", "").replace(" ", "").lower()
    after = text[m.end() : m.end() + 3]
    capital_next = bool(re.match(r"[ \t]+[A-Z]", after))
    if key == "dr":
        return "Doctor" if capital_next else "Drive"
    if key == "st":
        return "Saint" if capital_next else "Street"
    if key == "no":
        return "number"
    if key == "etc":
        return "et cetera" + ("." if not after.strip() or capital_next else "")
    return _ABBREVIATIONS[key]


# Each rule: (pattern, reading).  The reading gets the rule's own match (its groups numbered as in
# the pattern) and the text, and returns the words, or None when the match is not what it looked
# like (then the characters are read as plain text).  First rule wins at a position.
Reading = Callable[[str, re.Match[str]], str | None]


def _w(f: Callable[[re.Match[str]], str | None]) -> Reading:
    return lambda text, m: f(m)


def _const(s: str) -> Reading:
    return lambda text, m: s


_EN_RULES: list[tuple[str, Reading, bool]] = [
    # (pattern, reading, word-like: needs a space against letters on either side)
    # -- markup
    (r"```[\w+-]*", _const(" "), False),
    (r"<!--.*?-->", _const(" "), False),
    (r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>", _const(" "), False),
    (r"&(#\d{1,7}|#[xX][0-9a-fA-F]{1,6}|[a-z]{2,6});", _w(_entity), False),
    (r"(?:\A|(?<=\n))[ \t]*(?:[-*_][ \t]*){3,}(?=\n|\Z)", _const(" "), False),  # a rule line
    (r"(?:\A|(?<=\n))[ \t]*\|?(?:[ \t]*:?-{3,}:?[ \t]*\|)+[ \t]*:?-*:?[ \t]*(?=\n|\Z)", _const(" "), False),
    (r"(?:\A|(?<=\n)[ \t]*)(?:(?:#{1,6}|[-*+•]|\d{1,3}[.)])[ \t]+|>+[ \t]*)", _const(""), False),
    (r"!?\[|\]\([^)\s]*\)|\]", _const(""), False),
    # -- addresses
    (r"(?<![A-Za-z0-9.+_-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+",
     _w(lambda m: f"{_spell(m[0].split('@')[0])} at {_speak_host(m[0].split('@')[1])}"), True),
    (r"(?<![A-Za-z0-9])(?:https?://|www\.)([A-Za-z0-9.-]+)(?:[!#-'*-;=?-Z_a-z~]*[#-&*-+/-9=?-Z_a-z~])?",
     _w(lambda m: _speak_host(m[1])), True),
    (r"(?<![A-Za-z0-9.-])(?:[A-Za-z0-9-]+\.)+(?:com|org|net|io|ai|dev|edu|gov|app|co|uk|de|fr|ca|us)"
     r"(?![A-Za-z0-9]|\.[A-Za-z0-9])(?:/[!#-'*-;=?-Z_a-z~]*[#-&*-+/-9=?-Z_a-z~])?", _w(lambda m: _speak_host(m[0].split("/")[0])), True),
    # -- money, phone numbers, dates, times
    (r"(?<![\w.])([-−]?)([$€£¥])\s?(\d[\d,]*(?:\.\d+)?)(?:\s?(thousand|million|billion|trillion|bn|[kKmMbBtT])\b)?",
     _w(_money), True),
    (r"(?<![\w.+-])(?:\+\d{1,3}[ .-]?|1[ .-])?(?:\(\d{3}\)[ ]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w-])"
     r"|(?<![\w.-])\d{3}-\d{4}(?![\w-]|\.\d)"
     r"|(?<![\w+])\+\d{1,3}(?:[ .-]\(?\d{1,4}\)?){2,5}(?![\w-])", _w(_phone), True),
    (r"\b(\d{4})-(\d{2})-(\d{2})\b", _w(_iso_date), True),
    (r"(?<![\w/.])(\d{1,2})/(\d{1,2})/(\d{4}|\d{2})(?![\w/])", _w(_us_date), True),
    (r"(?<![\d.,:])(\d{1,2})(?::|\.(?=\d\d\s*[aApP]\.?[mM]\b))(\d{2})(?::(\d{2}))?"
     r"(?:\s*([aApP])\.?[mM]\.?(?![A-Za-z]))?(?![\d:])", _w(_clock), True),
    (r"(?<![\d.,:])(\d{1,2})\s*([aApP])\.?[mM]\b\.?", _w(_time_words), True),
    (rf"\b({_MONTH_RE})\s+(\d{{1,2}})(?:st|nd|rd|th)?\b(?:,?\s+(\d{{4}})\b)?", _w(_month_day), True),
    (rf"\b({_MONTH_RE})\s+(1[1-9]\d\d|20\d\d)\b(?![\d,]|[.:]\d)", _w(lambda m: f"{_month(m[1])} {year(int(m[2]))}"), True),
    (rf"\b(\d{{1,2}})(?:st|nd|rd|th)?\s+({_MONTH_RE})\b(?:,?\s+(\d{{4}})\b)?", _w(_day_month), True),
    (r"(?<![\d.,])'?(\d0|1\d\d0|20\d0)'?s\b", _w(_decade), True),
    # -- quantities
    (rf"(?<![\w.])([-−]?{_NUM})\s?%", _w(lambda m: f"{number_words(m[1])} percent"), True),
    (rf"(?<![\w.])([-−]?{_NUM})(?:[ -]?({_UNIT_ALTS})(?![\w/²³])|(in(?![\w/])|x(?=[ \t]+[A-Za-z]|[ \t]*[.,;:!?)]|[ \t]*$)))", _w(_unit), True),
    (r"(?<![\w.])(\d{1,2})'(\d{1,2})(?:\"|'')", _w(_feet_inches), True),
    (r"(?<![\w.])(\d+(?:\.\d+)?)(k|M|B|bn|T)\b",
     _w(lambda m: f"{number_words(m[1])} {_MAGNITUDE[m[2].lower()]}"), True),
    (r"\b(\d+)(?:st|nd|rd|th)\b", _w(lambda m: ordinal(int(m[1]))), True),
    (r"(?<![\d/.])(\d{1,3}(?:\.\d+)?)/(\d{1,3})(?![\d/])", _w(_fraction), True),
    (r"(?<![\w.])\d+(?:\.\d+){2,}(?![\w]|\.\d)", _w(_version), True),
    (r"(?<![\d,.$€£¥])\b(1[1-9]\d\d|20\d\d)\b(?!\d|[,.]\d|%)", _w(lambda m: year(int(m[1]))), True),
    # -- operators between numbers, ranges, signs
    (r"(?<=\d) [-−] (?=\d)", _const(" minus "), False),
    (r"(?:(?<=[\d%])|(?<=\d[aApP][mM])|(?<=\d[aApP]\.[mM]\.))[ ]?[-–][ ]?(?=[$€£¥]?\d)", _const(" to "), False),
    (r"(?<=[A-Za-z])-(?=\d)", _const(" "), False),  # COVID-19, GPT-4
    (r"(?<=\d)[ \t]*\+[ \t]*(?=\d)", _const(" plus "), False),
    (r"(?<=[\w)])[ \t]*[*×][ \t]*(?=[\d(])|(?<=[\w)])[ \t]+\*[ \t]+(?=[\w(])", _const(" times "), False),
    (r"[ \t]*/[ \t]*(?=(?:month|mo|year|yr|week|day|night|hour|hr|person|user|unit|seat|kg|lb)\b)",
     _const(" per "), False),
    (r"(?<=[\w)])[ \t]*[/÷][ \t]*(?=[\d(])|(?<=\w)[ \t]+/[ \t]+(?=\w)", _const(" divided by "), False),
    (r"(?<=[\w)])[ \t]*=[ \t]*(?=[\w(-])", _const(" equals "), False),
    (r"(?<=[\d)])[ \t]*<[ \t]*(?=[\d(-])|(?<=\w)[ \t]+<[ \t]+(?=[\w(-])", _const(" is less than "), False),
    (r"(?<=[\d)])[ \t]*>[ \t]*(?=[\d(-])|(?<=\w)[ \t]+>[ \t]+(?=[\w(-])", _const(" is greater than "), False),
    (r"\^2\b", _const(" squared "), False),
    (r"\^3\b", _const(" cubed "), False),
    (r"\^(?=\w)", _const(" to the power of "), False),
    (r"(?<=\d):(?=\d)", _const(" to "), False),  # a ratio: what the clock rule left (2:1, 16:9)
    (r"~(?=\s?[$€£¥]?\d)", _const(" about "), False),
    (r"#(?=[A-Z]?\d)", _const(" number "), False),
    (r"(?<=[A-Za-z])\d{4,}(?![\d.,])", _w(lambda m: digits(m[0])), True),  # a code: A1234
    (r"(?<=\b[CF])#", _const(" sharp"), False),
    (r"(?<![\w.])\.NET\b", _const("dot net"), True),
    (r"(?<![\w.,)%])[-−](?=\.?\d)", _const(" minus "), False),
    (rf"(?<![\d.,])(?:{_NUM}|\.\d+)(?!\d)", _w(_number), True),
    # -- abbreviations
    (r"\b(?:Dr|Mr|Mrs|Ms|Prof|St|Jr|Sr|Mt|approx|incl|excl|Inc|Ltd|Corp|Fig|Dept)\.|\b[eE]\.\s?[gG]\.(?=\s|$|,)"
     r"|\b[iI]\.\s?[eE]\.(?=\s|$|,)|\betc\.|\bvs\b\.?|\bNo\.(?=\s*\d)|\b[aApP]\.[mM]\.", _abbreviation, True),
    (rf"\b({_DAY_RE})\.?[ ]?[-–][ ]?({_DAY_RE})\b",
     _w(lambda m: f"{_day(m[1])} to {_day(m[2])}"), True),
    # -- dashes and emphasis
    (r"(?<!\S)[-–—]{1,3}(?!\S)|[—–]|(?<=\w)--(?=\w)", _const(", "), False),
    (r"(?<=[A-Za-z0-9])_+(?=[A-Za-z0-9])", _const(" "), False),  # snake_case
]  # fmt: skip


@dataclass
class Raw:
    """A span before spacing is settled: ``spoken`` may start or end with spaces; ``word`` marks a
    rule's reading, which needs a space against a letter on either side; ``run`` marks a stretch
    of plain text left whole for another reader (Chinese: wetext)."""

    start: int
    end: int
    spoken: str
    word: bool = False
    run: bool = False


_Rule = tuple[re.Pattern[str], Reading, bool]
_LEXERS: dict[tuple[bool, str | None], tuple[re.Pattern[str], list[_Rule]]] = {}


def _lexer(markup_only: bool, keep: str | None) -> tuple[re.Pattern[str], list[_Rule]]:
    key = (markup_only, keep)
    if key not in _LEXERS:
        rules = _EN_RULES[:_MARKUP_RULES] if markup_only else _EN_RULES
        table: list[_Rule] = [(re.compile(p, re.S), r, w) for p, r, w in rules]
        if keep:
            table.insert(0, (re.compile(keep), lambda text, m: m[0], False))
        master = re.compile("|".join(f"(?:{c.pattern})" for c, _, _ in table), re.S)
        _LEXERS[key] = (master, table)
    return _LEXERS[key]


def is_latin(c: str) -> bool:
    """Letters the English reader says (ASCII and accented Latin)."""
    return c.isascii() or "LATIN" in unicodedata.name(c, "")


def plain(c: str, prev: str, keep_letter: Callable[[str], bool]) -> str:
    """How one character that no rule matched is read."""
    if c.isspace():
        return "\n" if c == "\n" else " "
    if c in _SYMBOL_WORDS:
        return _SYMBOL_WORDS[c]
    if c in _SILENT_SYMBOLS:
        return " "
    if c.isascii() and c.isdigit():  # the number rule reads every digit run; a safety net
        return f" {digits(c)} "
    cat = unicodedata.category(c)
    if cat[0] in "LN":
        return c if keep_letter(c) else ""
    if cat == "Mn":  # a combining accent stays on its letter; a variation selector goes
        return c if prev and unicodedata.category(prev)[0] == "L" and keep_letter(prev) else ""
    if cat in _DROP_CATEGORIES or cat[0] == "C":
        return ""
    return c  # punctuation: the phonemiser reads it as a pause


def lex(
    text: str,
    start: int,
    end: int,
    keep: str | None = None,
    keep_letter: Callable[[str], bool] = is_latin,
    markup_only: bool = False,
) -> list[Raw]:
    """Spans of ``text[start:end]`` (the rest of ``text`` is context for look-behinds only).

    ``keep``: a pattern of tags passed through verbatim (CosyVoice2's ``[laughter]``);
    ``markup_only``: only markup and addresses are rules, and the plain text between them is one
    :attr:`Raw.run` each (Chinese: wetext reads it); ``keep_letter``: letters of the scripts the
    voice speaks (the others are read as nothing, and reported by ``unspeakable``).
    """
    master, table = _lexer(markup_only, keep)
    out: list[Raw] = []
    pos = start
    while pos < end:
        m = master.search(text, pos, end)
        at = m.start() if m else end
        if at > pos:
            out.extend(_plain(text, pos, at, keep_letter, markup_only))
        if m is None:
            break
        for compiled, reading, word in table:  # the first rule that matches here and accepts
            own = compiled.match(text, at, end)
            if own is None or own.end() == at:
                continue
            spoken = reading(text, own)
            if spoken is not None:
                out.append(Raw(at, own.end(), spoken, word and not markup_only))
                pos = own.end()
                break
        else:  # every rule declined (a date with month 13): the character is plain text
            out.extend(_plain(text, at, at + 1, keep_letter, markup_only))
            pos = at + 1
    return out


def _plain(text: str, start: int, end: int, keep_letter: Callable[[str], bool], run: bool) -> list[Raw]:
    """Plain characters: a word (letters, apostrophes, accents) is one span, every other character
    its own; with ``run`` the whole stretch is one span, read later."""
    if run:
        return [Raw(start, end, text[start:end], run=True)]
    out: list[Raw] = []
    i = start
    while i < end:
        j = i + 1
        if text[i].isalpha():
            while j < end and (text[j].isalpha() or text[j] == "'" or unicodedata.category(text[j]) == "Mn"):
                j += 1
            while text[j - 1] == "'":  # a closing quote is not part of the word
                j -= 1
        said = "".join(plain(text[k], text[k - 1] if k > 0 else "", keep_letter) for k in range(i, j))
        out.append(Raw(i, j, said))
        i = j
    return out


# Rules that are markup and addresses (what the Chinese reader takes from this lexer): the first ones.
_MARKUP_RULES = 11
