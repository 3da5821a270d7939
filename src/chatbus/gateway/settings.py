"""The gateway's settings, from the environment or a `.env` file."""

from pydantic import Field, field_validator

from chatbus.contract import MAX_TENANT_CHARS
from chatbus.history import HistorySettings
from chatbus.settings import BusSettings, LogFormat, RequestLimitSettings


class GatewaySettings(BusSettings, HistorySettings, RequestLimitSettings):
    """`RABBITMQ_URL` and the contract's names, read as every party on the bus reads them;
    where the sessions are kept (`HISTORY_*`); the workers' request limits, which sessions
    fit their history into; and the gateway's own settings."""

    gateway_host: str = Field(
        default="127.0.0.1", description="Address the gateway listens on; 0.0.0.0 in compose."
    )
    gateway_port: int = Field(
        default=8080, ge=0, le=65535, description="Its port; 0 picks a free one."
    )
    gateway_timeout: float = Field(
        default=600.0,
        gt=0,
        description="Seconds a request may take, waiting in the queue included; sent to the "
        "worker as the request's x-deadline.",
    )
    gateway_api_keys: dict[str, str] = Field(
        default_factory=dict,
        description='API keys and their tenants, as a JSON object {"KEY": "TENANT", ...}. '
        "Empty: no key is asked for.",
    )
    graceful_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds the requests in flight get to finish on shutdown; the rest are "
        "cancelled.",
    )
    log_level: str = Field(default="INFO")
    log_format: LogFormat = Field(
        default="json", description="json: one object per line; text: for people."
    )

    @field_validator("gateway_api_keys")
    @classmethod
    def _keys_and_tenants_are_usable(cls, keys: dict[str, str]) -> dict[str, str]:
        for key, tenant in keys.items():
            if not key.strip():
                raise ValueError("an API key is empty")
            if not tenant or len(tenant) > MAX_TENANT_CHARS:
                raise ValueError(
                    f"tenant {tenant!r}: a tenant is 1 to {MAX_TENANT_CHARS} characters"
                )
        return keys
