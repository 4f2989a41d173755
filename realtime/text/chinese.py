"""Chinese readings: wetext (WeTextProcessing's runtime, graphs inside the wheel, nothing
downloaded) for numbers, dates, units and money, with our rules before it where it reads wrong
(phone numbers read as arithmetic, ``3 * 4``, ``~5``, ``$12.50`` read as "十二点五零", the
hyphen of ``GPT-4`` read as a minus) and the official CosyVoice2 rules after it."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from functools import lru_cache

__all__ = ["read", "warmup", "wetext_normalize"]

_ZH_DIGITS = "零一二三四五六七八九"
_PHONE_DIGITS = "零幺二三四五六七八九"  # a phone number's 1 is 幺, as people read it
_CURRENCY = {"$": "美元", "€": "欧元", "£": "英镑", "¥": "元", "￥": "元"}

_PHONE = re.compile(
    r"(?<![\d.-])(?:\+\d{1,3}[ -]?)?(?:1\d{2}[ -]?\d{4}[ -]?\d{4}|\(?\d{3,4}\)?[ -]\d{3,4}[ -]?\d{4}|\d{3}-\d{4}|[(（]\d{3,4}[)）][ -]?\d{7,8})"
    r"(?![\d-]|\s*[\u4e00-\u9fff%])"  # not "100-2000元", a range
)
_CODE = re.compile(r"(?<=[A-Za-z])\d{4,}")  # SF1234567890: a code, digit by digit
_VERSION = re.compile(r"(?<![\d.])\d+(?:\.\d+){2,}(?![\d.])")  # 2.1.0
_NEGATIVE_PERCENT = re.compile(r"(?<![\dA-Za-z.])[-−](?=\d[\d.]*%)")  # wetext: 百分之负三
_NTH = re.compile(r"第(\d+)")  # wetext reads 第2季度 as 第两季度
_MOBILE = re.compile(r"(?<!\d)1[3-9]\d{9}(?!\d)")
_TIMES = re.compile(r"(?<=\d)\s*[*×]\s*(?=\d)")
_DIVIDE = re.compile(r"(?<=\d)\s*÷\s*(?=\d)")
_RANGE = re.compile(r"(?<=\d)\s*[~～]\s*(?=\d)")  # 15~20℃
_ABOUT = re.compile(r"(?<![约大概])[~～](?=\s?[$€£¥￥]?\d)")
_MONEY = re.compile(r"([$€£¥￥])\s?(\d[\d,]*(?:\.\d+)?)")
_TWO = re.compile(r"(?<![\d.])2(?=倍|点(?!\d))")  # 两倍, 两点 (o'clock), as wetext says 两个
_LETTER_DASH_DIGIT = re.compile(r"(?<=[A-Za-z])-(?=\d)")
_MARKUP = re.compile(r"\*+|`+|~+|～|_+|#+|[\[\]{}|\\^•·]|(?<!\d)\s*[<>]|[<>]\s*(?!\d)")
_ORDINAL = re.compile(r"(?<![\dA-Za-z.])(\d+)(?:st|nd|rd|th)(?![A-Za-z])")  # 21st -> 第21


def _phone(m: re.Match[str]) -> str:
    return "，".join("".join(_PHONE_DIGITS[int(d)] for d in g) for g in re.findall(r"\d+", m[0]))


def _money(m: re.Match[str]) -> str:
    whole, _, frac = m[2].replace(",", "").partition(".")
    frac = frac.rstrip("0")
    said = wetext_normalize(whole, "zh") + ("点" + "".join(_ZH_DIGITS[int(d)] for d in frac) if frac else "")
    return said + _CURRENCY[m[1]]


_READ_SYMBOLS = set("°℃℉")


def _drop(text: str, keep_letter: Callable[[str], bool]) -> str:
    """Emoji and letters of scripts the voice does not speak are not read."""
    out = []
    for i, c in enumerate(text):
        cat = unicodedata.category(c)
        if cat[0] == "L" and not keep_letter(c):
            continue
        if cat == "So" and c in _READ_SYMBOLS:  # wetext reads these ("-5°C", "20℃")
            out.append(c)
            continue
        if cat in ("So", "Sk", "Co", "Cn", "Cs", "Cf", "Me") or (
            cat == "Mn" and not (i and text[i - 1].isalpha())
        ):
            continue
        out.append(c)
    return "".join(out)


@lru_cache(maxsize=2)
def _wetext(lang: str):
    from wetext import Normalizer

    return Normalizer(lang=lang, operator="tn", remove_erhua=False)


@lru_cache(maxsize=4096)
def wetext_normalize(text: str, lang: str = "zh") -> str:
    try:
        return _wetext(lang).normalize(text)
    except Exception:  # wetext asserts on some inputs; unnormalised text is still speakable
        return text


def warmup() -> None:
    """Load the wetext graph now (about a second) rather than on the first request."""
    wetext_normalize("1", "zh")


def _keep_space(left: str, right: str) -> bool:
    """A space survives only between two ASCII characters (the official replace_blank rule)."""
    return bool(left) and bool(right) and left.isascii() and right.isascii()


def _squeeze_blanks(text: str) -> str:
    out = []
    for i, c in enumerate(text):
        if c.isspace():
            left = text[i - 1] if i > 0 else ""
            right = text[i + 1] if i + 1 < len(text) else ""
            if _keep_space(left, right) and not left.isspace():
                out.append(" ")
        else:
            out.append(c)
    return "".join(out)


def _post(text: str) -> str:
    """The official frontend's rules after wetext (FACTS: replace_blank and its replacements)."""
    text = text.replace("\n", "")
    text = _squeeze_blanks(text)
    text = text.replace("²", "平方").replace("³", "立方")
    text = text.replace(".", "。").replace(" - ", "，")
    for c in "（）【】`":
        text = text.replace(c, "")
    return text.replace("——", "，")


def read(text: str, keep_letter: Callable[[str], bool]) -> str:
    """A stretch of Chinese text (no markup tags, no URLs: the lexer took those) -> what is said."""
    text = _PHONE.sub(_phone, text)
    text = _MOBILE.sub(_phone, text)
    text = _CODE.sub(lambda m: "".join(_PHONE_DIGITS[int(d)] for d in m[0]), text)
    text = _VERSION.sub(lambda m: "点".join(wetext_normalize(p, "zh") for p in m[0].split(".")), text)
    text = _NEGATIVE_PERCENT.sub("负", text)
    text = _TIMES.sub("乘", text)
    text = _DIVIDE.sub("除以", text)
    text = _RANGE.sub("到", text)
    text = _ABOUT.sub("约", text)
    text = _MONEY.sub(_money, text)
    text = _TWO.sub("两", text)
    text = _LETTER_DASH_DIGIT.sub("", text)
    text = _ORDINAL.sub(r"第\1", text)
    text = _NTH.sub(lambda m: "第" + wetext_normalize(m[1], "zh"), text)
    text = _MARKUP.sub(" ", text)
    text = " ".join(_drop(text, keep_letter).split())
    if not text:
        return ""
    # wetext escapes some quotes (\\"); there is no backslash in its input (markup went above)
    return _post(wetext_normalize(text, "zh").replace("\\", ""))
