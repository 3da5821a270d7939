"""chatbus: chat completions from Ollama, streamed over RabbitMQ.

The public API is what this package exports (`__all__`) plus the modules
`chatbus.contract` (the messages and names), `chatbus.errors` (the failure tree),
`chatbus.client` and `chatbus.conversation` (the requester side), `chatbus.settings`,
`chatbus.service` (the worker), `chatbus.testing` (the testing kit) and `chatbus.gateway`
(the HTTP gateway).
Other modules are the worker's insides and may change without notice.
"""

from importlib.metadata import version as _distribution_version

from chatbus.client import ChatClient, ChatEvent, Messages, RequestFields, Restarted
from chatbus.contract import (
    DEADLINE_HEADER,
    NAMES,
    TENANT_HEADER,
    AssistantMessage,
    CancelRequest,
    ChatMessage,
    ChatRequest,
    ChunkReply,
    ContractNames,
    DoneReply,
    ErrorCode,
    ErrorReply,
    ModelInfo,
    ModelsReply,
    ToolCall,
    Usage,
)
from chatbus.conversation import Conversation
from chatbus.errors import (
    ChatError,
    ChatTimeoutError,
    DeadlineExceededError,
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamUnavailableError,
)
from chatbus.settings import BusSettings, Settings

__version__ = _distribution_version("chatbus")

__all__ = [
    "DEADLINE_HEADER",
    "NAMES",
    "TENANT_HEADER",
    "AssistantMessage",
    "BusSettings",
    "CancelRequest",
    "ChatClient",
    "ChatError",
    "ChatEvent",
    "ChatMessage",
    "ChatRequest",
    "ChatTimeoutError",
    "ChunkReply",
    "ContractNames",
    "Conversation",
    "DeadlineExceededError",
    "DoneReply",
    "ErrorCode",
    "ErrorReply",
    "InternalError",
    "InvalidRequestError",
    "Messages",
    "ModelInfo",
    "ModelNotFoundError",
    "ModelsReply",
    "RequestFields",
    "Restarted",
    "ServiceUnavailableError",
    "Settings",
    "ToolCall",
    "UpstreamError",
    "UpstreamUnavailableError",
    "Usage",
    "__version__",
]
