"""Engines turn one utterance's text stream into audio, in a worker thread."""
