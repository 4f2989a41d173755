"""Text frontend: tokenizer with CosyVoice2's specials, whole-text and streaming normalisation,
paragraph splitting."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cosyvoice.text import (
    ADDITIONAL_SPECIAL_TOKENS,
    ENDOFTEXT,
    CosyVoice2Tokenizer,
    StreamingNormalizer,
    build_tiny_blank_en,
    is_cut,
    is_only_punctuation,
    normalize_text,
    split_paragraph,
    text_normalize,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> CosyVoice2Tokenizer:
    return CosyVoice2Tokenizer(build_tiny_blank_en(tmp_path_factory.mktemp("blank_en")))


# ---------------------------------------------------------------------------------------- tokenizer


def test_tiny_tokenizer_loads_as_qwen2_with_specials_in_order(tokenizer, tmp_path):
    assert type(tokenizer.tokenizer).__name__.startswith("Qwen2Tokenizer")
    base = tokenizer.token_id(ENDOFTEXT)
    ids = [tokenizer.token_id(t) for t in ADDITIONAL_SPECIAL_TOKENS]
    # Qwen2 layout: <|endoftext|>, <|im_start|>, <|im_end|>, then CosyVoice2's additions in order
    assert ids == list(range(base + 1, base + 1 + len(ADDITIONAL_SPECIAL_TOKENS)))
    assert len(tokenizer) == base + 1 + len(ADDITIONAL_SPECIAL_TOKENS)
    assert tokenizer.tokenizer.eos_token == ENDOFTEXT and tokenizer.tokenizer.pad_token == ENDOFTEXT
    config = json.loads(
        (build_tiny_blank_en(tmp_path / "again", vocab_size=300) / "tokenizer_config.json").read_text()
    )
    assert config["tokenizer_class"] == "Qwen2Tokenizer"


def test_special_tokens_encode_to_single_ids_without_bos_eos(tokenizer):
    eop = tokenizer.token_id("<|endofprompt|>")
    laugh = tokenizer.token_id("[laughter]")
    ids = tokenizer.encode("speak slowly<|endofprompt|>hello [laughter] there")
    assert ids.count(eop) == 1 and ids.count(laugh) == 1
    assert ids[0] != tokenizer.token_id(ENDOFTEXT) and ids[-1] != tokenizer.token_id(ENDOFTEXT)
    assert all(isinstance(i, int) for i in ids)


def test_encode_decode_round_trip_any_script(tokenizer):
    text = "Hello, world! 你好，世界。 Ünïcödé 123"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert max(ids) < len(tokenizer)
    # digits are split one by one, as in Qwen2
    assert len(tokenizer.encode("123")) == 3


def test_tokenizer_missing_dir_fails(tmp_path):
    with pytest.raises(FileNotFoundError):
        CosyVoice2Tokenizer(tmp_path / "nope")


# ----------------------------------------------------------------------------------- normalisation


def test_english_numbers_units_and_abbreviations():
    # wetext's English graph read this as "three point five dollars", "May five", "PM"; English is
    # now read by the service's one front end, the same as for the default voice
    out = normalize_text("I paid $3.50 for 2 apples on May 5, 2020 at 3:30pm. Dr. Smith said 10% more.")
    assert out == (
        "I paid three dollars and fifty cents for two apples on May fifth, twenty twenty at three thirty "
        "p.m. Doctor Smith said ten percent more."
    )


def test_chinese_numbers_and_symbols():
    out = normalize_text("我今天买了3个苹果，花了12.5元。温度是-5°C，比例50%。2020年5月3日")
    assert out == "我今天买了三个苹果，花了十二点五元。温度是负五摄氏度，比例百分之五十。二零二零年五月三日"


def test_chinese_blank_rule_and_trailing_comma():
    assert normalize_text("我喜欢 apple pie 和香蕉，") == "我喜欢apple pie和香蕉。"
    assert normalize_text("你好 ,、") == "你好。"


def test_markdown_is_not_read_aloud():
    out = normalize_text("**Hello** there, a _test_ of `code`.\n\n# Heading\n- item one\n- item 2\n> quote")
    assert out == "Hello there, a test of code. Heading, item one, item two, quote"  # line breaks pause
    assert normalize_text("see [the docs](http://x.y/z) now") == "see the docs now"
    assert normalize_text("3*4 [laughter]") == "three times four [laughter]"


def test_special_tags_survive_normalisation():
    assert normalize_text("Say it [laughter] loudly <strong>now</strong> please.") == (
        "Say it [laughter] loudly <strong>now</strong> please."
    )


def test_whitespace_is_collapsed():
    assert normalize_text("  Hello,   world!\n\tTwo  spaces  ") == "Hello, world! Two spaces"


@pytest.mark.parametrize(
    "text",
    [
        "我今天买了3个苹果，花了12.5元。",
        "第3名的成绩是98.5分，比去年高了20%。",
        "温度是-5°C，比例50%。2020年5月3日",
    ],
)
def test_piecewise_normalisation_equals_wetext_on_the_whole_sentence(text):
    from wetext import Normalizer

    assert normalize_text(text) == Normalizer(lang="zh").normalize(text)


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over 3 lazy dogs.",
        "It costs $12 and weighs 5 kg, about 10% more than last year.",
        "Meet me at 3:30 pm on May 5, 2020 near 221 Baker Street.",
    ],
)
def test_english_is_read_as_the_default_voice_reads_it(text):
    from realtime.text import normalize

    assert normalize_text(text) == normalize(text, "en")


def test_cuts_never_fall_inside_numbers_or_tags():
    text = "Pay $3.50 now, 2020年5月 [laughter] <|endofprompt|> ok go on"
    cuts = [i for i in range(len(text)) if is_cut(text, i)]
    spans = ["$3.50", "2020年", "[laughter]", "<|endofprompt|>", "5月"]
    for span in spans:
        a = text.index(span)
        assert not any(a < c < a + len(span) for c in cuts), span
    # the token before must be a plain word, and the one before that too
    assert text.index("ok") not in cuts and text.index("go") not in cuts
    assert text.index("on") in cuts


# ------------------------------------------------------------------------------------- streaming


def test_streaming_holds_back_an_unfinished_number():
    s = StreamingNormalizer()
    first = s.push("The price is 3")
    assert "3" not in first and "three" not in first
    assert s.pending.endswith("3")
    second = s.push(".5 dollars today and")
    assert "three point five dollars" in first + second
    rest = s.flush()
    assert first + second + rest == normalize_text("The price is 3.5 dollars today and")


def test_streaming_never_splits_a_special_tag():
    s = StreamingNormalizer()
    outs = [s.push(d) for d in ["Say it <|endof", "prompt|> and [laugh", "ter] then go on"]]
    outs.append(s.flush())
    assert all("<|endof" not in o or "<|endofprompt|>" in o for o in outs)
    assert "".join(outs) == "Say it <|endofprompt|> and [laughter] then go on"


def test_streaming_releases_words_early():
    s = StreamingNormalizer()
    assert s.push("Hello there my friend") == "Hello there my "
    assert s.push(",") == ""
    assert s.flush() == "friend,"
    assert s.flush() == ""
    with pytest.raises(RuntimeError):
        s.push("more")


_FRAGMENTS = [
    "hello", "world", "Dr.", "kg", "the", "don't", "OK", "3", "3.5", "$12", "10%", "5:30", "2020",
    "1/2", "-5", "你好", "世界", "三个", "2020年", "5月", "12.5元", ",", ".", "!", "?", "，", "。", "！",
    "**", "*", "_", "`", "# ", "- ", "[laughter]", "<strong>", "</strong>", "(", ")", "°C", "&",
]  # fmt: skip
_SEPARATORS = ["", " ", " ", "  ", "\n", "\n\n"]


@st.composite
def _texts_and_splits(draw):
    n = draw(st.integers(1, 14))
    text = "".join(draw(st.sampled_from(_FRAGMENTS)) + draw(st.sampled_from(_SEPARATORS)) for _ in range(n))
    cuts = sorted(draw(st.sets(st.integers(0, len(text)), max_size=8)))
    return text, cuts


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_texts_and_splits())
def test_streaming_equals_whole_text_for_any_chunking(case):
    text, cuts = case
    s = StreamingNormalizer()
    bounds = [0, *cuts, len(text)]
    outs = [s.push(text[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    outs.append(s.flush())
    assert "".join(outs) == normalize_text(text)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_texts_and_splits(), st.sampled_from(["en", "zh"]))
def test_the_front_end_spans_are_the_same_for_any_chunking(case, language):
    # the property above, for the one front end both voices read through (spans, not just text)
    from realtime.text import normalize, spans
    from realtime.text.frontend import Incremental

    text, cuts = case
    front = Incremental(language)
    bounds = [0, *cuts, len(text)]
    got = [s for a, b in zip(bounds, bounds[1:], strict=False) for s in front.push(text[a:b])] + front.flush()
    assert got == spans(text, language)
    assert "".join(s.spoken for s in got) == normalize(text, language)


# ------------------------------------------------------------------------------------- splitting


def test_split_paragraph_english_respects_token_budget(tokenizer):
    sentence = "This sentence has a handful of words in it. "
    text = sentence * 30
    segments = split_paragraph(text.strip(), tokenizer.encode, "en")
    assert len(segments) > 1
    assert "".join(segments) == text.strip()
    per_sentence = len(tokenizer.encode(sentence))
    for seg in segments[:-1]:
        assert 60 < len(tokenizer.encode(seg)) <= 80 + per_sentence


def test_split_paragraph_chinese_counts_characters_and_merges_short_tail():
    text = "今天天气很好我们去公园散步吧。" * 12 + "好。"
    segments = split_paragraph(text, len, "zh")
    assert "".join(segments) == text
    assert all(60 < len(s) <= 80 + 15 for s in segments[:-1])
    assert segments[-1].endswith("吧。好。")  # the 2-character tail joined its neighbour


def test_split_paragraph_never_cuts_inside_p_m(tokenizer):
    # cutting at every full stop, this text's segments end after "p." and start with "m."
    text = "We meet at three thirty p.m. on the U.S. side of the river. " * 12
    segments = split_paragraph(text.strip(), tokenizer.encode, "en")
    assert len(segments) > 1 and "".join(segments) == text.strip()
    assert not any(s.endswith(("p.", "U.")) or s.lstrip().startswith(("m.", "S.")) for s in segments)


def test_split_paragraph_adds_final_mark_and_keeps_quotes():
    assert split_paragraph("no ending", lambda s: s.split(), "en") == ["no ending."]
    assert split_paragraph('他说："好。"然后走了。', len, "zh") == ['他说："好。"然后走了。']
    assert split_paragraph("", len, "zh") == []


def test_text_normalize_skips_special_prompts_and_drops_punctuation_segments(tokenizer):
    instruct = "用四川话说这句话<|endofprompt|>"
    assert text_normalize(instruct, tokenizer.encode) == [instruct]
    assert text_normalize(instruct, tokenizer.encode, split=False) == instruct
    assert text_normalize("I have 2 cats", tokenizer.encode) == ["I have two cats."]
    assert text_normalize("I have 2 cats", tokenizer.encode, split=False) == "I have two cats"
    assert text_normalize("！？。", tokenizer.encode) == []
    assert text_normalize("x 2", tokenizer.encode, enabled=False) == ["x 2"]
    assert is_only_punctuation("…！ ,") and not is_only_punctuation("a.")
