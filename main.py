"""Entry point: `uv run faststream run main:app`."""

import logging

from broker import create_app
from config import Settings

settings = Settings()
logging.basicConfig(level=settings.log_level)
app = create_app(settings)
