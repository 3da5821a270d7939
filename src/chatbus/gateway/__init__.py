"""The HTTP gateway: Ollama's and OpenAI's APIs in front of the bus, so that the tools that
speak them (the `ollama` and `openai` SDKs, Open WebUI, ...) reach the workers.

Each HTTP request becomes a request on `chat.requests`, made by one `ChatClient` per gateway
process; any number of gateways run side by side. `uv run chatbus gateway` serves it.

It also keeps conversations (the sessions API: `POST /chat`, `/history/{session_id}`,
`/ws/{session_id}`, their history in SQLite or Redis) and serves the web chat page at `/`.
"""

from chatbus.gateway.app import create_gateway, serve
from chatbus.gateway.settings import GatewaySettings

__all__ = ["GatewaySettings", "create_gateway", "serve"]
