import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.text.segment import (
    FUNCTION_WORDS,
    ClauseSegmenter,
    PlaybackClock,
    Segment,
    SegmenterConfig,
    lead_cut,
)


def segments_of(
    text: str, parts: list[str] | None = None, config: SegmenterConfig | None = None
) -> list[Segment]:
    seg = ClauseSegmenter(config)
    out = []
    for p in parts if parts is not None else [text]:
        out += seg.push(p)
    return out + seg.end()


def texts(text: str) -> list[str]:
    return [s.text.strip() for s in segments_of(text)]


def check_offsets(text: str, segs: list[Segment]) -> None:
    assert segs, "no segments"
    pos = 0
    for s in segs:
        assert s.start == pos and s.end == s.start + len(s.text) and s.end > s.start
        assert text[s.start : s.end] == s.text
        pos = s.end
    assert pos == len(text)


def test_sentences_and_offsets():
    text = "Hello world. This is a test."
    segs = segments_of(text)
    assert [s.text for s in segs] == ["Hello world.", " This is a test."]
    assert [s.end for s in segs] == [12, len(text)]
    check_offsets(text, segs)


@pytest.mark.parametrize(
    "text",
    [
        "Dr. Smith paid 3.5 dollars in the U.S. last year.",
        "Use a tool e.g. this one or i.e. that one.",
        "Mr. and Mrs. Jones met Prof. X at 10 a.m. today.",
        "Pi is roughly 3.14159 and e is 2.718 or so.",
    ],
)
def test_abbreviations_decimals_initialisms_do_not_split(text):
    assert texts(text) == [text]


def test_list_markers_do_not_split_but_lines_do():
    text = "Steps:\n1. Mix the flour.\n2. Bake it.\n- Serve warm"
    assert texts(text) == ["Steps:", "1. Mix the flour.", "2. Bake it.", "- Serve warm"]


def test_number_at_sentence_end_mid_line_splits():
    assert texts("It happened in 2024. Then it stopped.") == ["It happened in 2024.", "Then it stopped."]


def test_etc_ends_a_sentence_only_before_a_capital():
    assert texts("Apples, pears, etc. Then more.") == ["Apples, pears, etc.", "Then more."]
    assert texts("Apples, pears, etc. and more.") == ["Apples, pears, etc. and more."]


def test_no_is_number_only_before_a_digit():
    assert texts("See No. 5 below. I said no. Then left.") == ["See No. 5 below.", "I said no.", "Then left."]


def test_exclamation_question_and_quotes():
    assert texts('He said "stop!" Then? Yes.') == ['He said "stop!"', "Then?", "Yes."]


def test_clause_break_needs_enough_words():
    # "Hi," is too short to stand alone; the first clause may be short, later ones need more words.
    assert texts("Hi, there. One two three, four five, six seven eight nine ten, eleven.") == [
        "Hi, there.",
        "One two three, four five,",
        "six seven eight nine ten,",
        "eleven.",
    ]


def test_dashes_semicolons_colons_are_clause_breaks():
    assert texts("We need to talk about this — it matters; a great deal to me: yes.") == [
        "We need to talk about this —",
        "it matters; a great deal to me:",
        "yes.",
    ]


def test_ellipsis_is_a_clause_break_not_a_sentence_end():
    assert texts("Well... I think that maybe... we should go.") == [
        "Well... I think that maybe...",
        "we should go.",
    ]


def test_boundary_waits_for_the_following_whitespace():
    seg = ClauseSegmenter()
    assert seg.push("Hello wor") == []
    assert seg.push("ld.") == []  # could still be "world.com" or "3.5"
    out = seg.push(" Th")
    assert [s.text for s in out] == ["Hello world."]
    assert out[0].end == 12
    assert seg.pending == " Th"


def test_first_clause_released_as_soon_as_complete():
    seg = ClauseSegmenter()
    assert seg.push("Sure, here is the plan") == []
    assert seg.push(",") == []  # not confirmed yet: could be "1,000"
    out = seg.push(" step one")
    assert [s.text for s in out] == ["Sure, here is the plan,"]


def test_hard_cap_splits_at_whitespace():
    text = " ".join(["word"] * 100) + "."
    segs = segments_of(text, config=SegmenterConfig(max_chars=50))
    check_offsets(text, segs)
    assert all(len(s.text) <= 51 for s in segs)
    assert all(not s.text.endswith("wor") for s in segs)
    assert all(w == "word" for s in segs for w in s.text.rstrip(".").split())


def test_single_giant_token_is_never_split():
    text = "x" * 500
    assert [s.text for s in segments_of(text, config=SegmenterConfig(max_chars=100))] == [text]


