"""The pool's rules as tables: the servers setting, the circuit breaker, the choice of server."""

from collections.abc import Collection

import httpx
import ollama
import pytest

from chatbus.pool import CallOutcome, canonical_model, parse_hosts, pool_servers
from chatbus.pool.backend import classify
from chatbus.pool.breaker import CircuitBreaker, CircuitState
from chatbus.pool.routing import Candidate, Verdict, choose

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN

# ----------------------------------------------------------------------------- OLLAMA_HOSTS


@pytest.mark.parametrize(
    ("hosts", "expected"),
    [
        ("http://gpu1:11434", [("gpu1:11434", "http://gpu1:11434", 4)]),
        ("gpu1", [("gpu1:11434", "http://gpu1:11434", 4)]),
        ("http://gpu1", [("gpu1:80", "http://gpu1:80", 4)]),
        (
            "https://user:secret@Proxy.example/ollama/#parallel=2",
            [("proxy.example:443/ollama", "https://proxy.example:443/ollama", 2)],
        ),
        ("[::1]:5000#parallel=1", [("[::1]:5000", "http://[::1]:5000", 1)]),
        (
            " http://a:1 , b:2#parallel=8,",
            [("a:1", "http://a:1", 4), ("b:2", "http://b:2", 8)],
        ),
    ],
)
def test_hosts(hosts: str, expected: list[tuple[str, str, int]]) -> None:
    servers = parse_hosts(hosts, default_parallel=4)
    assert [(s.id, s.base_url, s.parallel) for s in servers] == expected


@pytest.mark.parametrize(
    ("hosts", "error"),
    [
        ("", "no Ollama server"),
        (" , ", "no Ollama server"),
        ("a:1,http://a:1", "more than once: a:1"),
        ("a:1#parallel=0", "at least 1"),
        ("a:1#parallel=two", "at least 1"),
        ("a:1#weight=2", "unknown server option 'weight'"),
        ("a:99999", "a:99999"),
    ],
)
def test_malformed_hosts(hosts: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_hosts(hosts, default_parallel=4)


def test_ollama_host_alone_when_hosts_are_unset() -> None:
    (alone,) = pool_servers("", "http://localhost:11434", default_parallel=3)
    assert (alone.id, alone.parallel) == ("localhost:11434", 3)
    assert [s.id for s in pool_servers("a:1,b:2", "c:3", default_parallel=1)] == ["a:1", "b:2"]
    assert [s.id for s in pool_servers("", "", default_parallel=1)] == ["127.0.0.1:11434"]


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("llama3.2", "llama3.2:latest"),
        ("qwen3:4b", "qwen3:4b"),
        ("hf.co/org/model", "hf.co/org/model:latest"),
        ("registry:5000/org/model:q4", "registry:5000/org/model:q4"),
    ],
)
def test_canonical_model(name: str, canonical: str) -> None:
    assert canonical_model(name) == canonical


# ----------------------------------------------------------------------------- circuit breaker


def run_breaker(events: list[str]) -> CircuitBreaker:
    """Events: `fail@T`, `ok`, `check+@T`, `check-@T`, `lease`, `abandon` (T: seconds)."""
    breaker = CircuitBreaker(failure_threshold=3, cooldown=5.0)
    for event in events:
        name, _, at = event.partition("@")
        now = float(at or 0)
        if name == "fail":
            breaker.failed(now)
        elif name == "ok":
            breaker.succeeded()
        elif name in ("check+", "check-"):
            breaker.checked(name == "check+", now)
        elif name == "lease":
            breaker.leased()
        else:
            assert name == "abandon"
            breaker.abandoned()
    return breaker


FAILED_3 = ["fail@0", "fail@0", "fail@1"]


@pytest.mark.parametrize(
    ("events", "state", "admits"),
    [
        ([], CLOSED, True),
        (["fail@0", "fail@0"], CLOSED, True),
        (FAILED_3, OPEN, False),
        (["fail@0", "fail@0", "ok", "fail@0", "fail@0"], CLOSED, True),
        (["check-@0", "check-@1", "check-@2"], OPEN, False),
        ([*FAILED_3, "check+@5"], OPEN, False),  # the cooldown runs from the last failure
        ([*FAILED_3, "check+@6"], HALF_OPEN, True),
        ([*FAILED_3, "check-@6", "check+@10"], OPEN, False),  # a failed check restarts it
        ([*FAILED_3, "check-@6", "check+@11"], HALF_OPEN, True),
        ([*FAILED_3, "check+@6", "lease"], HALF_OPEN, False),  # one probe at a time
        ([*FAILED_3, "check+@6", "lease", "ok"], CLOSED, True),
        ([*FAILED_3, "check+@6", "lease", "fail@7"], OPEN, False),
        ([*FAILED_3, "check+@6", "lease", "abandon"], HALF_OPEN, True),
        ([*FAILED_3, "check+@6", "check+@20"], HALF_OPEN, True),  # checks never close it
        ([*FAILED_3, "ok"], CLOSED, True),  # a call from before it opened answered
    ],
)
def test_breaker(events: list[str], state: CircuitState, admits: bool) -> None:
    breaker = run_breaker(events)
    assert (breaker.state, breaker.admits()) == (state, admits)


@pytest.mark.parametrize(
    ("events", "failures"),
    [
        (["fail@0", "check+@1"], 1),  # a server that answers /api/version may fail chats
        (["fail@0", "check+@5"], 0),  # but a failure older than the cooldown is forgotten
        ([*FAILED_3, "check+@6", "lease", "ok"], 0),
    ],
)
def test_breaker_forgets_old_failures(events: list[str], failures: int) -> None:
    assert run_breaker(events).failures == failures


