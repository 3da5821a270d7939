"""The performance benchmark: `uv run python -m bench` (see the README's Performance section).

It measures the service against the limits it cannot beat, in the same run and on the same
machine: the `ollama` client reading the fake Ollama directly, and a raw AMQP hop.
"""
