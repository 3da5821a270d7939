"""Entry point: `uv run faststream run main:app`."""

from broker import create_app
from chatbus.observability import configure_logging
from config import Settings

settings = Settings()
configure_logging(settings.log_level, settings.log_format)
app = create_app(settings)
