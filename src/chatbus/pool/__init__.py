"""Several Ollama servers behind one worker: each request's call goes to the best server for
its model, load and health, and fails over to the next before the first token.

- `servers`: the servers from `OLLAMA_HOSTS` (or `OLLAMA_HOST`), with their parallelism.
- `routing`: which server a request goes to (a pure function).
- `breaker`: the circuit breaker of each server.
- `backend`: one server's state, its health checks, and what a failed call says of it.
- `pool`: `OllamaPool` and its leases, the one API the worker uses.
"""

from chatbus.pool.backend import CallOutcome
from chatbus.pool.breaker import CircuitState
from chatbus.pool.pool import (
    Abandoned,
    Lease,
    ModelNotInPool,
    NoFreeSlot,
    NoServerAvailable,
    OllamaPool,
    PooledModel,
    PoolError,
    PoolOptions,
    ServerStatus,
)
from chatbus.pool.servers import ServerSpec, canonical_model, parse_hosts, pool_servers

__all__ = [
    "Abandoned",
    "CallOutcome",
    "CircuitState",
    "Lease",
    "ModelNotInPool",
    "NoFreeSlot",
    "NoServerAvailable",
    "OllamaPool",
    "PoolError",
    "PoolOptions",
    "PooledModel",
    "ServerSpec",
    "ServerStatus",
    "canonical_model",
    "parse_hosts",
    "pool_servers",
]
