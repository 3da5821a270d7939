"""`chatbus`: try the chat service from a terminal.

It reads the settings the service reads (`RABBITMQ_URL`, and the queue and exchange names),
from the environment or a `.env` file.
"""

import argparse
import asyncio
import contextlib
import io
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from aio_pika.exceptions import AMQPConnectionError, ChannelNotFoundEntity
from aiormq.exceptions import InvalidFrameError
from pydantic import ValidationError
from yarl import URL

from chatbus import failover
from chatbus.client import ChatClient, ChatEvent, RequestFields, Restarted
from chatbus.contract import DoneReply, ModelInfo
from chatbus.conversation import Conversation
from chatbus.dlq import DeadLetter, DeadLetterError, DeadLetterQueue, Outcome
from chatbus.errors import ChatError
from chatbus.settings import DEFAULT_RABBITMQ_URL, BusSettings, settings_problems
from chatbus.startup import RabbitMQRefused

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
WAITING_NOTICE_AFTER = 5.0
"""Seconds without a first token before the CLI says that it is still waiting."""

EPILOG = f"""\
settings, from the environment or .env, as the service reads them:
  RABBITMQ_URL       default {DEFAULT_RABBITMQ_URL}
                     (several nodes: comma-separated, the first that answers is used)
  REQUESTS_QUEUE, REPLIES_EXCHANGE, CANCEL_EXCHANGE, MODELS_QUEUE, DEAD_LETTER_QUEUE
                     default: the contract's names
exit codes:
  0 done, {EXIT_ERROR} the request failed, RabbitMQ is unreachable or a setting is invalid,
  {EXIT_USAGE} bad arguments, {EXIT_INTERRUPTED} interrupted (Ctrl-C cancels the generation)"""


DEFAULT_TIMEOUT = 300.0


def _say_client_warnings() -> None:
    """The client library's warnings (no worker consuming, ...) on stderr, as the CLI's."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("chatbus: %(message)s"))
    client_logger = logging.getLogger("chatbus.client")
    client_logger.addHandler(handler)
    client_logger.setLevel(logging.WARNING)
    client_logger.propagate = False


class CliError(Exception):
    """Ends the command with a message and exit code 1."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    worker_command: bool = args.command is _worker
    if worker_command:
        # The worker reads settings of its own, and exits 2 when they cannot work.
        return _worker()
    try:
        settings = BusSettings()
    except ValidationError as error:
        print(f"chatbus: {settings_problems(error)}", file=sys.stderr)
        return EXIT_ERROR
    _for_people()
    _say_client_warnings()
    try:
        return int(args.command(args, settings))
    except (ChatError, CliError) as error:
        print(f"chatbus: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\nchatbus: cancelled", file=sys.stderr)
        return EXIT_INTERRUPTED


