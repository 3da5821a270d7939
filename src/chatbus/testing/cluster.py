"""RabbitMQ nodes of their own, on this machine, for tests that kill or restart brokers.

A node that a test stops must not be the machine's shared broker (other suites would lose
their connections and queues), so these nodes have their own names
(`chatbus-<run>-<n>@localhost`), their own AMQP and Erlang distribution ports (picked
free), and their own data, log and config files in a directory of their own. They are
started with the `rabbitmq-server` and `rabbitmqctl` of the machine (Debian's package runs
them as the `rabbitmq` user, whose Erlang cookie every node shares, so they can cluster), and
stopped and removed by their own names. Every `rabbitmqctl` call is bounded by a timeout.

```
async with RabbitCluster(3) as cluster:
    url = cluster.url        # every node's address, comma-separated
    await cluster.nodes[0].kill()
    await cluster.nodes[0].start()   # back, with its data: it rejoins the cluster
```

Needs `rabbitmq-server` and `rabbitmqctl` on PATH, and to run as root or as `rabbitmq`
(`available()` says why not, for a skip).
"""

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Self

RABBITMQ_USER = "rabbitmq"
COMMAND_TIMEOUT = 90.0
"""Seconds any one rabbitmq-server or rabbitmqctl call may take before it is killed."""


class NodeError(RuntimeError):
    """A node could not be started, stopped or asked something."""


