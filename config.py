"""The worker's settings. They live in the package: `chatbus.settings`."""

from chatbus.settings import Settings

__all__ = ["Settings"]
