"""The ``kombu-rpc`` command line: ``serve``, ``call``, ``describe``, ``ping`` and ``demo``.

The broker URL comes from ``--broker``/``-b``, else the ``KOMBU_RPC_BROKER_URL``
environment variable; only ``demo`` falls back to ``memory://``. A user or broker error
prints one ``Error: ...`` line on stderr and exits with status 1 (2 for a wrong command
line, as argparse does); ``--verbose``/``-v`` adds the traceback. Ctrl-C exits with
status 130. See :doc:`/cli`.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import importlib
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from decimal import Decimal
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn
from uuid import UUID

from .connection import BROKER_URL_ENV
from .errors import ConfigurationError, RemoteError, RPCError
from .topology import DEFAULT_QUEUE

if TYPE_CHECKING:
    from .registry import Registry
    from .server import RPCServer

#: Exit status of a command interrupted by Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED = 128 + signal.SIGINT


class UsageError(ConfigurationError):
    """Raised when the command line itself is wrong; exits with status 2."""


# -- output ---------------------------------------------------------------------------


def _readable(value: object) -> object:
    """``json.dumps`` ``default``: the types kombu's JSON carries beyond JSON's own, as
    readable text (ISO 8601 dates and times, exact decimals, UUIDs, UTF-8 bytes)."""
    if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, (Decimal, UUID)):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(data).decode("ascii")
    if isinstance(value, (set, frozenset)):
        return list(value)
    return str(value)


def to_json(value: Any, indent: int | None = None) -> str:
    """``value`` as JSON text for people: non-ASCII kept as is, and ``datetime``,
    ``date``, ``time``, ``Decimal``, ``UUID`` and ``bytes`` written as strings
    (ISO 8601, the exact digits, the canonical form, the UTF-8 text or else base64)."""
    return json.dumps(value, ensure_ascii=False, indent=indent, default=_readable)


def _print(text: str) -> None:
    try:
        print(text, flush=True)
    except UnicodeEncodeError:  # a terminal that cannot show it: escape what it cannot
        encoding = sys.stdout.encoding or "ascii"
        print(text.encode(encoding, "backslashreplace").decode(encoding), flush=True)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


# -- arguments ------------------------------------------------------------------------


def _broker(args: argparse.Namespace, fallback: str | None = None) -> str:
    url: str | None = args.broker or os.environ.get(BROKER_URL_ENV) or fallback
    if not url:
        raise UsageError(
            f"a broker is needed: pass --broker URL or set {BROKER_URL_ENV} "
            "(for example amqp://guest:guest@127.0.0.1//)"
        )
    if fallback is None and url.partition(":")[0].strip().lower() == "memory":
        raise UsageError(
            f"memory:// only reaches servers in the same process, so 'kombu-rpc {args.command}' "
            "cannot reach one started elsewhere; use a broker both processes share "
            "(amqp://, redis://), or 'kombu-rpc demo' to try memory:// in one process"
        )
    return url


def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _json_object(option: str, text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise UsageError(f"{option}: expected a JSON object, e.g. '{{\"b\": 2}}', got {text!r}")
    return value


def _positive(kind: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


_seconds = _positive(float, "number of seconds")
_count = _positive(int, "integer")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port (0 to 65535), got {text!r}")
    return port


# -- serve ----------------------------------------------------------------------------


def _load_registry(target: str) -> Registry:
    """Import the module (dotted name or file path) ``target`` names and return the
    registry to serve; refuse one with nothing to serve."""
    from .registry import Registry, default_registry

    spec, _, attribute = target.partition(":")
    if spec.endswith(".py") or os.sep in spec:
        path = Path(spec)
        if not path.is_file():
            raise ConfigurationError(
                f"cannot import {spec!r}: no such file; pass the path of a Python file, "
                f"or a module name importable from here (e.g. {path.stem!r})"
            )
        folder, module_name = str(path.resolve().parent), path.stem
    else:
        folder, module_name = os.getcwd(), spec
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and f"{module_name}.".startswith(f"{exc.name}."):
            path_hint = module_name.replace(".", "/") + ".py"
            raise ConfigurationError(
                f"cannot import {module_name!r}: no module named {exc.name!r} here; "
                f"run from the folder that holds it, or pass its path (e.g. {path_hint})"
            ) from exc
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from exc
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from exc
    except Exception as exc:  # the module's own code failed
        raise ConfigurationError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {_one_line(str(exc))}"
        ) from exc
    if not attribute:
        registry = default_registry
    else:
        found = getattr(module, attribute, None)
        if not isinstance(found, Registry):
            raise ConfigurationError(f"{target!r} is not a kombu_rpc.Registry")
        registry = found
    if not len(registry):
        if attribute:
            raise ConfigurationError(
                f"{target} has no remote functions; register them with @{attribute}.remote"
            )
        others = [name for name, value in vars(module).items() if isinstance(value, Registry) and len(value)]
        hint = f" (or serve {module_name}:{others[0]}, a Registry it defines)" if others else ""
        raise ConfigurationError(
            f"{module_name} registers no remote functions; decorate them with @remote{hint}"
        )
    return registry


def _serve(args: argparse.Namespace) -> int:
    from .connection import connect, safe_uri
    from .server import RPCServer

    broker = _broker(args)
    registry = _load_registry(args.module)
    uri = safe_uri(connect(broker))
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = RPCServer(
        broker,
        registry=registry,
        queue=args.queue,
        concurrency=args.concurrency,
        prefetch_multiplier=args.prefetch_multiplier,
        queue_type=args.queue_type,
    )
    with ExitStack() as stack:
        endpoints = _start_endpoints(args, lambda: server.ready, stack)
        print(f"kombu-rpc serving {args.module} on {uri}", flush=True)
        print(f"  queue: {args.queue}  concurrency: {args.concurrency}", flush=True)
        for line in endpoints:
            print(f"  {line}", flush=True)
        for name in registry.names():
            print(f"  - {name}", flush=True)
        try:
            _run_until_signalled(server)
        except RPCError:
            raise
        except Exception as exc:  # a broker error the server did not wrap (a refused login)
            raise ConfigurationError(
                f"cannot serve on {uri}: {type(exc).__name__}: {_one_line(str(exc))}"
            ) from exc
    return 0


def _start_endpoints(args: argparse.Namespace, ready: Callable[[], bool], stack: ExitStack) -> list[str]:
    """Start the HTTP endpoints ``--health-port`` and ``--metrics-port`` ask for (one
    server if they name the same port); returns the banner's lines about them."""
    ports: dict[int, bool] = {}  # port -> whether it answers /metrics too
    if args.health_port is not None:
        ports[args.health_port] = False
    if args.metrics_port is not None:
        from . import metrics

        if metrics.prometheus_registry() is None:  # unless the served module enabled them
            metrics.enable()
            stack.callback(metrics.disable)
        ports[args.metrics_port] = True
    if not ports:
        return []
    from .health import serve_health

    lines: list[str] = []
    for port, with_metrics in ports.items():
        try:
            endpoint = serve_health(ready, port, args.health_host, metrics=with_metrics)
        except OSError as exc:
            where = f"{args.health_host}:{port}"
            what = "metrics" if with_metrics else "health probes"
            raise ConfigurationError(f"cannot answer {what} on {where}: {exc.strerror or exc}") from exc
        stack.callback(endpoint.close)
        if port == args.health_port:
            lines.append(f"health: {endpoint.url}/livez {endpoint.url}/readyz")
        if with_metrics:
            lines.append(f"metrics: {endpoint.url}/metrics")
    return lines