def available() -> str | None:
    """None when nodes can be started here, else why not."""
    for command in ("rabbitmq-server", "rabbitmqctl"):
        if shutil.which(command) is None:
            return f"needs {command} on PATH"
    try:
        user = pwd.getpwnam(RABBITMQ_USER)
    except KeyError:
        return f"needs the {RABBITMQ_USER!r} user that the RabbitMQ package creates"
    if os.geteuid() not in (0, user.pw_uid):
        return f"needs to run as root or as {RABBITMQ_USER!r} to start RabbitMQ nodes"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def run(
    *command: str, env: dict[str, str] | None = None, timeout: float = COMMAND_TIMEOUT
) -> str:
    """Run a command to its end within `timeout`; its stdout, or NodeError with its output."""
    process = await asyncio.create_subprocess_exec(
        *command,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # The scripts cd to /var/lib/rabbitmq; start from a directory rabbitmq can read.
        cwd="/",
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise NodeError(f"{' '.join(command)} did not finish in {timeout:.0f} s") from None
    if process.returncode != 0:
        raise NodeError(
            f"{' '.join(command)} exited with {process.returncode}: "
            f"{(stdout + stderr).decode(errors='replace').strip()}"
        )
    return stdout.decode(errors="replace")


class RabbitNode:
    """One RabbitMQ node with its own name, ports and files under `base`."""

    def __init__(self, name: str, base: Path) -> None:
        self.name = name
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.home = base / name.split("@", 1)[0]
        self._pid_file = self.home / "pid"
        self._env = self._environment()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    def _environment(self) -> dict[str, str]:
        # Only what this node is told here: a RABBITMQ_* of the caller's must not leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        return env | {
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_CONFIG_FILE": str(self.home / "rabbitmq"),  # without .conf
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.home / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.home / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self._pid_file),
        }

    def _write_files(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        # The distribution package pins its listener to 5672: this node needs its own.
        (self.home / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.amqp_port}\n"
        )
        (self.home / "enabled_plugins").write_text("[].\n")
        _give_to_rabbitmq(self.home)

    async def ctl(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """`rabbitmqctl` against this node."""
        return await run("rabbitmqctl", "-n", self.name, *args, env=self._env, timeout=timeout)

    async def start(self) -> None:
        """Start the node (again, after a stop or a kill: with the data it had) and wait
        until its applications run."""
        if not self.home.exists():
            self._write_files()
        with contextlib.suppress(FileNotFoundError):
            self._pid_file.unlink()  # a killed node's, or `wait` would find the dead pid
        await run("rabbitmq-server", "-detached", env=self._env)
        await self.ctl("wait", str(self._pid_file), "--timeout", str(int(COMMAND_TIMEOUT) - 10))

    async def stop(self) -> None:
        """Stop the node gracefully and wait until its process is gone."""
        if self.pid() is None:
            return
        await self.ctl("stop", str(self._pid_file))

    async def kill(self) -> None:
        """SIGKILL the node, as a crash or a power loss would end it."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(COMMAND_TIMEOUT):
            while _running(pid):  # noqa: ASYNC110 - no event for another process's end
                await asyncio.sleep(0.05)

    def pid(self) -> int | None:
        """The node's OS process, while it runs."""
        try:
            pid = int(self._pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _running(pid) else None

    async def list(self, what: str, *columns: str) -> list[dict[str, Any]]:
        """A `rabbitmqctl list_<what>` table, as the cluster sees it, one dict per row."""
        output = await self.ctl(f"list_{what}", *columns, "--formatter", "json", "--quiet")
        rows: list[dict[str, Any]] = json.loads(output or "[]")
        return rows


class RabbitCluster:
    """`size` nodes started together on this machine, clustered when there is more than
    one, and stopped and removed on leaving the block."""

    def __init__(self, size: int = 3, run_id: str | None = None) -> None:
        self.run_id = run_id or uuid.uuid4().hex[:8]
        # Made when the cluster starts: a cluster never started leaves nothing behind.
        self._base = Path(tempfile.gettempdir(), f"chatbus-{self.run_id}")
        self.nodes = [
            RabbitNode(f"chatbus-{self.run_id}-{n}@localhost", self._base)
            for n in range(1, size + 1)
        ]
        self.started_in: float | None = None
        """Seconds from the first start to the whole cluster running."""

    @property
    def url(self) -> str:
        """Every node's address, comma-separated, as RABBITMQ_URL takes them."""
        return ",".join(node.url for node in self.nodes)

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.remove()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.remove()

    async def start(self) -> None:
        started = time.monotonic()
        self._base.mkdir()
        _give_to_rabbitmq(self._base)
        await asyncio.gather(*(node.start() for node in self.nodes))
        first, *others = self.nodes
        for node in others:
            await node.ctl("stop_app")
            await node.ctl("join_cluster", first.name)
            await node.ctl("start_app")
            await node.ctl("await_startup")
        self.started_in = time.monotonic() - started

    def node_on_port(self, port: int) -> RabbitNode:
        return next(node for node in self.nodes if node.amqp_port == port)

    def running(self) -> list[RabbitNode]:
        return [node for node in self.nodes if node.pid() is not None]

    async def connected_node(self, connection_name: str) -> RabbitNode:
        """The node a client's connection (by its connection name) is on."""
        for row in await self.running()[0].list("connections", "port", "client_properties"):
            if _connection_name(row) == connection_name:
                return self.node_on_port(int(row["port"]))
        raise NodeError(f"no connection named {connection_name!r}")

    async def leader_of(self, queue: str) -> RabbitNode:
        """The node that leads a quorum queue now."""
        for row in await self.running()[0].list("queues", "name", "leader"):
            if row["name"] == queue:
                return next(node for node in self.nodes if node.name == row["leader"])
        raise NodeError(f"no queue {queue!r}")

    async def wait_until_online(self, queue: str, members: int, timeout: float = 60) -> None:
        """Until a quorum queue has `members` members running (RabbitMQ tells no event)."""
        async with asyncio.timeout(timeout):
            while True:
                rows = await self.running()[0].list("queues", "name", "online")
                if any(r["name"] == queue and len(r["online"]) >= members for r in rows):
                    return
                await asyncio.sleep(0.2)

    async def remove(self) -> None:
        """Stop every node by its own name (killing one that will not stop), and delete
        their files."""
        await asyncio.gather(*(_stop_or_kill(node) for node in self.nodes))
        shutil.rmtree(self._base, ignore_errors=True)


async def _stop_or_kill(node: RabbitNode) -> None:
    try:
        await node.stop()
    except NodeError:
        await node.kill()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _give_to_rabbitmq(path: Path) -> None:
    user = pwd.getpwnam(RABBITMQ_USER)
    path.chmod(0o755)
    for directory, _, files in os.walk(path):
        os.chown(directory, user.pw_uid, user.pw_gid)
        for file in files:
            os.chown(Path(directory, file), user.pw_uid, user.pw_gid)


def _connection_name(row: dict[str, Any]) -> str | None:
    """`client_properties` comes as a list of [key, type, value] triples."""
    for key, _, value in row.get("client_properties", []):
        if key == "connection_name":
            return str(value)
    return None
