"""`modelyard workers ...` and `modelyard route MODEL`."""

from __future__ import annotations

import argparse

from clients.catalog import model_name
from clients.commands.common import CATALOG, HelpFormatter, Subparsers, catalog_client, options_parser
from clients.commands.views import WORKER_HEADERS, report_lines, route_text, worker_block, worker_rows
from clients.output import print_json, table
from clients.routing import role_label
from modelyard.catalog.v1 import catalog_service_pb2 as pb
from modelyard.catalog.v1 import worker_pb2

ROLES = {
    "inference": worker_pb2.WORKER_ROLE_INFERENCE,
    "training": worker_pb2.WORKER_ROLE_TRAINING,
    "any": worker_pb2.WORKER_ROLE_UNSPECIFIED,
}


def register(sub: Subparsers) -> None:
    """Add `workers` and `route`."""
    options = options_parser(CATALOG)
    workers = sub.add_parser(
        "workers",
        help="list the workers registered with the catalog",
        description="Inspect the inference and training workers registered with the catalog.",
    )
    commands = workers.add_subparsers(dest="workers_command", required=True, metavar="COMMAND")
    lst = commands.add_parser(
        "list",
        parents=[options],
        help="list workers",
        formatter_class=HelpFormatter,
        description="List workers with their role, engine, state, device memory and loaded models.",
        epilog=(
            "filter fields: role, engine, state.\n\n"
            "examples:\n"
            "  modelyard workers list\n"
            '  modelyard workers list --filter \'role = "INFERENCE" AND state = "HEALTHY"\' --json'
        ),
    )
    lst.add_argument("--filter", default="", help="AIP-160 filter")
    lst.set_defaults(func=list_workers)

    show = commands.add_parser(
        "show", parents=[options], help="show one worker", description="Show a worker's full description."
    )
    show.add_argument("worker", metavar="WORKER", help="worker id or workers/ID")
    show.set_defaults(func=show_worker)

    route = sub.add_parser(
        "route",
        parents=[options],
        help="which workers can run a model, and why not",
        formatter_class=HelpFormatter,
        description=(
            "Ask the catalog which healthy workers can run MODEL (FindWorkers), best first\n"
            "(model already loaded, then the faster engine, then free memory, then load), and\n"
            "why every other worker cannot: one line per compatibility rule with its outcome and\n"
            "message. A worker with several engines (vLLM, then transformers) is matched on the\n"
            "first engine that can run the model; the others are listed with their reason."
        ),
        epilog=(
            "examples:\n  modelyard route tiny-llama\n  modelyard route tiny-llama --role training --json\n"
            "  modelyard route tiny-llama --worker inference-host-50053 --dry-run"
        ),
    )
    route.add_argument("model", metavar="MODEL", help="model id or models/ID")
    route.add_argument(
        "--role",
        choices=sorted(ROLES),
        default="inference",
        help="role the worker must have (default inference)",
    )
    route.add_argument(
        "--worker",
        metavar="WORKER",
        default="",
        help="check MODEL against this one worker (CheckCompatibility) instead of ranking all",
    )
    route.add_argument(
        "--dry-run",
        action="store_true",
        help="with --worker: the worker's engines first validate MODEL without loading weights",
    )
    route.set_defaults(func=route_model)


def list_workers(args: argparse.Namespace) -> int:
    """`workers list`."""
    with catalog_client(args) as client:
        workers = list(client.list_workers(filter=args.filter))
    if args.json:
        print_json(pb.ListWorkersResponse(workers=workers))
    elif not workers:
        print("no workers" + (f" match {args.filter}" if args.filter else " are registered"))
    else:
        print(table(WORKER_HEADERS, worker_rows(workers)))
    return 0


def show_worker(args: argparse.Namespace) -> int:
    """`workers show`."""
    with catalog_client(args) as client:
        worker = client.get_worker(args.worker)
    if args.json:
        print_json(pb.GetWorkerResponse(worker=worker))
    else:
        print(worker_block(worker))
    return 0


def route_model(args: argparse.Namespace) -> int:
    """`route`: the FindWorkers answer; exit 1 when no worker matches."""
    role = ROLES[args.role]
    if args.dry_run and not args.worker:
        raise SystemExit("modelyard route: --dry-run needs --worker (the worker that runs the dry run)")
    if args.worker:
        with catalog_client(args) as client:
            report = client.check_compatibility(args.model, worker=args.worker, dry_run=args.dry_run)
            match = pb.WorkerMatch(worker=client.get_worker(args.worker), report=report)
        if args.json:
            print_json(pb.CheckCompatibilityResponse(report=report))
        else:
            print("\n".join(report_lines(match, "")))
        return 1 if report.verdict == worker_pb2.VERDICT_INCOMPATIBLE else 0
    with catalog_client(args) as client:
        response = client.find_workers(args.model, role)
    if args.json:
        print_json(response)
    else:
        print(route_text(response, model_name(args.model), role_label(role)))
    return 0 if response.matches else 1
