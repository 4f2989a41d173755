"""What the framework-integration tests share (tests/test_integrations_pipecat.py,
tests/test_integrations_livekit.py): the size of one word of the tone engine's audio, and the
line each prints for issue 11's closing table (seen with ``pytest -s``)."""

from __future__ import annotations

import subprocess
import sys

TONE_RATE = 24000
WORD_BYTES = TONE_RATE * 200 // 1000 * 2  # one ToneEngine word: 200 ms of 16-bit PCM at 24 kHz


def report(client: str, **figures: float | int) -> None:
    """Print a measurement for the closing table, e.g. ``[table] native Pipecat: first_audio_ms=41.2``."""
    text = ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    print(f"\n[table] {client}: {text}")


def drop_connections(server) -> None:
    """Abort every connection a :func:`tests.serving.serve_server` server holds, as a network
    failure would (no close handshake), from any thread."""
    for conn in list(server.server_state.connections):
        conn.loop.call_soon_threadsafe(conn.transport.abort)


SENTENCE = "Sure, the weather in Paris is sunny today, about 21 degrees."
# the same reply as an LLM streams it: pieces that cut words
SENTENCE_PIECES = ["Sure, the wea", "ther in Pa", "ris is sun", "ny today, ab", "out 21 deg", "rees."]


def import_without(framework: str, module: str) -> str:
    """Import ``realtime.integrations`` then ``module`` in a fresh interpreter where
    ``framework`` cannot be imported (as on a machine without that extra): the ImportError's
    message, or "" if the import succeeded."""
    code = (
        f"import sys; sys.modules[{framework!r}] = None\n"
        "import realtime.integrations\n"
        f"try:\n    import {module}\nexcept ImportError as e:\n    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()