def test_poll_releases_slow_text_after_the_wait():
    seg = ClauseSegmenter(SegmenterConfig(poll_after=0.4, poll_min_words=3, first_poll_after=0.4))
    assert seg.push("one two three fo", now=10.0) == []
    assert seg.poll(10.2) == []  # not waited long enough
    out = seg.poll(10.5)
    assert [s.text for s in out] == ["one two three"]  # "fo" may still grow: never cut a word
    assert seg.pending == " fo"
    assert seg.poll(11.0) == []  # too few words pending


def test_poll_takes_a_waiting_sentence_end_as_complete():
    seg = ClauseSegmenter(SegmenterConfig(poll_after=0.4, first_poll_after=0.4))
    assert seg.push("Hello world.", now=0.0) == []  # could still become "world.com"
    assert seg.poll(0.2) == []
    assert seg.poll(0.5) == [Segment("Hello world.", 0, 12)]
    assert seg.push(" Next", now=0.6) == []
    assert seg.poll(2.0) == []  # one word, not a clause: keep waiting


def test_poll_learns_the_time_when_push_gives_none():
    seg = ClauseSegmenter(SegmenterConfig(poll_after=0.4, poll_min_words=2, first_poll_after=0.4))
    seg.push("alpha beta gamma ")
    assert seg.poll(5.0) == []
    assert seg.poll(5.3) == []
    assert [s.text for s in seg.poll(5.5)] == ["alpha beta gamma"]


def test_poll_clock_restarts_after_a_release():
    seg = ClauseSegmenter(SegmenterConfig(poll_after=0.4, poll_min_words=2))
    seg.push("Done. and then some more ", now=0.0)
    assert seg.poll(0.3) == []
    assert [s.text for s in seg.poll(0.45)] == [" and then some more"]


def test_flush_releases_everything_and_segmenter_continues():
    seg = ClauseSegmenter()
    seg.push("First part. second bit wi")
    out = seg.flush()
    assert [s.text for s in out] == [" second bit wi"]
    assert seg.pending == "" and seg.offset == len("First part. second bit wi")
    out = seg.push("th more. ") + seg.end()
    assert [s.text for s in out] == ["th more.", " "]
    with pytest.raises(RuntimeError):
        seg.push("late")


def test_flush_cuts_at_boundaries_the_end_confirms():
    seg = ClauseSegmenter()
    assert seg.push("One sentence. Two, three four five six. Another one") == [
        Segment("One sentence.", 0, 13),
        Segment(" Two, three four five six.", 13, 39),
    ]
    assert [s.text for s in seg.flush()] == [" Another one"]
    seg = ClauseSegmenter()
    assert [s.text for s in seg.push("Mr. Jones left. Then? He said hi")] == ["Mr. Jones left.", " Then?"]
    assert [s.text for s in seg.flush()] == [" He said hi"]


def test_empty_end_gives_nothing():
    seg = ClauseSegmenter()
    assert seg.end() == []


SAMPLES = [
    "Hello world. This is a test.",
    "Dr. Smith paid $3.50 in the U.S., e.g. at 3:45 pm; then left — fast... OK? Yes! No. 5, etc. and no. Etc.",
    "# Title\n\n1. First item, with a clause that runs on, and on.\n2. Second.\n- bullet *x*",
    "Well, first of all, we need to talk about this: it matters a lot, really, truly, deeply.",
    "word " * 80,
]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(SAMPLES), st.lists(st.integers(0, 500), max_size=30))
def test_cuts_do_not_depend_on_how_deltas_split_the_text(text, cuts):
    points = sorted({c % (len(text) + 1) for c in cuts})
    parts = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    whole = segments_of(text, config=SegmenterConfig(max_chars=120))
    split = segments_of(text, parts, config=SegmenterConfig(max_chars=120))
    assert split == whole
    check_offsets(text, split)


@settings(max_examples=150, deadline=None)
@given(
    st.text(st.sampled_from(list("ab1. ,;:!?\n—-U.S$")), max_size=120),
    st.lists(st.integers(0, 200), max_size=20),
)
def test_random_text_any_split_same_segments(text, cuts):
    points = sorted({c % (len(text) + 1) for c in cuts})
    parts = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    whole = segments_of(text, config=SegmenterConfig(max_chars=40))
    assert segments_of(text, parts, config=SegmenterConfig(max_chars=40)) == whole
    if text:
        check_offsets(text, whole)
    else:
        assert whole == []


def test_every_single_split_position_gives_the_same_segments():
    text = SAMPLES[1]
    whole = segments_of(text)
    for i in range(len(text) + 1):
        assert segments_of(text, [text[:i], text[i:]]) == whole, i
    # and one character at a time
    assert segments_of(text, list(text)) == whole


