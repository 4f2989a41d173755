"""Text handling: the one front end every voice reads through (:mod:`.frontend`) and the clause
segmentation of the default voice (:mod:`.segment`)."""

from .frontend import Span, normalize, spans, unspeakable

__all__ = ["Span", "normalize", "spans", "unspeakable"]
