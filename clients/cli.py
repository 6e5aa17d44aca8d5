"""The `modelyard` command line.

`modelyard serve {catalog,trainer,inference,gateway,all}` runs the servers
(`all` is the embedded default: one process, SQLite under the data directory,
ports 50051/50052/50053, and the OpenAI-compatible HTTP gateway on
127.0.0.1:8000). Client commands read addresses from flags or the
`MODELYARD_{CATALOG,TRAINER,INFERENCE}_ADDRESS` environment variables.
Exit codes: 0 success, 1 a failed RPC, 2 bad usage, 3 service unreachable.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

EXIT_OK = 0
EXIT_RPC_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

Command = Callable[[argparse.Namespace], int]


def _serve(args: argparse.Namespace) -> int:
    from clients.serve import serve

    return serve(args.service, args)


def build_parser() -> argparse.ArgumentParser:
    """The full `modelyard` argument parser."""
    from server_kit.common import CommonSettings
    from server_kit.settings import add_arguments

    parser = argparse.ArgumentParser(prog="modelyard", description="Modelyard: an open model platform.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the servers",
        description="Run one service, or all three and the HTTP gateway in one process "
        "(SQLite, ports 50051-50053, gateway 127.0.0.1:8000).",
    )
    serve.add_argument(
        "service",
        choices=["catalog", "trainer", "inference", "gateway", "all"],
        help="the service to run; all runs the three and the gateway in one process",
    )
    add_arguments(CommonSettings, serve)
    serve.set_defaults(func=_serve)

    from clients import commands

    commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `modelyard` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Command = args.func
    from clients.errors import ModelyardRpcError

    try:
        return func(args)
    except ModelyardRpcError as error:
        import grpc

        print(f"error: {error}", file=sys.stderr)
        if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return EXIT_UNAVAILABLE
        return EXIT_RPC_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
