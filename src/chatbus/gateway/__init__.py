"""The HTTP gateway: Ollama's and OpenAI's APIs in front of the bus, so that the tools that
speak them (the `ollama` and `openai` SDKs, Open WebUI, ...) reach the workers.

Each HTTP request becomes a request on `chat.requests`, made by one `ChatClient` per gateway
process; any number of gateways run side by side. `uv run chatbus gateway` serves it.
"""

from chatbus.gateway.app import create_gateway, serve
from chatbus.gateway.settings import GatewaySettings

__all__ = ["GatewaySettings", "create_gateway", "serve"]
