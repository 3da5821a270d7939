"""The models the worker's Ollama servers have: the answer to a `chat.models` request."""

from chatbus.contract import ErrorReply, ModelInfo, ModelsReply
from chatbus.errors import UpstreamUnavailableError, error_reply
from chatbus.pool import NoServerAvailable, OllamaPool, PooledModel

__all__ = ["list_models"]

_DETAILS = {"family", "parameter_size", "quantization_level"}


async def list_models(pool: OllamaPool, correlation_id: str) -> ModelsReply | ErrorReply:
    """Every model of every server that answers, with which servers have it and have it
    loaded; an `upstream_unavailable` error when none does."""
    try:
        models = await pool.models()
    except NoServerAvailable as error:
        return error_reply(UpstreamUnavailableError(str(error), retryable=True), correlation_id)
    return ModelsReply(correlation_id=correlation_id, models=[_model_info(m) for m in models])


def _model_info(model: PooledModel) -> ModelInfo:
    described = model.details
    details = described.details.model_dump(include=_DETAILS) if described.details else {}
    return ModelInfo(
        name=model.name,
        size=described.size,
        modified_at=described.modified_at,
        servers=list(model.servers),
        loaded_on=list(model.loaded_on),
        **details,
    )
