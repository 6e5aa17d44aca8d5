"""`modelyard models ...`: import, list, show, validate, delete, lineage, types (merge and export
are in `artifacts`)."""

from __future__ import annotations

import argparse
import os
import threading
import time
from itertools import islice

import grpc

from clients.catalog import CatalogClient, model_name
from clients.commands import artifacts
from clients.commands.common import (
    CATALOG,
    HelpFormatter,
    Subparsers,
    catalog_client,
    label,
    local_or_as_is,
    options_parser,
    parse_labels,
)
from clients.commands.views import (
    MODEL_HEADERS,
    detect_text,
    lineage_text,
    model_block,
    model_rows,
    state_label,
    validation_text,
)
from clients.errors import ModelyardRpcError
from clients.output import StatusLine, duration_text, print_json, table
from modelyard.catalog.v1 import catalog_service_pb2 as pb
from modelyard.catalog.v1 import model_pb2

EXIT_OK = 0
EXIT_INVALID = 1

TERMINAL = (model_pb2.MODEL_STATE_READY, model_pb2.MODEL_STATE_FAILED)


def register(sub: Subparsers) -> None:
    """Add `models` and its sub-commands."""
    options = options_parser(CATALOG)
    models = sub.add_parser(
        "models",
        help="import, list and inspect catalog models",
        description="Import models into the catalog and inspect them.",
        formatter_class=HelpFormatter,
    )
    commands = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")

    imp = commands.add_parser(
        "import",
        parents=[options],
        help="import a folder, a weights file or a hub id",
        formatter_class=HelpFormatter,
        description=(
            "Import a model into the catalog: its kind and typed config are detected from the files,\n"
            "every file is hashed, and the entry goes IMPORTING -> VALIDATING -> READY (shown on\n"
            "stderr while it runs). SOURCE is a local folder, a .safetensors/.gguf file, or a\n"
            "Hugging Face hub id org/name[@revision] (found in the HF cache first)."
        ),
        epilog=(
            "examples:\n"
            "  modelyard models import ./tiny-llama --name tiny-llama --tag demo\n"
            "  modelyard models import Qwen/Qwen2.5-0.5B-Instruct --allow-download\n"
            "  modelyard models import ./adapter --parent tiny-llama --json"
        ),
    )
    imp.add_argument("source", metavar="SOURCE", help="folder, .safetensors/.gguf file, or hub id")
    imp.add_argument("--name", default="", help="id of the new model (default: derived from the source)")
    imp.add_argument("--display-name", default="", help="human-readable name")
    imp.add_argument("--description", default="", help="description")
    imp.add_argument("--tag", action="append", default=[], help="tag to set (repeatable)")
    imp.add_argument("--label", action="append", default=[], type=label, help="KEY=VALUE label (repeatable)")
    imp.add_argument("--parent", default="", help="parent model (detected for adapters when omitted)")
    imp.add_argument(
        "--allow-download", action="store_true", help="let the catalog download from the hub if not cached"
    )
    imp.set_defaults(func=import_model)

    lst = commands.add_parser(
        "list",
        parents=[options],
        help="list models",
        formatter_class=HelpFormatter,
        description="List catalog models, optionally filtered (AIP-160 subset).",
        epilog=(
            "filter fields: kind, model_type, architecture, state, tag, labels.KEY, parent, name\n"
            "(a trailing * matches a prefix), base_model, weight_format; terms joined by AND.\n\n"
            "examples:\n"
            '  modelyard models list --filter \'kind = "LLM" AND model_type = "llama"\'\n'
            "  modelyard models list --filter 'name = \"tiny-*\"' --json"
        ),
    )
    lst.add_argument("--filter", default="", help="AIP-160 filter")
    lst.add_argument("--page-size", type=int, default=100, help="models fetched per call (default 100)")
    lst.add_argument("--limit", type=int, default=None, help="show at most this many models")
    lst.set_defaults(func=list_models)

    show = commands.add_parser(
        "show",
        parents=[options],
        help="show one model",
        description="Show a model: state, source, typed config, files.",
    )
    show.add_argument("model", metavar="MODEL", help="model id or models/ID")
    show.set_defaults(func=show_model)

    validate = commands.add_parser(
        "validate",
        parents=[options],
        help="check a model's files and config",
        description="Validate a model's files and config; exits 1 when a check fails.",
    )
    validate.add_argument("model", metavar="MODEL", help="model id or models/ID")
    validate.add_argument(
        "--deep", action="store_true", help="also load the model and run one forward pass (slow)"
    )
    validate.set_defaults(func=validate_model)

    delete = commands.add_parser(
        "delete",
        parents=[options],
        help="delete a model",
        description="Delete a model; with --force also the models that descend from it.",
    )
    delete.add_argument("model", metavar="MODEL", help="model id or models/ID")
    delete.add_argument("--force", action="store_true", help="also delete fine-tunes and adapters of it")
    delete.add_argument("--etag", default="", help="only delete if the entry still has this etag")
    delete.set_defaults(func=delete_model)

    lineage = commands.add_parser(
        "lineage",
        parents=[options],
        help="show ancestors and descendants",
        description="Show a model's ancestors (root first) and its descendants as a tree.",
    )
    lineage.add_argument("model", metavar="MODEL", help="model id or models/ID")
    lineage.set_defaults(func=model_lineage)

    types = commands.add_parser(
        "types",
        parents=[options],
        help="detect the model type of a model or path",
        description=(
            "Detect the transformers model_type of a catalog model or of a folder/file\n"
            "(within the catalog's allowed roots), with the types that share its config class."
        ),
        formatter_class=HelpFormatter,
    )
    target = types.add_mutually_exclusive_group(required=True)
    target.add_argument("model", metavar="MODEL", nargs="?", help="model id or models/ID")
    target.add_argument("--path", help="a local folder or file instead of a catalog model")
    types.set_defaults(func=detect_types)

    artifacts.register(commands)  # merge, export: on a trainer