def _for_people() -> None:
    """Every failure reaches the user as one line of this command's own. The libraries'
    log lines (aiormq's "error when creating transport", aio-pika's reconnect attempts)
    would only repeat it, with less to act on; the client's own warnings get our prefix.
    Input that is not UTF-8 is read as the command line is (surrogateescape), so that the
    client refuses it in one line instead of the read failing with a traceback."""
    logging.basicConfig(format="chatbus: %(message)s", level=logging.WARNING)
    for library in ("aiormq", "aio_pika"):
        logging.getLogger(library).propagate = False
        logging.getLogger(library).addHandler(logging.NullHandler())
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatbus",
        description="Chat with the chatbus service over RabbitMQ.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(title="commands", required=True)

    request = argparse.ArgumentParser(add_help=False)
    request.add_argument("--model", help="Ollama model (default: the worker's DEFAULT_MODEL)")
    request.add_argument("--system", help="system prompt")
    request.add_argument(
        "--option",
        action="append",
        type=_option,
        default=[],
        metavar="KEY=VALUE",
        help="an Ollama option, e.g. temperature=0.2 (VALUE is read as JSON if it can be)",
    )
    request.add_argument(
        "--think", action="store_const", const=True, help="let a thinking model think"
    )
    request.add_argument(
        "--think-level", dest="think", choices=["low", "medium", "high"], help="think this hard"
    )
    request.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds before giving up on an answer, also sent as the request's deadline "
        f"so that no worker generates it later (default {DEFAULT_TIMEOUT:g}; 0: none)",
    )
    request.add_argument(
        "--no-wait",
        dest="wait_for_worker",
        action="store_false",
        help="fail at once when no worker consumes the requests (default: say so on "
        "stderr and wait for one, up to the timeout)",
    )
    request.add_argument("--json", action="store_true", help="print the raw events as JSON lines")

    ask = commands.add_parser(
        "ask",
        parents=[request],
        help="ask one question and stream the answer",
        description="Ask one question and stream the answer; a line of usage follows on stderr.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ask.add_argument("prompt", nargs="*", help="the question (default: read from stdin)")
    ask.set_defaults(command=_ask)

    chat = commands.add_parser(
        "chat",
        parents=[request],
        help="an interactive conversation",
        description="An interactive conversation. /reset forgets it, /model NAME switches "
        "models, /exit (or Ctrl-D) leaves; Ctrl-C cancels the answer being written.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.set_defaults(command=_chat)

    models = commands.add_parser(
        "models",
        help="list the models Ollama has, as the worker sees them",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    models.add_argument("--json", action="store_true", help="print them as JSON")
    models.set_defaults(command=_models)

    worker = commands.add_parser(
        "worker",
        help="run a worker (the same as `faststream run chatbus.service:app`)",
        description="Run a worker, configured by the environment (see the README's settings).",
    )
    worker.set_defaults(command=_worker)

    gateway = commands.add_parser(
        "gateway",
        help="serve Ollama's and OpenAI's HTTP APIs in front of the bus",
        description="Serve Ollama's (/api/...) and OpenAI's (/v1/...) HTTP APIs; each request "
        "becomes a request on the bus. Settings: GATEWAY_HOST, GATEWAY_PORT, GATEWAY_TIMEOUT, "
        "GATEWAY_API_KEYS, as the README describes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gateway.set_defaults(command=_gateway)
    _add_dlq_commands(commands)
    return parser


def _worker() -> int:
    # Imported here: the service's metrics and tracing would slow every other command.
    from chatbus.service import app_from_environment

    app = app_from_environment()
    asyncio.run(app.run())
    return 0


def _add_dlq_commands(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    dlq = commands.add_parser(
        "dlq",
        help="the dead-letter queue: list, replay or purge requests that failed",
        description="Requests end in the dead-letter queue (DEAD_LETTER_QUEUE) when they were "
        "invalid or failed on every allowed delivery.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = dlq.add_subparsers(title="commands", required=True)

    listing = actions.add_parser(
        "list",
        help="the dead letters: correlation id, why (x-death reason and count), age, model",
    )
    listing.add_argument(
        "--show-content", action="store_true", help="also show the requests' text (user data)"
    )
    listing.add_argument(
        "--limit", type=int, default=100, help="show the first N of the queue (default 100)"
    )
    listing.add_argument("--json", action="store_true", help="print them as JSON")
    listing.set_defaults(command=_dlq_list)

    replay = actions.add_parser(
        "replay",
        help="move dead letters back to the request queue",
        description="Publish each chosen dead letter to the request queue as it was sent "
        "and, once the broker confirmed it, remove it from the dead-letter queue: "
        "interrupted, nothing is lost; at worst one request is in both queues.",
    )
    chosen = replay.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--id", nargs="+", dest="ids", metavar="CID", help="correlation ids")
    chosen.add_argument("--all", action="store_true", help="every dead letter")
    replay.set_defaults(command=_dlq_replay)

    purge = actions.add_parser("purge", help="drop dead letters for good")
    purge.add_argument(
        "--id", nargs="+", dest="ids", metavar="CID", required=True, help="correlation ids"
    )
    purge.set_defaults(command=_dlq_purge)


def _gateway(args: argparse.Namespace, settings: BusSettings) -> int:
    # Imported here: the other commands need neither FastAPI nor uvicorn.
    from chatbus.gateway import GatewaySettings, serve

    serve(GatewaySettings())
    return 0


def _option(text: str) -> tuple[str, Any]:
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _fields(args: argparse.Namespace) -> RequestFields:
    return RequestFields(model=args.model, options=dict(args.option) or None, think=args.think)


def _ask(args: argparse.Namespace, settings: BusSettings) -> int:
    prompt = " ".join(args.prompt) or sys.stdin.read().strip()
    if not prompt:
        raise CliError("nothing to ask: give a question or pipe one in")
    asyncio.run(_ask_async(args, settings, prompt))
    return 0


async def _ask_async(args: argparse.Namespace, settings: BusSettings, prompt: str) -> None:
    async with _connected(settings, args) as client:
        conversation = Conversation(client, system=args.system, **_fields(args))
        await Printer(json_lines=args.json).show(conversation.stream(prompt))


def _chat(args: argparse.Namespace, settings: BusSettings) -> int:
    interactive = sys.stdin.isatty()
    with asyncio.Runner() as runner:
        client = runner.run(_connect(settings, args))
        conversation = Conversation(client, system=args.system, **_fields(args))
        print(
            f"chatbus chat · model: {_model_name(conversation)} · /model NAME, /reset, "
            "/exit or Ctrl-D to leave · Ctrl-C stops an answer",
            file=sys.stderr,
            flush=True,
        )
        try:
            while (line := _read_line(interactive)) is not None:
                if line.startswith("/"):
                    if not _command(line, conversation):
                        break
                elif line.strip():
                    runner.run(_turn(conversation, line, Printer(json_lines=args.json)))
        finally:
            runner.run(client.close())
    return 0


def _read_line(interactive: bool) -> str | None:
    """The next line typed, or None at the end of the input."""
    while True:
        try:
            return input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                print()  # Ctrl-D leaves the cursor after the prompt: the shell's goes below
            return None
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D leaves)", file=sys.stderr)


def _command(line: str, conversation: Conversation) -> bool:
    """Run a /command; False when it is time to leave."""
    name, _, argument = line.strip().partition(" ")
    if name in ("/exit", "/bye"):
        return False
    if name == "/reset":
        conversation.reset()
        print("(history cleared)", file=sys.stderr)
    elif name == "/model":
        conversation.model = argument.strip() or conversation.model
        print(f"(model: {_model_name(conversation)})", file=sys.stderr)
    else:
        print("(commands: /reset, /model [NAME], /exit)", file=sys.stderr)
    return True


def _model_name(conversation: Conversation) -> str:
    return conversation.model or "the worker's default"


async def _turn(conversation: Conversation, line: str, printer: "Printer") -> None:
    try:
        await printer.show(conversation.stream(line))
    except asyncio.CancelledError:
        task = asyncio.current_task()
        assert task is not None
        # Ctrl-C: the stream has cancelled this answer on the worker; the chat goes on.
        task.uncancel()
        print("\n(cancelled)", file=sys.stderr)
    except ChatError as error:
        print(f"chatbus: {error}", file=sys.stderr)


def _models(args: argparse.Namespace, settings: BusSettings) -> int:
    models = asyncio.run(_list_models(settings))
    if args.json:
        print(json.dumps([model.model_dump(mode="json") for model in models], indent=2))
    else:
        print(_models_table(models))
    return 0


async def _list_models(settings: BusSettings) -> list[ModelInfo]:
    async with _connected(settings) as client:
        return await client.models()


def _models_table(models: list[ModelInfo]) -> str:
    rows = [("NAME", "PARAMETERS", "QUANTIZATION", "SIZE", "MODIFIED")]
    for model in models:
        rows.append(
            (
                model.name,
                model.parameter_size or "",
                model.quantization_level or "",
                f"{model.size / 1e9:.1f} GB" if model.size is not None else "",
                f"{model.modified_at:%Y-%m-%d}" if model.modified_at else "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _dlq_list(args: argparse.Namespace, settings: BusSettings) -> int:
    async def listed() -> tuple[int, list[DeadLetter]]:
        async with _dead_letters(settings) as queue:
            return await queue.count(), await queue.list(args.limit)

    count, letters = asyncio.run(listed())
    if args.json:
        shown = [letter.summary(show_content=args.show_content) for letter in letters]
        document = {"queue": settings.dead_letter_queue, "count": count, "dead_letters": shown}
        print(json.dumps(document, indent=2))
        return 0
    print(f"{settings.dead_letter_queue}: {count} dead letter{'s' if count != 1 else ''}")
    if count > len(letters):
        print(f"(the first {len(letters)} in the queue shown)")
    if letters:
        print(_dead_letters_table(letters, show_content=args.show_content))
    return 0


def _dead_letters_table(letters: list[DeadLetter], *, show_content: bool) -> str:
    rows = [("CORRELATION ID", "REASON", "COUNT", "AGE", "MODEL")]
    for letter in letters:
        age = letter.age()
        rows.append(
            (
                letter.correlation_id or "(none)",
                letter.reason or "",
                "" if letter.count is None else str(letter.count),
                "" if age is None else _duration(age),
                letter.model or "(default)",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if show_content and index > 0:
            lines.append(f"  {json.dumps(letters[index - 1].content())}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def _dlq_replay(args: argparse.Namespace, settings: BusSettings) -> int:
    async def replayed() -> Outcome:
        async with _dead_letters(settings) as queue:
            return await queue.replay(None if args.all else args.ids)

    outcome = asyncio.run(replayed())
    print(f"replayed {len(outcome.done)} to {settings.requests_queue}")
    return _report_not_found(outcome)


def _dlq_purge(args: argparse.Namespace, settings: BusSettings) -> int:
    async def purged() -> Outcome:
        async with _dead_letters(settings) as queue:
            return await queue.purge(args.ids)

    outcome = asyncio.run(purged())
    print(f"purged {len(outcome.done)} from {settings.dead_letter_queue}")
    return _report_not_found(outcome)


def _report_not_found(outcome: Outcome) -> int:
    for correlation_id in sorted(outcome.not_found):
        print(f"chatbus: no dead letter with correlation id {correlation_id}", file=sys.stderr)
    return EXIT_ERROR if outcome.not_found else 0


@contextlib.asynccontextmanager
async def _dead_letters(settings: BusSettings) -> AsyncIterator[DeadLetterQueue]:
    with _connection_errors(settings):
        connection = await failover.connect(settings.rabbitmq_url)
    async with connection:
        try:
            yield DeadLetterQueue(connection, settings.dead_letter_queue, settings.requests_queue)
        except (ChannelNotFoundEntity, DeadLetterError) as error:
            raise CliError(str(error)) from None


@contextlib.asynccontextmanager
async def _connected(
    settings: BusSettings, args: argparse.Namespace | None = None
) -> AsyncIterator[ChatClient]:
    client = await _connect(settings, args)
    try:
        yield client
    finally:
        await client.close()


async def _connect(settings: BusSettings, args: argparse.Namespace | None) -> ChatClient:
    """A connected client; the request options (timeout, waiting for a worker) from `args`
    when the command sends requests."""
    client = ChatClient(
        settings.rabbitmq_url,
        names=settings.names,
        timeout=(args.timeout or None) if args else None,
        wait_for_worker=args.wait_for_worker if args else True,
    )
    with _connection_errors(settings):
        await client.connect(give_up_after=0)  # a person is waiting: say so at once
    return client


@contextlib.contextmanager
def _connection_errors(settings: BusSettings) -> Iterator[None]:
    try:
        yield
    except InvalidFrameError as error:
        if "Connection.OpenOk" not in str(error):
            raise
        # RabbitMQ closed the connection in answer to opening the virtual host; aiormq
        # keeps only that, not the broker's words ("vhost ... not found", or "access to
        # vhost ... refused").
        url = failover.addresses(settings.rabbitmq_url)[0]
        raise CliError(
            f"RabbitMQ at {failover.shown(settings.rabbitmq_url)} refused virtual host "
            f"{_vhost(url)!r}: it does not exist, or user {url.user or 'guest'!r} may not use "
            "it (see rabbitmqctl list_vhosts, list_permissions)"
        ) from None
    except (OSError, AMQPConnectionError) as error:
        where = failover.shown(settings.rabbitmq_url)
        raise CliError(f"cannot connect to RabbitMQ at {where}: {error}") from None
    except (failover.ConfigurationError, RabbitMQRefused) as error:
        raise CliError(str(error)) from None


def _vhost(url: URL) -> str:
    """The virtual host as aiormq names it: the path without its first slash, or "/"."""
    return url.path[1:] or "/"


class Printer:
    """Shows one answer: text on stdout as it comes, thinking and the usage line on stderr;
    or, with `json_lines`, every event as a line of JSON on stdout. When nothing has come
    after `notice_after` seconds, it says on stderr that it is still waiting, and why that
    may be."""

    def __init__(self, *, json_lines: bool, notice_after: float = WAITING_NOTICE_AFTER) -> None:
        self._json = json_lines
        self._notice_after = notice_after

    async def show(self, events: AsyncIterator[ChatEvent]) -> None:
        started = time.monotonic()
        first_token_after: float | None = None
        notice = asyncio.get_running_loop().call_later(self._notice_after, self._still_waiting)
        try:
            async for event in events:
                notice.cancel()
                if self._json:
                    print(event.model_dump_json(exclude_none=True), file=sys.stdout, flush=True)
                if isinstance(event, DoneReply):
                    self._finish(event, first_token_after)
                elif isinstance(event, Restarted):
                    if not self._json:
                        print("\n(the worker restarted this answer)", file=sys.stderr, flush=True)
                else:
                    if first_token_after is None:
                        first_token_after = time.monotonic() - started
                    if not self._json:
                        if event.thinking:
                            print(event.thinking, end="", file=sys.stderr, flush=True)
                        print(event.content, end="", file=sys.stdout, flush=True)
        finally:
            notice.cancel()

    def _still_waiting(self) -> None:
        print(
            f"(no answer yet after {self._notice_after:g} s: no worker may have taken the "
            "request yet, the model may be loading, or Ollama may be busy or unreachable "
            "while the worker retries; Ctrl-C cancels)",
            file=sys.stderr,
            flush=True,
        )

    def _finish(self, done: DoneReply, first_token_after: float | None) -> None:
        if not self._json:
            print(file=sys.stdout, flush=True)
        print(_usage(done, first_token_after), file=sys.stderr, flush=True)


def _usage(done: DoneReply, first_token_after: float | None) -> str:
    usage, timings = done.usage, done.timings
    parts = [
        done.model,
        f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens",
    ]
    if first_token_after is not None:
        parts.append(f"first token after {first_token_after:.2f}s")
    if timings.eval_duration:
        parts.append(f"{usage.completion_tokens / (timings.eval_duration / 1e9):.1f} tokens/s")
    if done.done_reason != "stop":
        parts.append(f"ended: {done.done_reason}")
    return " · ".join(parts)
