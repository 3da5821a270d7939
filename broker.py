"""Where the worker meets RabbitMQ. It lives in the package: `chatbus.service`."""

from chatbus.service import WorkerApp, create_app

__all__ = ["WorkerApp", "create_app"]