# ---- import ---------------------------------------------------------------------------------------


class ImportWatcher:
    """Follows a running import's state changes with WatchModel, in a background thread.

    With a requested id the entry is watched by name (NOT_FOUND is retried
    until the entry appears). Without one, the new IMPORTING entry of this
    source is looked up with ListModels first. An entry already finished at
    the first look (the id is taken, or the import was too quick to watch) is
    not shown: the import's own answer says what happened.
    """

    def __init__(self, client: CatalogClient, status: StatusLine, source: str, name: str) -> None:
        self.client = client
        self.status = status
        self.source = source
        self.name = model_name(name) if name else ""
        self.text = f"importing {source}"
        self.done = threading.Event()
        self.attempted = threading.Event()
        """Set once the entry was looked at a first time."""
        self._thread = threading.Thread(target=self._run, name="import-watch", daemon=True)

    def start(self) -> None:
        """Start following."""
        self._thread.start()

    def stop(self) -> None:
        """Stop following (the thread ends on its own at the terminal state)."""
        self.done.set()
        self._thread.join(timeout=2.0)

    def _show(self, text: str) -> None:
        self.text = text
        self.status.update(text)

    def _run(self) -> None:
        try:
            while not self.done.is_set():
                if not self.name:
                    self.name = self._discover()
                if self.name and self._watch():
                    return
                self.done.wait(0.2)
        except ModelyardRpcError:
            return  # progress display only: the import's own answer reports errors

    def _discover(self) -> str:
        try:
            page = self.client.list_models_page(filter='state = "IMPORTING"', page_size=100)
        except ModelyardRpcError as error:
            if error.code == grpc.StatusCode.INVALID_ARGUMENT:
                self.done.set()  # this catalog cannot filter by state: keep the plain spinner
            return ""
        real = os.path.realpath(self.source) if os.path.exists(self.source) else ""
        repo = self.source.split("@", 1)[0]
        for model in page.models:
            paths = {model.local_path, model.source.local.path}
            if (real and real in paths) or model.source.hugging_face.repo_id == repo:
                return model.name
        return ""

    def _watch(self) -> bool:
        """Follow the entry; True once it reached a terminal state (or vanished)."""
        first_look = not self.attempted.is_set()
        try:
            for index, change in enumerate(self.client.watch_model(self.name)):
                finished = change.deleted or change.model.state in TERMINAL
                if first_look and index == 0 and finished:
                    return True
                self._show(f"{self.name}: {'deleted' if change.deleted else state_label(change.model)}")
                if finished or self.done.is_set():
                    return True
        except ModelyardRpcError as error:
            if error.code != grpc.StatusCode.NOT_FOUND:
                raise
        finally:
            self.attempted.set()
        return False