def _run_until_signalled(server: RPCServer) -> None:
    """Run ``server`` in a thread until it stops. The first SIGINT or SIGTERM stops it
    gracefully; a second one ends the process at once, leaving requests in flight
    unacknowledged for the broker to deliver again."""
    if threading.current_thread() is not threading.main_thread():  # main() in a thread
        server.run()
        return
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            server.run()  # not the main thread: installs no signal handlers
        except BaseException as exc:
            failure.append(exc)

    signals = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal signals
        signals += 1
        name = signal.Signals(signum).name
        if signals == 1:
            sys.stderr.write(
                f"{name}: stopping gracefully, waiting up to {server.shutdown_timeout:g}s "
                "for calls in flight (Ctrl-C again to stop at once)\n"
            )
            sys.stderr.flush()
            server.stop()
            return
        sys.stderr.write(
            f"{name} again: stopping at once; requests in flight are left unacknowledged "
            "and the broker delivers them again\n"
        )
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(128 + signum)

    thread = threading.Thread(target=serve, name="kombu-rpc-serve", daemon=True)
    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        thread.start()
        while thread.is_alive():
            thread.join(1.0)  # signal handlers run in this thread meanwhile
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if failure:
        raise failure[0]


# -- call, describe, ping --------------------------------------------------------------


