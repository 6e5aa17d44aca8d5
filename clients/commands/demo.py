"""`modelyard demo`: the whole loop on one machine, narrated step by step.

The demo starts the suite (the catalog, trainer and inference services as three
child processes on this machine, SQLite, a temporary data folder), or uses a
running one when all three addresses are given. It then builds a tiny Llama with
`tinymodels` (or imports `--model`, a hub id or folder), imports it into the
catalog, trains a LoRA adapter on the dataset bundled with the CLI
(`clients/demo_data/chat.jsonl`: plain questions answered in pirate speak),
lets the catalog route the adapter to the inference worker, loads base and
adapter in vLLM, and prints the base's and the adapter's answers side by side.

Each step says what it does, the command a user would type for it, and how long
it took. Child processes are stopped on every way out (success, error, Ctrl-C,
SIGTERM); with `--keep` a successful demo leaves the suite running instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import IO, Any

import grpc

from clients.catalog import CatalogClient, model_name
from clients.commands.common import (
    CATALOG,
    INFERENCE,
    TRAINER,
    HelpFormatter,
    Subparsers,
    address,
    address_given,
    client_kwargs,
    options_parser,
)
from clients.commands.demo_gguf import DEFAULT_TYPE as DEFAULT_GGUF_TYPE
from clients.commands.demo_gguf import gguf_step
from clients.commands.plot import load_recorded
from clients.commands.training import follow
from clients.errors import ModelyardRpcError
from clients.inference import InferenceClient
from clients.output import duration_text, human_count
from clients.routing import NoCompatibleWorker
from clients.trainer import TrainerClient
from modelyard.catalog.v1 import model_pb2
from modelyard.inference.v1.inference_service_pb2 import LoadedModel
from modelyard.trainer.v1 import trainer_service_pb2 as trainer_pb

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

SERVICES = ("catalog", "trainer", "inference")
DEFAULT_PORTS = {"catalog": 50051, "trainer": 50052, "inference": 50053}
MODULES = {"catalog": "catalog_service", "trainer": "trainer_service", "inference": "inference_service"}
DATASET = "chat.jsonl"
TINY_MODEL_DIR = "tiny-llama"
ADAPTER_SUFFIX = "-pirate"
PROMPTS = ("What is the capital of France?", "What should I eat for breakfast?")
START_TIMEOUT = 300.0
ROUTE_TIMEOUT = 60.0
GENERATION_TIMEOUT = 300.0
MIB = 1024 * 1024


@dataclass(frozen=True)
class Recipe:
    """How the demo trains and serves a model: the tiny model and a real one differ."""

    max_steps: int
    learning_rate: float
    max_tokens: int
    kv_cache_bytes: int
    max_model_len: int
    """Longest context to serve (asked for in LoadModel, capped by the model's); 0: the model's."""
    dtype: str


TINY = Recipe(
    max_steps=30, learning_rate=5e-3, max_tokens=24, kv_cache_bytes=64 * MIB, max_model_len=0, dtype="float32"
)
"""A 140 K-parameter Llama: a high learning rate so 30 steps visibly change its (random) output."""

REAL = Recipe(
    max_steps=30,
    learning_rate=1e-3,
    max_tokens=48,
    kv_cache_bytes=256 * MIB,
    max_model_len=2048,
    dtype="auto",
)
"""A real model such as Qwen/Qwen2.5-0.5B-Instruct: 30 steps (4 epochs of the 30 rows) teach it the voice."""


class DemoFailed(Exception):
    """A step of the demo could not be done; the message says why and what to look at."""


class SuiteUnavailable(DemoFailed):
    """The running suite the demo was pointed at does not answer."""


# ---- command line ---------------------------------------------------------------------------------


def register(sub: Subparsers) -> None:
    """Add `demo`."""
    options = options_parser(CATALOG, TRAINER, INFERENCE)
    for action in options._actions:
        if action.dest == "json":
            action.help = (
                "narrate on stderr and print a JSON summary (models, job, worker, answers) on stdout"
            )
    demo = sub.add_parser(
        "demo",
        parents=[options],
        help="run the whole loop on this machine: import, fine-tune, serve, compare",
        formatter_class=HelpFormatter,
        description=(
            "Show the whole Modelyard loop, narrating each step with the command a user would type:\n"
            "  1. start the suite: catalog, trainer and inference as three processes on this machine\n"
            "     (SQLite, a temporary folder, ports 50051-50053 when free), or use a running suite\n"
            "     when --catalog, --trainer and --inference (or $MODELYARD_*_ADDRESS) are all given;\n"
            "  2. build a tiny Llama with random weights (no download), or take --model;\n"
            "  3. import it into the catalog (detected config, hashed files);\n"
            "  4. train a LoRA adapter on a small bundled dataset (pirate-speak answers), which\n"
            "     registers the adapter in the catalog as a child of the model;\n"
            "  5. route the adapter to the inference worker and load model and adapter in vLLM;\n"
            "  6. print the model's and the adapter's answers to the same prompts side by side;\n"
            "  7. with --gguf: merge the adapter, export it to GGUF and chat with it on llama.cpp.\n"
            "The tiny model runs on any CPU in a few minutes; its text is gibberish, but every step is\n"
            "real. Child processes are stopped at the end, on errors and on Ctrl-C. Exit code 0 when\n"
            "every step worked, 1 when one failed, 3 when a given suite does not answer."
        ),
        epilog=(
            "examples:\n"
            "  modelyard demo\n"
            "  modelyard demo --model Qwen/Qwen2.5-0.5B-Instruct      # a real model (hub or HF cache)\n"
            "  modelyard demo --keep                                   # leave the suite running after\n"
            "  modelyard demo --gguf q4_k_m                            # and take it to llama.cpp\n"
            "  modelyard demo --catalog localhost:50051 --trainer localhost:50052 \\\n"
            "      --inference localhost:50053 --data-dir ~/.modelyard/demo   # a running suite\n\n"
            "With a running suite, --data-dir (default $MODELYARD_DATA_DIR/demo, i.e. ~/.modelyard/demo)\n"
            "must be readable by the services and inside the catalog's allowed roots and the trainer's\n"
            "dataset roots, as the default data folder of `modelyard serve all` is."
        ),
    )
    demo.add_argument(
        "--model",
        metavar="HUB_ID_OR_FOLDER",
        default="",
        help="a hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct: taken from the HF cache, else downloaded) "
        "or a model folder, instead of the tiny model",
    )
    demo.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder for the suite's databases, the model, the dataset and the logs (kept); "
        "default: a temporary folder, removed at the end",
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="after a successful demo, leave the suite running and its folder in place (stop it with "
        "the kill command printed at the end)",
    )
    demo.add_argument("--steps", type=int, default=None, help="training steps (default 30)")
    demo.add_argument(
        "--engine",
        choices=["vllm", "transformers", "auto"],
        default="vllm",
        help="inference engine of the suite the demo starts (default vllm)",
    )
    demo.add_argument(
        "--gguf",
        nargs="?",
        const=DEFAULT_GGUF_TYPE,
        default=None,
        metavar="TYPE",
        help="then merge the adapter, export it to GGUF (llama.cpp file type, default "
        f"{DEFAULT_GGUF_TYPE}) and chat with it on llama.cpp; the suite the demo starts then uses "
        "--engine auto (vLLM, transformers and llama.cpp)",
    )
    demo.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="a prompt to compare base and adapter on (repeatable; default: two built-in questions)",
    )
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`demo`: exit 0 when every step worked."""
    given = [s for s in (CATALOG, TRAINER, INFERENCE) if address_given(args, s)]
    if given and len(given) != 3:
        missing = ", ".join(f"--{s.flag}" for s in (CATALOG, TRAINER, INFERENCE) if s not in given)
        print(
            f"modelyard demo: error: to use a running suite give all three addresses ({missing} missing, "
            "flag or $MODELYARD_*_ADDRESS); give none to start a suite",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.steps is not None and args.steps < 1:
        print("modelyard demo: error: --steps must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    if args.gguf:
        args.engine = "auto"  # the GGUF file needs the suite's llama.cpp engine
    out = sys.stderr if args.json else sys.stdout
    demo = Demo(args, Narrator(out), use_running=bool(given))
    with _sigterm_as_exit():
        return demo.run()


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM ends the demo like Ctrl-C does: through the `finally` blocks that stop the suite."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- narration ------------------------------------------------------------------------------------


class Narrator:
    """Prints numbered steps: what each does, the command a user would type, results, timing."""

    INDENT = "      "

    def __init__(self, out: IO[str], width: int | None = None) -> None:
        self.out = out
        self.width = width or min(shutil.get_terminal_size((100, 24)).columns, 110)
        self.total = 0
        self.index = 0

    def print(self, text: str = "") -> None:
        """A line as is."""
        print(text, file=self.out, flush=True)

    def say(self, text: str) -> None:
        """A line (wrapped) inside the current step."""
        for line in textwrap.wrap(text, self.width - len(self.INDENT)) or [""]:
            self.print(self.INDENT + line)

    def command(self, text: str) -> None:
        """A command the user would type."""
        self.print(f"{self.INDENT}$ {text}")

    @contextlib.contextmanager
    def step(self, title: str, what: str, commands: Sequence[str] = ()) -> Iterator[None]:
        """One numbered step: heading, explanation, commands, then its duration (or failure)."""
        self.index += 1
        self.print()
        self.print(f"[{self.index}/{self.total}] {title}")
        self.say(what)
        for text in commands:
            self.command(text)
        started = time.monotonic()
        try:
            yield
        except BaseException:
            self.print(f"{self.INDENT}failed after {duration_text(time.monotonic() - started)}")
            raise
        self.print(f"{self.INDENT}done in {duration_text(time.monotonic() - started)}")


# ---- the suite --------------------------------------------------------------------------------------


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def choose_ports() -> dict[str, int]:
    """50051-50053 when all are free (the CLI's defaults then reach the suite), else free ports."""
    if all(_port_free(port) for port in DEFAULT_PORTS.values()):
        return dict(DEFAULT_PORTS)
    sockets = []
    try:
        for _ in SERVICES:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return {name: int(sock.getsockname()[1]) for name, sock in zip(SERVICES, sockets, strict=True)}
    finally:
        for sock in sockets:
            sock.close()


def _die_with_parent() -> None:
    """In a child (Linux): get SIGTERM when the demo dies, even by SIGKILL."""
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(pr_set_pdeathsig, signal.SIGTERM)


def _healthy(target: str) -> bool:
    from server_kit.healthcheck import check

    return check(target, timeout=1.0)


@dataclass
class Child:
    """One service the demo started."""

    name: str
    address: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the service's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Suite:
    """The three services: started here as child processes, or a running suite's addresses."""

    addresses: dict[str, str]
    children: list[Child] = field(default_factory=list)

    @property
    def started(self) -> bool:
        """Whether the demo started the services (and so stops them)."""
        return bool(self.children)

    @classmethod
    def start(
        cls,
        workspace: Path,
        *,
        recipe: Recipe,
        engine: str,
        extra_roots: Sequence[Path] = (),
        allow_download: bool = False,
        detach: bool = False,
    ) -> Suite:
        """Start catalog, trainer and inference as `python -m <service>` processes on 127.0.0.1.

        Their data folders and logs are under `workspace`. `detach` starts them in
        their own session and without the die-with-parent signal, so they outlive
        the demo (`--keep`).
        """
        from catalog_service.settings import default_hf_cache

        ports = choose_ports()
        addresses = {name: f"127.0.0.1:{ports[name]}" for name in SERVICES}
        logs = workspace / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        common = {
            "PYTHONUNBUFFERED": "1",
            "MODELYARD_DRAIN_SECONDS": "0",
            "MODELYARD_GRACE_SECONDS": "5",
            "MODELYARD_LOG_FORMAT": "text",
        }
        roots = [workspace, default_hf_cache(), *extra_roots]
        env = {
            "catalog": {
                "MODELYARD_CATALOG_ALLOWED_ROOTS": os.pathsep.join(str(root) for root in roots),
                "MODELYARD_CATALOG_ALLOW_DOWNLOAD": "true" if allow_download else "false",
            },
            "trainer": {
                "MODELYARD_CATALOG_ADDRESS": addresses["catalog"],
                "MODELYARD_TRAINER_ADVERTISE_ADDRESS": addresses["trainer"],
                "MODELYARD_TRAINER_DATASET_ROOTS": str(workspace),
                "MODELYARD_TRAINER_POLL_SECONDS": "0.5",
            },
            "inference": {
                "MODELYARD_CATALOG_ADDRESS": addresses["catalog"],
                "MODELYARD_INFERENCE_ADVERTISE_ADDRESS": addresses["inference"],
                "MODELYARD_INFERENCE_ENGINE": engine,
                "MODELYARD_INFERENCE_KV_CACHE_BYTES": str(recipe.kv_cache_bytes),
                "MODELYARD_INFERENCE_DTYPE": recipe.dtype,
                "MODELYARD_INFERENCE_ENFORCE_EAGER": "true",
                "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
            },
        }
        suite = cls(addresses)
        try:
            for name in SERVICES:
                log_path = logs / f"{name}.log"
                with log_path.open("wb") as log_file:
                    process = subprocess.Popen(
                        [
                            sys.executable, "-m", MODULES[name],
                            "--listen", addresses[name], "--data-dir", str(workspace / name),
                        ],
                        env={**os.environ, **common, **env[name]},
                        cwd=workspace,
                        stdin=subprocess.DEVNULL,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # Ctrl-C reaches the demo, which stops them in order
                        preexec_fn=None if detach or sys.platform != "linux" else _die_with_parent,
                    )  # fmt: skip
                suite.children.append(Child(name, addresses[name], process, log_path))
        except BaseException:
            suite.stop()
            raise
        return suite

    def wait_serving(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until every service reports SERVING; DemoFailed when one exits or is too slow."""
        waiting = {child.name: child for child in self.children}
        deadline = time.monotonic() + timeout
        while waiting:
            for name, child in list(waiting.items()):
                if child.process.poll() is not None:
                    raise DemoFailed(
                        f"the {name} service exited with code {child.process.returncode} while starting; "
                        f"its log ({child.log_path}) ends with:\n{child.log_tail()}"
                    )
                if _healthy(child.address):
                    del waiting[name]
            if not waiting:
                return
            if time.monotonic() > deadline:
                names = ", ".join(sorted(waiting))
                raise DemoFailed(f"{names} did not start within {timeout:.0f} s; see the logs under "
                                 f"{self.children[0].log_path.parent}")  # fmt: skip
            time.sleep(0.2)

    def exited(self) -> list[Child]:
        """The started services that are no longer running."""
        return [child for child in self.children if child.process.poll() is not None]

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every started service, then wait; SIGKILL what is still running at `timeout`."""
        for child in self.children:
            if child.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.terminate()
        deadline = time.monotonic() + timeout
        for child in self.children:
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()


def check_running(addresses: dict[str, str]) -> None:
    """DemoFailed unless every given service answers its health check."""
    down = [f"{name} at {target}" for name, target in addresses.items() if not _healthy(target)]
    if down:
        raise SuiteUnavailable(
            "no healthy service at " + ", ".join(down) + "; start the suite (`modelyard serve all`) "
            "or give no addresses to let the demo start one"
        )


# ---- the demo -------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """The base's and the adapter's answers to one prompt."""

    prompt: str
    base: str
    adapter: str


@dataclass
class Outcome:
    """What the demo did, for the closing summary and `--json`."""

    addresses: dict[str, str] = field(default_factory=dict)
    workspace: str = ""
    base_model: str = ""
    adapter: str = ""
    training_job: str = ""
    worker: str = ""
    worker_address: str = ""
    comparisons: list[Comparison] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    gguf_model: str = ""

    def as_json(self) -> dict[str, Any]:
        """The JSON `--json` prints."""
        return {
            "addresses": self.addresses,
            "dataDir": self.workspace,
            "baseModel": self.base_model,
            "adapter": self.adapter,
            "trainingJob": self.training_job,
            "worker": self.worker,
            "workerAddress": self.worker_address,
            "comparisons": [
                {"prompt": c.prompt, "base": c.base, "adapter": c.adapter} for c in self.comparisons
            ],
            "seconds": {k: round(v, 2) for k, v in self.timings.items()},
        } | ({"ggufModel": self.gguf_model} if self.gguf_model else {})


def printable(text: str) -> str:
    """`text` with control characters shown as `·` (a random model emits any byte)."""
    return "".join(c if c.isprintable() or c == "\n" else "·" for c in text)


def side_by_side(left: str, right: str, width: int) -> list[str]:
    """Two texts as two wrapped columns `left | right`, `width` characters in all."""
    column = max(20, (width - 3) // 2)

    def wrap(text: str) -> list[str]:
        lines: list[str] = []
        for paragraph in printable(text).splitlines() or [""]:
            lines.extend(textwrap.wrap(paragraph, column, replace_whitespace=False) or [""])
        return lines

    a, b = wrap(left), wrap(right)
    rows = max(len(a), len(b))
    a += [""] * (rows - len(a))
    b += [""] * (rows - len(b))
    return [f"{x.ljust(column)} | {y}".rstrip() for x, y in zip(a, b, strict=True)]


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'" if any(c in text for c in " '\"?!$*&;") else text


class Demo:
    """Runs the steps; `run()` returns the exit code."""

    def __init__(self, args: argparse.Namespace, narrator: Narrator, *, use_running: bool) -> None:
        self.args = args
        self.narrator = narrator
        self.use_running = use_running
        self.hub_or_folder: str = args.model
        self.recipe = REAL if args.model else TINY
        self.steps = args.steps or self.recipe.max_steps
        self.prompts: list[str] = list(args.prompt or PROMPTS)
        self.outcome = Outcome()
        self.suite: Suite | None = None
        self.workspace: Path | None = None
        self.temporary = False

    # The commands a user would type, with the address flags a non-default suite needs.
    def _flags(self, *services: str) -> str:
        flags = []
        for name in services:
            target = self.outcome.addresses.get(name, "")
            if target and target.rsplit(":", 1)[-1] != str(DEFAULT_PORTS[name]):
                flags.append(f"--{name} {target}")
        return (" " + " ".join(flags)) if flags else ""

    def run(self) -> int:
        """All steps; the suite is stopped on every way out unless `--keep` succeeded."""
        narrator = self.narrator
        narrator.total = (6 if not self.hub_or_folder else 5) + (1 if self.args.gguf else 0)
        what = self.hub_or_folder or "a tiny Llama built on the spot"
        engine = "the suite's engine" if self.use_running else self.args.engine
        narrator.print(
            f"Modelyard demo: import {what}, fine-tune it with LoRA, serve model and adapter with "
            f"{engine}, and compare their answers."
        )
        started = time.monotonic()
        ending = "failed"
        try:
            self._steps()
            ending = "succeeded"
        except DemoFailed as error:
            narrator.print()
            print(f"modelyard demo: error: {error}", file=sys.stderr)
            self._report_exited()
            return EXIT_UNAVAILABLE if isinstance(error, SuiteUnavailable) else EXIT_FAILED
        except ModelyardRpcError:
            self._report_exited()
            raise
        except (KeyboardInterrupt, SystemExit):
            ending = "interrupted"
            print("modelyard demo: interrupted; stopping the suite", file=sys.stderr)
            raise
        finally:
            self._finish(ending)
        self.outcome.timings["total"] = time.monotonic() - started
        narrator.print()
        narrator.print(f"Demo finished in {duration_text(self.outcome.timings['total'])}.")
        self._closing_words()
        if self.args.json:
            print(json.dumps(self.outcome.as_json(), indent=2))
        return EXIT_OK

    def _steps(self) -> None:
        self._start_suite()
        kwargs = client_kwargs(self.args)
        assert self.workspace is not None
        with (
            CatalogClient(self.outcome.addresses["catalog"], **kwargs) as catalog,
            TrainerClient(self.outcome.addresses["trainer"], **kwargs) as trainer,
        ):
            source = self._model_source()
            base = self._import(catalog, source)
            adapter = self._train(catalog, trainer, base)
            with self._serve(catalog, base, adapter) as llm:
                self._compare(llm, base, adapter)
            if self.args.gguf:
                gguf_step(self, catalog, trainer, adapter)

    def _timed(self, key: str, since: float) -> float:
        elapsed = time.monotonic() - since
        self.outcome.timings[key] = elapsed
        return elapsed

    # ---- step 1: the suite

    def _start_suite(self) -> None:
        args = self.args
        started = time.monotonic()
        if self.use_running:
            addresses = {
                name: address(args, s)
                for name, s in zip(SERVICES, (CATALOG, TRAINER, INFERENCE), strict=True)
            }
            self.outcome.addresses = addresses
            self.workspace = (args.data_dir or _default_data_dir() / "demo").expanduser().resolve()
            self.outcome.workspace = str(self.workspace)
            with self.narrator.step(
                "Use the running suite",
                "The catalog, trainer and inference addresses were given, so the demo uses those "
                f"services. It keeps its files in {self.workspace}: the services must be able to read "
                "them there.",
                [f"modelyard workers list{self._flags('catalog')}"],
            ):
                check_running(addresses)
                self.workspace.mkdir(parents=True, exist_ok=True)
                for name in SERVICES:
                    self.narrator.say(f"{name:<9} {addresses[name]} SERVING")
            self._timed("suite", started)
            return

        if args.data_dir is not None:
            self.workspace = args.data_dir.expanduser().resolve()
            self.workspace.mkdir(parents=True, exist_ok=True)
        else:
            self.workspace = Path(tempfile.mkdtemp(prefix="modelyard-demo-")).resolve()
            self.temporary = True
        extra_roots = []
        if self.hub_or_folder and Path(self.hub_or_folder).expanduser().exists():
            extra_roots.append(Path(self.hub_or_folder).expanduser().resolve())
        with self.narrator.step(
            "Start the suite",
            "Runs the catalog (models and workers), the trainer (fine-tuning jobs) and the inference "
            f"service ({args.engine}) as three processes on this machine, with SQLite databases and "
            f"every file under {self.workspace}. The trainer and the inference worker register "
            "with the catalog.",
            ["modelyard serve all     # or one each: python -m catalog_service (trainer_service, ...)"],
        ):
            self.suite = Suite.start(
                self.workspace,
                recipe=self.recipe,
                engine=args.engine,
                extra_roots=extra_roots,
                allow_download=bool(self.hub_or_folder),
                detach=args.keep,
            )
            self.outcome.addresses = dict(self.suite.addresses)
            self.suite.wait_serving()
            for child in self.suite.children:
                self.narrator.say(
                    f"{child.name:<9} {child.address}  (pid {child.process.pid}, log {child.log_path})"
                )
        self._timed("suite", started)
        self.outcome.workspace = str(self.workspace)
        if self.outcome.addresses["catalog"] != f"127.0.0.1:{DEFAULT_PORTS['catalog']}":
            self.narrator.say(
                "The default ports were taken, so the commands below carry address flags (or export "
                "MODELYARD_CATALOG_ADDRESS and MODELYARD_TRAINER_ADDRESS)."
            )

    # ---- step 2: the model

    def _model_source(self) -> str:
        """The path or hub id to import: builds the tiny model unless `--model` names one."""
        assert self.workspace is not None
        if self.hub_or_folder:
            path = Path(self.hub_or_folder).expanduser()
            return str(path.resolve()) if path.exists() else self.hub_or_folder
        folder = self.workspace / "models" / TINY_MODEL_DIR
        started = time.monotonic()
        with self.narrator.step(
            "Build a tiny model",
            "Builds a real Llama architecture with random weights (2 layers, hidden size 64, "
            "context 256, float32) and a byte-level BPE tokenizer with a ChatML chat template. "
            "Nothing is downloaded; the text it writes is gibberish, but every step below is real.",
            [
                f"python -m tinymodels llm ./{TINY_MODEL_DIR} --arch llama --dtype float32"
                + (" --tokenizer-style llama" if self.args.gguf else "")
            ],
        ):
            style = "llama" if self.args.gguf else "byte_level"  # llama.cpp's converter reads "llama"
            built = (folder / "tokenizer.json").is_file() and (
                '"byte_fallback": true' in (folder / "tokenizer.json").read_text(encoding="utf-8")
            ) == bool(self.args.gguf)
            if built and any(folder.glob("*.safetensors")):
                self.narrator.say(f"reusing the model built earlier in {folder}")
            else:
                from transformers.utils import logging as transformers_logging

                from tinymodels.llm import build_llm

                transformers_logging.disable_progress_bar()  # no "Writing model shards" bar mid-story
                build_llm(folder, arch="llama", dtype="float32", tokenizer_style=style)
                self.narrator.say(f"built {folder}")
        self._timed("build", started)
        return str(folder)

    # ---- step 3: import

    def _import(self, catalog: CatalogClient, source: str) -> model_pb2.Model:
        hub = not Path(source).is_absolute()
        shown = source if hub else f"./{Path(source).name}" if not self.hub_or_folder else source
        started = time.monotonic()
        with self.narrator.step(
            "Import it into the catalog",
            (
                f"The catalog looks for {source} in the Hugging Face cache and downloads it when it is "
                "not there, then "
                if hub
                else "The catalog "
            )
            + "detects the model's kind and typed config from its files (config.json, tokenizer, "
            "safetensors headers), hashes every file, validates it and marks it READY.",
            [
                f"modelyard models import {shown}{' --allow-download' if hub else ''}"
                + self._flags("catalog"),
                f"modelyard models show MODEL{self._flags('catalog')}",
            ],
        ):
            model = catalog.import_model(source, allow_download=hub, timeout=3600.0)
            self.outcome.base_model = model.name
            llm = model.llm
            facts = [
                llm.architecture or "architecture unknown",
                f"{human_count(llm.parameter_count)} parameters" if llm.HasField("parameter_count") else "",
                f"context {llm.context_length}" if llm.HasField("context_length") else "",
                llm.dtype,
                "chat template" if llm.tokenizer.chat_template else "no chat template",
                f"{len(model.files)} files hashed",
            ]
            self.narrator.say(f"{model.name}: " + ", ".join(fact for fact in facts if fact))
            self.narrator.say(f"state {model_pb2.ModelState.Name(model.state).removeprefix('MODEL_STATE_')}")
        self._timed("import", started)
        return model

    # ---- step 4: train

    def _adapter_id(self, catalog: CatalogClient, base: model_pb2.Model) -> str:
        """`{base}-pirate`, or `-2`, `-3`, ... when taken; '' lets the trainer choose."""
        stem = base.name.removeprefix("models/")[: 63 - len(ADAPTER_SUFFIX) - 3].rstrip("-") + ADAPTER_SUFFIX
        for candidate in [stem, *(f"{stem}-{n}" for n in range(2, 20))]:
            try:
                catalog.get_model(candidate)
            except ModelyardRpcError as error:
                if error.code == grpc.StatusCode.NOT_FOUND:
                    return candidate
                raise
        return ""

    def _train(self, catalog: CatalogClient, trainer: TrainerClient, base: model_pb2.Model) -> str:
        assert self.workspace is not None
        dataset = self.workspace / "data" / DATASET
        dataset.parent.mkdir(parents=True, exist_ok=True)
        dataset.write_bytes(resources.files("clients.demo_data").joinpath(DATASET).read_bytes())
        base_id = base.name.removeprefix("models/")
        output_id = self._adapter_id(catalog, base)
        rows = sum(1 for line in dataset.read_text(encoding="utf-8").splitlines() if line.strip())
        started = time.monotonic()
        with self.narrator.step(
            "Fine-tune a LoRA adapter",
            f"The trainer checks the job (model, dataset rows against the chat template, "
            f"hyperparameters), then trains a rank-8 LoRA adapter for {self.steps} steps on {rows} "
            "conversations in which every answer is in pirate speak, in a worker process. When it "
            "ends, the trainer registers the adapter in the catalog as a child of the model.",
            [
                f"modelyard train {base_id} ./{DATASET} --method lora --max-steps {self.steps} "
                f"--learning-rate {self.recipe.learning_rate:g}"
                + (f" --output-name {output_id}" if output_id else "")
                + f" --watch{self._flags('trainer')}",
                f"modelyard models lineage {base_id}{self._flags('catalog')}",
            ],
        ):
            job = trainer.create_training_job(
                base.name,
                str(dataset),
                method=trainer_pb.TRAINING_METHOD_LORA,
                output_model_id=output_id,
                max_steps=self.steps,
                learning_rate=self.recipe.learning_rate,
                labels={"created-by": "modelyard-demo"},
            )
            self.outcome.training_job = job.name
            self.narrator.say(f"created {job.name}; following it (WatchTrainingJob)")
            final = follow(trainer, job.name, json_lines=False, quiet=True)
            if final.state != trainer_pb.TRAINING_JOB_STATE_SUCCEEDED:
                state = trainer_pb.TrainingJobState.Name(final.state).removeprefix("TRAINING_JOB_STATE_")
                raise DemoFailed(
                    f"{job.name} ended {state}: {final.error.reason} {final.error.message}".rstrip()
                    + f" (see `modelyard jobs show {job.name.removeprefix('trainingJobs/')}`)"
                )
            losses = load_recorded(job.name).loss
            if losses:
                first, last = min(losses), max(losses)
                self.narrator.say(
                    f"{final.progress.step} steps, training loss {losses[first]:.3f} (step {first}) -> "
                    f"{losses[last]:.3f} (step {last})"
                )
            lineage = catalog.get_lineage(final.output_model)
            parents = [model.name for model in lineage.ancestors]
            self.narrator.say(f"registered {final.output_model}, parent {' > '.join(parents) or '(none)'}")
        self.outcome.adapter = final.output_model
        self._timed("train", started)
        return final.output_model

    # ---- step 5: serve

    @contextlib.contextmanager
    def _serve(
        self, catalog: CatalogClient, base: model_pb2.Model, adapter: str
    ) -> Iterator[InferenceClient]:
        started = time.monotonic()
        adapter_id = adapter.removeprefix("models/")
        with self.narrator.step(
            "Serve the model and the adapter",
            "The catalog finds the healthy inference workers that can run the adapter and its base "
            "(FindWorkers: per-rule compatibility checks, ranked by loaded models and free memory). "
            "The worker loads the model into its engine and hot-loads the adapter by its catalog id.",
            [f"modelyard route {adapter_id}{self._flags('catalog')}"],
        ):
            llm = self._route(catalog, adapter)
            assert llm.worker is not None
            self.outcome.worker = llm.worker.name
            self.outcome.worker_address = llm.address
            engine = llm.worker.capabilities.engine
            self.narrator.say(f"{adapter} -> {llm.worker.name} at {llm.address} ({engine})")
            loaded_at = time.monotonic()
            context = base.llm.context_length if base.llm.HasField("context_length") else 0
            max_len = self.recipe.max_model_len
            if max_len and context:
                max_len = min(max_len, context)
            loaded = self._load(llm, base.name, max_len or None)
            context_text = f", context {loaded.max_model_len}" if loaded is not None else ""
            self.narrator.say(
                f"loaded {base.name} in {duration_text(time.monotonic() - loaded_at)} "
                f"({engine}{context_text})"
            )
            loaded_at = time.monotonic()
            self._load(llm, adapter)
            self.narrator.say(f"hot-loaded {adapter} in {duration_text(time.monotonic() - loaded_at)}")
        self._timed("serve", started)
        try:
            yield llm
        finally:
            llm.close()

    def _route(self, catalog: CatalogClient, adapter: str) -> InferenceClient:
        """The best worker for `adapter`, waiting a little for a worker that just started to register."""
        deadline = time.monotonic() + ROUTE_TIMEOUT
        kwargs = client_kwargs(self.args)
        while True:
            try:
                return InferenceClient.for_model(adapter, catalog=catalog, **kwargs)
            except NoCompatibleWorker as error:
                if time.monotonic() > deadline or error.rejected:
                    raise  # waiting helps only while no inference worker has registered yet
            time.sleep(0.5)

    @staticmethod
    def _load(llm: InferenceClient, model: str, max_model_len: int | None = None) -> LoadedModel | None:
        """LoadModel; a model loaded already (a running suite) is fine."""
        try:
            return llm.load_model(model, max_model_len=max_model_len)
        except ModelyardRpcError as error:
            if error.code != grpc.StatusCode.ALREADY_EXISTS:
                raise
            return next((m for m in llm.list_loaded_models() if m.model == model_name(model)), None)

    # ---- step 6: compare

    def _compare(self, llm: InferenceClient, base: model_pb2.Model, adapter: str) -> None:
        started = time.monotonic()
        base_id, adapter_id = base.name.removeprefix("models/"), adapter.removeprefix("models/")
        prompt = _shell_quote(self.prompts[0])
        with self.narrator.step(
            "Compare the model and the adapter",
            "The same chat (rendered with the model's chat template), greedy decoding (temperature 0), "
            "once with the model alone and once with the adapter applied by the inference worker.",
            [
                f"modelyard chat {base_id}{self._flags('catalog')}",
                f"modelyard generate {base_id} {prompt} --adapter {adapter_id} --temperature 0"
                f"{self._flags('catalog')}",
            ],
        ):
            width = self.narrator.width - len(Narrator.INDENT)
            for text in self.prompts:
                messages = [{"role": "user", "content": text}]
                options: dict[str, Any] = {
                    "max_tokens": self.recipe.max_tokens,
                    "temperature": 0.0,
                    "timeout": GENERATION_TIMEOUT,
                }
                plain = llm.chat(base.name, messages, **options).choices[0].message.content
                tuned = llm.chat(base.name, messages, adapter=adapter, **options).choices[0].message.content
                self.outcome.comparisons.append(Comparison(text, plain, tuned))
                self.narrator.print()
                self.narrator.print(f"{Narrator.INDENT}user: {text}")
                for line in side_by_side(f"[{base.name}]", f"[{adapter}]", width):
                    self.narrator.print(Narrator.INDENT + line)
                for line in side_by_side(plain, tuned, width):
                    self.narrator.print(Narrator.INDENT + line)
            self.narrator.print()
            if all(c.base == c.adapter for c in self.outcome.comparisons):
                self.narrator.say(
                    "The answers are the same: the adapter changed too little; try more --steps."
                )
        self._timed("compare", started)

    # ---- the end

    def _report_exited(self) -> None:
        if self.suite is None:
            return
        for child in self.suite.exited():
            print(
                f"the {child.name} service exited with code {child.process.returncode}; "
                f"its log ({child.log_path}) ends with:\n{child.log_tail()}",
                file=sys.stderr,
            )

    def _finish(self, ending: str) -> None:
        """Stop the suite (unless `--keep` and it succeeded); remove a temporary folder.

        `ending` is `succeeded`, `failed` or `interrupted`. A temporary folder stays
        after a failure (for its logs) and after a success with `--keep`.
        """
        succeeded = ending == "succeeded"
        if self.suite is not None and not (succeeded and self.args.keep):
            self.suite.stop()
        if self.workspace is None or not self.temporary:
            return
        if ending == "failed":
            print(f"modelyard demo: kept {self.workspace} for its logs", file=sys.stderr)
        elif not (succeeded and self.args.keep):
            shutil.rmtree(self.workspace, ignore_errors=True)

    def _closing_words(self) -> None:
        narrator = self.narrator
        base_id = self.outcome.base_model.removeprefix("models/")
        adapter_id = self.outcome.adapter.removeprefix("models/")
        if self.suite is None:
            narrator.print(f"{self.outcome.base_model} and {self.outcome.adapter} stay in the catalog.")
            return
        if not self.args.keep:
            where = "its folder removed" if self.temporary else f"its files kept in {self.workspace}"
            narrator.print(f"The suite was stopped and {where}; `modelyard demo --keep` leaves it running.")
            return
        narrator.print(f"The suite keeps running; its files and logs are in {self.workspace}. Try:")
        exports = " ".join(
            f"MODELYARD_{name.upper()}_ADDRESS={self.outcome.addresses[name]}"
            for name in ("catalog", "trainer")  # generate and chat route through the catalog
        )
        if self._flags(*SERVICES):
            narrator.command(f"export {exports}")
        for line in (
            "modelyard models list",
            f"modelyard generate {base_id} {_shell_quote(self.prompts[0])} --adapter {adapter_id} "
            "--temperature 0",
            f"modelyard chat {base_id} --adapter {adapter_id}",
            f"modelyard jobs plot {self.outcome.training_job.removeprefix('trainingJobs/')} -o loss.png",
        ):
            narrator.command(line)
        pids = " ".join(str(child.process.pid) for child in self.suite.children)
        narrator.print(f"Stop it with: kill {pids}")


def _default_data_dir() -> Path:
    from server_kit.settings import default_data_dir

    return default_data_dir()
