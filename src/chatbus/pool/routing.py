"""Which server a request goes to: a pure function of what the pool knows of each.

Among the servers that have the model, whose circuit lets a request through and that the
request has not tried yet:
1. a half-open server's probe goes first, so that a server that came back gets traffic;
2. then a server with the model loaded and a free slot, the least loaded first;
3. then one with a free slot that would have to load the model, the least loaded first,
   and of equals the one with the fewest models loaded (the least to unload). While some
   healthy server has the model loaded, only a server with nothing loaded may load it too:
   loading it where another model is loaded may unload that one (a server holds only a
   few), and requests alternating between models would then swap them for every request;
4. else the request waits for a slot.
A server that failed recently, or whose runner of the model did, comes after the ones that
did not, whatever its load, so a server that fails fast (503 at once looks idle) does not
attract the traffic.
"""

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class Candidate:
    """A server as the routing sees it."""

    id: str
    capacity: int
    in_flight: int
    admits: bool
    """Its circuit lets a request through."""
    awaits_probe: bool
    """Half-open: the next request is its probe."""
    failing: bool
    """It failed recently, though its circuit is closed."""
    models: frozenset[str] | None
    """What it has (`/api/tags`); None while not known yet."""
    loaded: frozenset[str]
    """What it has loaded (`/api/ps`), or is loading for a request in flight."""

    def may_have(self, model: str) -> bool:
        return self.models is None or model in self.models

    @property
    def free(self) -> bool:
        return self.in_flight < self.capacity


class Verdict(Enum):
    NOT_FOUND = "no server has the model"
    UNAVAILABLE = "every server that has the model is down or was tried"
    WAIT = "every server that can take the request is busy"


def choose(servers: Sequence[Candidate], model: str, exclude: Collection[str]) -> str | Verdict:
    """The id of the server to send the request to, or why there is none now."""
    having = [server for server in servers if server.may_have(model)]
    if not having:
        return Verdict.NOT_FOUND
    usable = [server for server in having if server.admits and server.id not in exclude]
    if not usable:
        return Verdict.UNAVAILABLE
    loaded_elsewhere = any(model in s.loaded and not s.failing for s in usable)
    position = {server.id: index for index, server in enumerate(servers)}

    def eligible(server: Candidate) -> bool:
        if not server.free:
            return False
        return (
            server.awaits_probe
            or model in server.loaded
            or not loaded_elsewhere
            or not server.loaded
        )

    def rank(server: Candidate) -> tuple[bool, bool, bool, float, int, int]:
        cold = model not in server.loaded
        return (
            not server.awaits_probe,
            server.failing,
            cold,
            server.in_flight / server.capacity,
            len(server.loaded) if cold else 0,
            position[server.id],
        )

    eligible_servers = [server for server in usable if eligible(server)]
    if not eligible_servers:
        return Verdict.WAIT
    return min(eligible_servers, key=rank).id