def _call(args: argparse.Namespace) -> int:
    from .proxy import RPCProxy

    kwargs = _json_object("--kwargs", args.kwargs)
    positional = [_json_arg(arg) for arg in args.args]
    with RPCProxy(_broker(args), queue=args.queue, timeout=args.timeout) as proxy:
        result = proxy[args.method](*positional, **kwargs)
    _print(to_json(result, indent=args.indent))
    return 0


def _describe(args: argparse.Namespace) -> int:
    from .proxy import RPCProxy
    from .registry import RESERVED_PREFIX

    with RPCProxy(_broker(args), queue=args.queue, timeout=args.timeout) as proxy:
        methods = proxy[f"{RESERVED_PREFIX}describe"]()
    if args.json:
        _print(to_json(methods, indent=2))
        return 0
    for method in methods:
        doc = f"  {method['doc']}" if method.get("doc") else ""
        _print(f"{method['name']}{method['signature']}{doc}")
    return 0


def _ping(args: argparse.Namespace) -> int:
    from .proxy import RPCProxy
    from .registry import RESERVED_PREFIX

    with RPCProxy(_broker(args), queue=args.queue, timeout=args.timeout) as proxy:
        replies = proxy[f"{RESERVED_PREFIX}ping"].broadcast(timeout=args.timeout)
    answers: list[dict[str, Any]] = []
    for reply in replies:
        answer: dict[str, Any] = {"server_id": reply.server_id}
        if reply.error is not None:
            answer["error"] = str(reply.error)
        elif isinstance(reply.result, dict):
            answer.update({k: v for k, v in reply.result.items() if k != "server_id"})
        else:
            answer["result"] = reply.result
        answers.append(answer)
    if args.json:
        _print(to_json(answers, indent=2))
    else:
        for answer in answers:
            details = "  ".join(
                f"{key}={value if isinstance(value, str) else to_json(value)}"
                for key, value in answer.items()
                if key != "server_id"
            )
            _print(f"{answer['server_id'] or '?'}  {details}".rstrip())
        if answers:
            count = len(answers)
            _print(f"{count} server{'s' if count > 1 else ''} answered on {args.queue!r}")
    if not answers:
        raise RPCError(f"no server answered on queue {args.queue!r} within {args.timeout:g}s")
    return 0


# -- demo -----------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    import time

    from .proxy import RPCProxy
    from .registry import Registry
    from .server import RPCServer
    from .topology import new_id

    registry = Registry()

    @registry.remote
    def fib(n: int) -> int:
        """The n-th Fibonacci number."""
        a, b = 0, 1
        for _ in range(n):
            a, b = b, a + b
        return a

    broker = _broker(args, fallback="memory://")
    queue = f"kombu_rpc.demo.{new_id()}"
    served = False
    try:
        with RPCServer(broker, registry=registry, queue=queue).running():
            served = True  # the queue is declared
            with RPCProxy(broker, queue=queue, timeout=10) as proxy:
                print(f"fib(30) = {proxy.fib(30)}")
                started = time.perf_counter()
                for _ in range(args.calls):
                    proxy.fib(0)
                elapsed = time.perf_counter() - started
    finally:
        if served:  # the queue is the demo's own (a server never deletes its request queue)
            _discard_request_queue(broker, queue)
    print(f"{args.calls} sequential calls in {elapsed:.2f}s: {args.calls / elapsed:,.0f} calls/s")
    return 0