def test_first_words_go_sooner_than_later_ones():
    cfg = SegmenterConfig(poll_after=0.4, poll_min_words=3, first_poll_after=0.15)
    seg = ClauseSegmenter(cfg)
    assert seg.push("The weather in Pa", now=0.0) == []
    assert seg.poll(0.1) == []
    assert [s.text for s in seg.poll(0.16)] == ["The weather in"]  # the listener is waiting
    seg.push("ris tomorrow looks mi", now=0.2)
    assert seg.poll(0.4) == []  # something is playing now: the ordinary wait applies
    assert [s.text for s in seg.poll(0.61)] == [" Paris tomorrow looks"]


def test_hurried_poll_releases_complete_words_without_waiting():
    seg = ClauseSegmenter(SegmenterConfig(poll_after=0.4, poll_min_words=3))
    assert [s.text for s in seg.push("Sure! ", now=0.0)] == ["Sure!"]
    assert seg.push("The quickest way to ge", now=0.1) == []
    assert seg.poll(0.12) == []  # the clause is not over and the wait has not passed
    assert [s.text for s in seg.poll(0.12, hurry=True)] == [" The quickest way to"]  # "ge" may grow
    assert seg.push("t there", now=0.13) == []
    assert seg.poll(0.14, hurry=True) == []  # one complete word: not worth a call of its own


def test_first_poll_still_needs_enough_words():
    seg = ClauseSegmenter(SegmenterConfig(first_poll_after=0.15, poll_min_words=3))
    seg.push("Well uh", now=0.0)
    assert seg.poll(1.0) == []


# -- playback clock ----------------------------------------------------------------------------


def test_clock_lead_grows_with_audio_and_shrinks_with_time():
    clock = PlaybackClock()
    assert clock.lead(5.0) == 0.0  # nothing handed out yet
    clock.played(1.0, now=10.0)
    assert clock.lead(10.0) == pytest.approx(1.0)
    assert clock.lead(10.4) == pytest.approx(0.6)
    clock.played(0.5, now=10.4)  # queued behind what is still playing
    assert clock.lead(10.4) == pytest.approx(1.1)
    assert clock.lead(20.0) == 0.0  # never negative


def test_clock_restarts_from_now_after_running_dry():
    clock = PlaybackClock()
    clock.played(1.0, now=0.0)
    clock.played(2.0, now=3.0)  # the player stalled from 1.0 to 3.0, then plays this chunk
    assert clock.lead(3.0) == pytest.approx(2.0)
    clock.played(-1.0, now=3.0)  # nonsense durations add nothing
    assert clock.lead(3.0) == pytest.approx(2.0)


# -- lead-driven cuts --------------------------------------------------------------------------

SENTENCE = "The quickest way to get there is by train, which leaves every twenty minutes from the station."


def cut_text(text: str, max_chars: float, min_words: int = 2) -> str | None:
    cut = lead_cut(text, max_chars, min_words)
    return None if cut is None else text[:cut]


def test_lead_cut_keeps_text_that_fits_whole():
    assert lead_cut(SENTENCE, len(SENTENCE)) is None
    assert lead_cut("Sure thing, okay.", 3) is None  # too few words to leave two on each side


def test_lead_cut_prefers_punctuation_then_function_words():
    assert cut_text(SENTENCE, 50) == "The quickest way to get there is by train,"
    assert cut_text(SENTENCE, 32) == "The quickest way to get there"  # before "is", not "by | train"
    assert cut_text(SENTENCE, 20) == "The quickest way"  # before "to"


def test_lead_cut_never_between_two_function_words():
    text = "We walked over to the old harbour wall today."
    cut = cut_text(text, 20)
    assert cut is not None and not cut.endswith(("over", "to"))


def test_lead_cut_is_always_at_a_word_gap_with_enough_words_each_side():
    for budget in range(0, len(SENTENCE) + 5):
        cut = lead_cut(SENTENCE, budget, min_words=2)
        if cut is None:
            continue
        head, tail = SENTENCE[:cut], SENTENCE[cut:]
        assert tail[:1].isspace() and not head[-1:].isspace()
        assert len(head.split()) >= 2 and len(tail.split()) >= 2
        assert len(head) <= max(budget, len("The quickest"))  # over budget only at the minimum


def test_lead_cut_tiny_budget_gives_the_minimum_piece():
    assert cut_text(SENTENCE, 1) == "The quickest"
    assert cut_text(SENTENCE, 1, min_words=3) == "The quickest way"


def test_lead_cut_ignores_leading_whitespace_in_the_budget():
    text = "   " + SENTENCE
    assert cut_text(text, 20) == "   The quickest way"


def test_function_words_are_lowercase_words():
    assert all(w.isalpha() and w.islower() for w in FUNCTION_WORDS)
