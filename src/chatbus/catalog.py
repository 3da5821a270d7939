"""The models Ollama has, as the worker sees them: the answer to a `chat.models` request."""

import ollama

from chatbus.contract import ErrorReply, ModelInfo, ModelsReply
from chatbus.errors import error_reply
from chatbus.upstream import classify_upstream_error

__all__ = ["list_models"]

_DETAILS = {"family", "parameter_size", "quantization_level"}


async def list_models(client: ollama.AsyncClient, correlation_id: str) -> ModelsReply | ErrorReply:
    try:
        listing = await client.list()
    except Exception as error:
        failure, _ = classify_upstream_error(error, tokens_sent=False)
        return error_reply(failure, correlation_id)
    return ModelsReply(
        correlation_id=correlation_id, models=[_model_info(model) for model in listing.models]
    )


def _model_info(model: ollama.ListResponse.Model) -> ModelInfo:
    details = model.details.model_dump(include=_DETAILS) if model.details else {}
    return ModelInfo(
        name=model.model or "", size=model.size, modified_at=model.modified_at, **details
    )