def _discard_request_queue(broker: str, queue: str) -> None:
    """Delete request queue ``queue`` on ``broker`` (one attempt to connect); a failure
    is only reported on stderr."""
    from .connection import connect
    from .topology import discard_queue, request_queue

    try:
        with connect(broker) as conn:
            conn.ensure_connection(max_retries=1)
            discard_queue(request_queue(queue)(conn.channel()))
    except Exception as exc:
        print(f"Warning: could not delete the demo's queue {queue!r}: {exc}", file=sys.stderr)


# -- the parser -----------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Reports a wrong command line as one ``Error:`` line, with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"Error: {message} (see '{self.prog} --help')\n")


class _Version(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.update(nargs=0, default=argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        import platform
        from importlib.metadata import PackageNotFoundError, version

        from . import __version__

        try:
            kombu = version("kombu")
        except PackageNotFoundError:  # pragma: no cover - kombu is a dependency
            kombu = "?"
        print(f"kombu-rpc {__version__} (kombu {kombu}, Python {platform.python_version()})")
        parser.exit()


_EXAMPLES = {
    "kombu-rpc": """\
examples:
  kombu-rpc serve services -b amqp://guest:guest@127.0.0.1//
  export KOMBU_RPC_BROKER_URL=amqp://guest:guest@127.0.0.1//
  kombu-rpc call fib 30
  kombu-rpc describe
  kombu-rpc ping
  kombu-rpc demo

exit status: 0 done, 1 error (remote, broker or module), 2 wrong command line,
130 interrupted (Ctrl-C). 'kombu-rpc COMMAND --help' shows each command's options.""",
    "serve": """\
MODULE is a dotted module name importable from the current folder, or the path of a
Python file (imported from its folder). The first Ctrl-C (or SIGTERM) stops
gracefully, letting calls in flight finish; a second one stops at once, leaving them
unacknowledged for the broker to deliver again.

examples:
  kombu-rpc serve services -b amqp://guest:guest@127.0.0.1//
  kombu-rpc serve path/to/services.py -q billing -c 8
  kombu-rpc serve services:admin        # the Registry named 'admin' in services
  kombu-rpc serve services --health-port 8080 --health-host 0.0.0.0""",
    "call": """\
Each ARG is parsed as JSON, else taken as a string. The result is printed as JSON;
non-ASCII text as is, datetime/date/time as ISO 8601 strings, Decimal and UUID as
strings, bytes as their UTF-8 text (base64 if not UTF-8). A remote error prints
'Type: message' on stderr and exits with status 1 (-v adds the remote traceback).

examples:
  kombu-rpc call fib 30
  kombu-rpc call math.add hello --kwargs '{"b": " world"}'
  kombu-rpc call report.build '[1, 2]' -q reports -t 120 --indent 2""",
    "describe": """\
examples:
  kombu-rpc describe
  kombu-rpc describe -q billing --json""",
    "ping": """\
Every server of the queue answers (through the queue's broadcast exchange, not the
request queue). Exits with status 0 if at least one answered, 1 if none did.

examples:
  kombu-rpc ping
  kombu-rpc ping -q billing -t 3 --json""",
    "demo": """\
examples:
  kombu-rpc demo
  kombu-rpc demo -b redis://127.0.0.1:6379/0 --calls 5000""",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kombu-rpc``."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="kombu-rpc",
        description="Remote procedure calls over kombu (RabbitMQ, Redis, ...).",
        epilog=_EXAMPLES["kombu-rpc"],
        formatter_class=formatter,
    )
    parser.add_argument("--version", action=_Version, help="show the versions and exit")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show tracebacks with errors (also after COMMAND)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help, description=help, epilog=_EXAMPLES[name], formatter_class=formatter
        )
        sub.add_argument("-b", "--broker", metavar="URL", help=f"broker URL (default: ${BROKER_URL_ENV})")
        sub.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,  # keeps a -v given before COMMAND
            help="show tracebacks with errors",
        )
        return sub

    def queue_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "-q", "--queue", default=DEFAULT_QUEUE, help=f"request queue (default: {DEFAULT_QUEUE})"
        )

    serve = command("serve", "serve the functions a module registers")
    serve.add_argument(
        "module",
        metavar="MODULE[:REGISTRY]",
        help="module name or .py file to import; REGISTRY names a kombu_rpc.Registry in it "
        "(default: the default registry)",
    )
    queue_option(serve)
    serve.add_argument(
        "-c", "--concurrency", type=_count, metavar="N", default=1, help="calls run at once (default: 1)"
    )
    serve.add_argument(
        "--prefetch-multiplier",
        type=_count,
        metavar="N",
        default=1,
        help="requests taken ahead per call run; the prefetch is concurrency x N (default: 1)",
    )
    serve.add_argument(
        "--queue-type",
        choices=["classic", "quorum"],
        default="classic",
        help="RabbitMQ request queue type: quorum replicates it over a cluster (default: classic)",
    )
    serve.add_argument(
        "-l",
        "--loglevel",
        metavar="LEVEL",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="debug, info, warning or error (default: info)",
    )
    serve.add_argument(
        "--health-port",
        type=_port,
        metavar="PORT",
        help="answer HTTP health probes on PORT: /livez (the process runs) and /readyz "
        "(consuming its queue; 503 otherwise); 0 picks a free port",
    )
    serve.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="count calls (kombu_rpc.metrics) and answer Prometheus scrapes on PORT: /metrics "
        "(and the health probes); may be the health port",
    )
    serve.add_argument(
        "--health-host",
        metavar="HOST",
        default="127.0.0.1",
        help="address of the health probes and metrics (default: 127.0.0.1; 0.0.0.0 in a container)",
    )
    serve.set_defaults(handler=_serve)

    call = command("call", "call a remote function and print its result as JSON")
    call.add_argument("method", help="remote name, e.g. math.add")
    call.add_argument(
        "args", nargs="*", default=[], metavar="ARG", help="arguments, each parsed as JSON, else a string"
    )
    call.add_argument("--kwargs", metavar="JSON", help="keyword arguments as a JSON object")
    call.add_argument("--indent", type=int, metavar="N", help="indent the JSON result by N spaces")
    call.set_defaults(handler=_call)

    describe = command("describe", "list the functions a running server exposes")
    describe.add_argument("--json", action="store_true", help="print a JSON list (name, signature, doc)")
    describe.set_defaults(handler=_describe)

    ping = command("ping", "ask every server of a queue to answer, and list them")
    ping.add_argument("--json", action="store_true", help="print a JSON list of the answers")
    ping.set_defaults(handler=_ping)

    for sub, default in ((call, 30.0), (describe, 30.0), (ping, 1.0)):
        queue_option(sub)
        sub.add_argument(
            "-t",
            "--timeout",
            type=_seconds,
            metavar="SECONDS",
            default=default,
            help=f"seconds to wait (default: {default:g})",
        )

    demo = command("demo", "serve fib in-process, call it, time sequential calls (default: memory://)")
    demo.add_argument("--calls", type=_count, default=1000, help="calls to time (default: 1000)")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kombu-rpc`` with ``argv``; returns the exit status.

    A wrong command line exits through :class:`SystemExit` (status 2), as argparse does.
    """
    args = build_parser().parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))

    def fail(message: str, status: int = 1) -> int:
        if verbose:
            traceback.print_exc()
        print(message, file=sys.stderr, flush=True)
        return status

    try:
        status: int = args.handler(args)
    except KeyboardInterrupt:
        sent = "; the request was sent and may still run" if args.command == "call" else ""
        return fail(f"Interrupted{sent}", INTERRUPTED)
    except RemoteError as exc:
        if verbose and exc.remote_traceback:
            print(exc.remote_traceback.rstrip(), file=sys.stderr)
        print(_one_line(str(exc)), file=sys.stderr, flush=True)
        return 1
    except UsageError as exc:
        return fail(f"Error: {_one_line(str(exc))}", 2)
    except RPCError as exc:
        return fail(f"Error: {_one_line(str(exc))}")
    except Exception as exc:  # a broker error kombu raised as it is
        return fail(f"Error: {type(exc).__name__}: {_one_line(str(exc))}")
    return status