def import_model(args: argparse.Namespace) -> int:
    """`models import`."""
    source = local_or_as_is(args.source)
    started = time.monotonic()
    status = StatusLine()
    with catalog_client(args) as client:
        watcher = ImportWatcher(client, status, source, args.name)
        result: dict[str, object] = {}

        def run_import() -> None:
            try:
                result["model"] = client.import_model(
                    source,
                    model_id=args.name,
                    display_name=args.display_name,
                    description=args.description,
                    tags=args.tag,
                    labels=parse_labels(args.label),
                    parent=args.parent,
                    allow_download=args.allow_download,
                    timeout=args.timeout or 3600.0,
                )
            except BaseException as error:  # handed to the main thread
                result["error"] = error

        importer = threading.Thread(target=run_import, name="import", daemon=True)
        watcher.start()
        importer.start()
        while importer.is_alive():
            importer.join(timeout=0.1 if status.tty else None)
            if status.tty and importer.is_alive():
                status.update(f"{watcher.text} ({duration_text(time.monotonic() - started)})")
        watcher.stop()
        status.close()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    model = result["model"]
    assert isinstance(model, model_pb2.Model)
    if args.json:
        print_json(pb.ImportModelResponse(model=model))
        return EXIT_OK
    print(f"imported {model.name} in {duration_text(time.monotonic() - started)}\n")
    print(model_block(model, files=False))
    return EXIT_OK


# ---- the rest -------------------------------------------------------------------------------------


def list_models(args: argparse.Namespace) -> int:
    """`models list`."""
    with catalog_client(args) as client:
        models = list(islice(client.list_models(filter=args.filter, page_size=args.page_size), args.limit))
    if args.json:
        print_json(pb.ListModelsResponse(models=models))
    elif not models:
        print("no models" + (f" match {args.filter}" if args.filter else " in the catalog"))
    else:
        print(table(MODEL_HEADERS, model_rows(models)))
    return EXIT_OK


def show_model(args: argparse.Namespace) -> int:
    """`models show`."""
    with catalog_client(args) as client:
        model = client.get_model(args.model)
    if args.json:
        print_json(pb.GetModelResponse(model=model))
    else:
        print(model_block(model))
    return EXIT_OK


def validate_model(args: argparse.Namespace) -> int:
    """`models validate`: exit 1 when invalid."""
    with catalog_client(args) as client:
        response = client.validate_model(args.model, deep=args.deep)
    if args.json:
        print_json(response)
    else:
        print(validation_text(response, model_name(args.model)))
    return EXIT_OK if response.valid else EXIT_INVALID


def delete_model(args: argparse.Namespace) -> int:
    """`models delete`."""
    with catalog_client(args) as client:
        deleted = client.delete_model(args.model, force=args.force, etag=args.etag)
    if args.json:
        print_json(pb.DeleteModelResponse(deleted=deleted))
    else:
        for name in deleted:
            print(f"deleted {name}")
    return EXIT_OK


def model_lineage(args: argparse.Namespace) -> int:
    """`models lineage`."""
    with catalog_client(args) as client:
        response = client.get_lineage(args.model)
    if args.json:
        print_json(response)
    else:
        print(lineage_text(response))
    return EXIT_OK


def detect_types(args: argparse.Namespace) -> int:
    """`models types`."""
    with catalog_client(args) as client:
        if args.path:
            response = client.detect_model_type(path=local_or_as_is(args.path))
        else:
            response = client.detect_model_type(model=args.model)
    if args.json:
        print_json(response)
    else:
        print(detect_text(response))
    return EXIT_OK
