"""The servers of the pool, as the settings list them.

`OLLAMA_HOSTS` is a comma-separated list of Ollama base URLs, written as `OLLAMA_HOST` is
(`http://gpu1:11434`, `gpu1:11434`, `https://proxy.example/ollama`). A server may differ
from the others in the generations it runs at once: `http://gpu1:11434#parallel=2`. The
URL's fragment is never sent to the server, so it is free for options of ours.

Each server gets a short id for logs, metrics and replies: its host, port and path, never
its scheme or credentials.
"""

import urllib.parse
from dataclasses import dataclass

_OPTIONS = frozenset({"parallel"})


@dataclass(frozen=True)
class ServerSpec:
    base_url: str
    """scheme://host:port[/path], with the defaults the `ollama` client applies (port 11434
    without a scheme, 80 or 443 with one); without credentials, which it drops too."""
    parallel: int
    """Generations this server runs at once: the pool never sends it more."""

    @property
    def id(self) -> str:
        """host:port[/path]: how logs, metrics and replies name the server."""
        return self.base_url.partition("://")[2]


def parse_hosts(hosts: str, *, default_parallel: int) -> list[ServerSpec]:
    """The servers of a comma-separated list; raises ValueError for a malformed one."""
    servers = [
        _server(entry.strip(), default_parallel) for entry in hosts.split(",") if entry.strip()
    ]
    if not servers:
        raise ValueError("no Ollama server given")
    ids = [server.id for server in servers]
    repeated = sorted({server_id for server_id in ids if ids.count(server_id) > 1})
    if repeated:
        raise ValueError(f"Ollama servers listed more than once: {', '.join(repeated)}")
    return servers


def pool_servers(ollama_hosts: str, ollama_host: str, *, default_parallel: int) -> list[ServerSpec]:
    """`OLLAMA_HOSTS`, or `OLLAMA_HOST` alone when it is empty (and when that is empty too,
    Ollama's own default, as the `ollama` client takes it)."""
    hosts = ollama_hosts or ollama_host or "127.0.0.1:11434"
    return parse_hosts(hosts, default_parallel=default_parallel)


def _server(entry: str, default_parallel: int) -> ServerSpec:
    url, _, fragment = entry.partition("#")
    parallel = default_parallel
    for name, value in urllib.parse.parse_qsl(fragment, keep_blank_values=True):
        if name not in _OPTIONS:
            raise ValueError(f"{entry!r}: unknown server option {name!r} (known: parallel)")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{entry!r}: parallel must be a whole number of at least 1")
        parallel = int(value)
    return ServerSpec(base_url=_base_url(url), parallel=parallel)


def _base_url(url: str) -> str:
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest, default_port = "http", url, 11434
    else:
        default_port = {"http": 80, "https": 443}.get(scheme, 11434)
    try:
        split = urllib.parse.urlsplit(f"{scheme}://{rest}")
        port = split.port or default_port
    except ValueError as error:
        raise ValueError(f"{url!r}: {error}") from None
    host = split.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    path = split.path.strip("/")
    return f"{scheme}://{host}:{port}" + (f"/{path}" if path else "")


def canonical_model(name: str) -> str:
    """The name as Ollama lists it: a model named without a tag is its `latest`."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
