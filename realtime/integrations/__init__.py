"""Native integrations with voice-agent frameworks, each an optional extra:

- ``realtime.integrations.pipecat`` (``pip install 'cosyvoice-realtime[pipecat]'``):
  :class:`RealtimeTTSService`, a Pipecat TTS service;
- ``realtime.integrations.livekit`` (``pip install 'cosyvoice-realtime[livekit]'``):
  :class:`TTS`, a LiveKit Agents ``tts.TTS``.

Both speak our own WebSocket protocol (docs/protocol.md): one pooled socket, one context per turn,
word timestamps, interruption by ``cancel``; ``realtime.integrations.client`` is the framework-free
part they (and examples/twilio_bridge.py) share.  This package imports neither framework; each
submodule imports its own, and says which extra to install when it is missing."""
