"""Entry point: `uv run faststream run main:app` (the installed package runs the same as
`faststream run chatbus.service:app` or `chatbus worker`)."""

from chatbus.service import app_from_environment

app = app_from_environment()