def test_next_check() -> None:
    breaker = run_breaker(FAILED_3)
    assert breaker.next_check_at(last_check_at=0.5, interval=10) == 6.0
    assert run_breaker([]).next_check_at(last_check_at=0.5, interval=10) == 10.5


# ----------------------------------------------------------------------------- choice


def server(
    name: str,
    *,
    capacity: int = 2,
    busy: int = 0,
    models: Collection[str] | None = ("m", "n"),
    loaded: Collection[str] = (),
    admits: bool = True,
    probe: bool = False,
    failing: bool = False,
) -> Candidate:
    return Candidate(
        id=name,
        capacity=capacity,
        in_flight=busy,
        admits=admits,
        awaits_probe=probe,
        failing=failing,
        models=None if models is None else frozenset(models),
        loaded=frozenset(loaded),
    )


@pytest.mark.parametrize(
    ("servers", "exclude", "expected"),
    [
        pytest.param([server("a", models={"n"}), server("b")], (), "b", id="has the model"),
        pytest.param([server("a"), server("b", loaded={"m"})], (), "b", id="loaded first"),
        pytest.param(
            [server("a", loaded={"m"}, busy=1), server("b", loaded={"m"})],
            (),
            "b",
            id="least loaded",
        ),
        pytest.param(
            [server("a", loaded={"m"}, busy=1, capacity=4), server("b", loaded={"m"}, busy=1)],
            (),
            "a",
            id="load relative to capacity",
        ),
        pytest.param(
            [server("a", loaded={"m"}, busy=1), server("b", loaded={"m"}, busy=1)],
            (),
            "a",
            id="ties in listed order",
        ),
        pytest.param(
            [server("a", loaded={"m"}, busy=2), server("b", busy=1)],
            (),
            "b",
            id="a server with nothing loaded takes what the loaded one cannot",
        ),
        pytest.param(
            [server("a", loaded={"m"}, busy=2), server("b", loaded={"n"})],
            (),
            Verdict.WAIT,
            id="no swap while the model is loaded elsewhere",
        ),
        pytest.param(
            [server("a", loaded={"m"}, busy=2, failing=True), server("b", loaded={"n"})],
            (),
            "b",
            id="unless the server that has it loaded is failing",
        ),
        pytest.param(
            [server("a", loaded={"n"}, busy=1), server("b", loaded={"n"}, busy=1, capacity=4)],
            (),
            "b",
            id="loaded nowhere: least loaded",
        ),
        pytest.param(
            [server("a", loaded={"n"}), server("b")],
            (),
            "b",
            id="loaded nowhere: the fewest models to unload",
        ),
        pytest.param([server("a", models=set())], (), Verdict.NOT_FOUND, id="nobody has it"),
        pytest.param(
            [
                server("a", models=set()),
                Candidate("b", 2, 0, True, False, False, None, frozenset()),
            ],
            (),
            "b",
            id="an inventory not known yet may have it",
        ),
        pytest.param(
            [server("a", loaded={"m"}, admits=False), server("b")],
            (),
            "b",
            id="never an open circuit",
        ),
        pytest.param(
            [server("a", admits=False), server("b", admits=False)],
            (),
            Verdict.UNAVAILABLE,
            id="all open",
        ),
        pytest.param(
            [server("a", loaded={"m"}), server("b", models={"n"})],
            ("a",),
            Verdict.UNAVAILABLE,
            id="tried already",
        ),
        pytest.param(
            [server("a", loaded={"m"}), server("b", busy=1)],
            ("a",),
            "b",
            id="failover to a busy server that must load it",
        ),
        pytest.param(
            [server("a", loaded={"m"}, failing=True), server("b", busy=1, capacity=4)],
            (),
            "b",
            id="a failing server comes last",
        ),
        pytest.param(
            [server("a", loaded={"m"}), server("b", probe=True)],
            (),
            "b",
            id="the probe of a recovering server first",
        ),
        pytest.param(
            [server("a", loaded={"m"}, busy=2), server("b", loaded={"m"}, busy=2)],
            (),
            Verdict.WAIT,
            id="all full",
        ),
    ],
)
def test_choose(
    servers: list[Candidate], exclude: tuple[str, ...], expected: str | Verdict
) -> None:
    assert choose(servers, "m", exclude) == expected


# ----------------------------------------------------------------------------- call outcomes


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (ollama.ResponseError("busy", 503), CallOutcome.FAILED),
        (ollama.ResponseError("bad gateway", 502), CallOutcome.FAILED),
        (ollama.ResponseError("too many", 429), CallOutcome.FAILED),
        (ollama.ResponseError("runner terminated", 500), CallOutcome.MODEL_FAILED),
        (ollama.ResponseError("error line", -1), CallOutcome.MODEL_FAILED),
        (ollama.ResponseError("not found", 404), CallOutcome.MODEL_MISSING),
        (ollama.ResponseError("no tools", 400), CallOutcome.REJECTED),
        (httpx.ConnectError("refused"), CallOutcome.FAILED),
        (httpx.RemoteProtocolError("dropped"), CallOutcome.FAILED),
        (ConnectionError("refused"), CallOutcome.FAILED),
        (TimeoutError("no first token"), CallOutcome.FAILED),
        (ValueError("not JSON"), CallOutcome.FAILED),
        (KeyError("a bug of ours"), None),
    ],
)
def test_what_a_failed_call_says_of_the_server(
    error: BaseException, outcome: CallOutcome | None
) -> None:
    assert classify(error) == outcome
