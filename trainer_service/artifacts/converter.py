"""llama.cpp's own GGUF converter and quantizer, as a trainer uses them.

The converter is `convert_hf_to_gguf.py` with its `conversion` package and `gguf-py`, taken
from the source release of the installed llama-cpp-python (its vendored llama.cpp), so the
converter and the quantizer are the same llama.cpp version. `scripts/setup.sh` puts them in
`.venv/llama.cpp/`; `MODELYARD_LLAMA_CPP_CONVERTER` names another `convert_hf_to_gguf.py`.

- Which architectures convert is the converter's answer, not a list kept here: a child
  process asks its registry (`conversion.get_model_class`, the classes registered with
  `@ModelBase.register`), once per architecture per process.
- `f32`, `f16` and `bf16` are written by the converter itself; every other type is the
  converter's 16-bit output quantized by `llama_cpp.llama_model_quantize`. The types offered
  are the `LLAMA_FTYPE_MOSTLY_*` constants of the installed llama_cpp, less the i-quants
  (`iq*`: they need an importance matrix) and the ternary types (`tq*`: BitNet only).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from server_kit.errors import FailedPrecondition, FieldViolation, InvalidArgument

log = logging.getLogger("modelyard.trainer")

CONVERTER_ENV = "MODELYARD_LLAMA_CPP_CONVERTER"
CONVERTER_TYPES = ("f32", "f16", "bf16")
"""File types the converter writes itself (`--outtype`)."""
DEFAULT_TYPE = "f16"
TOOLS = "trainer_service.artifacts.tools"


def default_converter() -> Path:
    """`$MODELYARD_LLAMA_CPP_CONVERTER`, else `<venv>/llama.cpp/convert_hf_to_gguf.py`."""
    configured = os.environ.get(CONVERTER_ENV, "").strip()
    return Path(configured) if configured else Path(sys.prefix) / "llama.cpp" / "convert_hf_to_gguf.py"


def quantizer_types() -> list[str]:
    """The file types llama.cpp's quantizer offers here (empty without llama-cpp-python)."""
    try:
        import llama_cpp
    except ImportError:
        return []
    names = [
        n.removeprefix("LLAMA_FTYPE_MOSTLY_").lower()
        for n in dir(llama_cpp)
        if n.startswith("LLAMA_FTYPE_MOSTLY_")
    ]
    return sorted(n for n in names if n not in CONVERTER_TYPES and not n.startswith(("iq", "tq")))


class ChildFailed(Exception):
    """A child process of a merge or an export exited non-zero; `detail` is its last words."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def last_words(stderr: str) -> str:
    """The line of a child's stderr that says why it failed (an exception's last line)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line.split(":", 1)[0] or line.startswith(("RuntimeError", "ValueError")):
            return line[:500]
    return lines[-1][:500] if lines else "no output"


async def run_child(args: list[str], *, cwd: Path | None = None) -> dict[str, Any]:
    """Run a child process; its last stdout line as JSON (`{}` when none), or ChildFailed."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    process = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(cwd) if cwd else None,
        env=env,
    )
    try:
        out, err = await process.communicate()
    except asyncio.CancelledError:
        process.kill()
        await process.wait()
        raise
    stderr = err.decode(errors="replace")
    if process.returncode != 0:
        log.warning("%s failed (exit %s): %s", args[1:3], process.returncode, stderr[-4000:])
        raise ChildFailed(last_words(stderr))
    lines = [line for line in out.decode(errors="replace").splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        result = {}
    return result if isinstance(result, dict) else {}


class LlamaCppConverter:
    """llama.cpp's converter and quantizer, run in child processes.

    Args:
        script: `convert_hf_to_gguf.py` (default: `default_converter()`).
        python: the interpreter of the child processes.
    """

    def __init__(self, script: Path | None = None, python: str = sys.executable) -> None:
        self.script = script or default_converter()
        self.python = python
        self._verdicts: dict[str, dict[str, Any]] = {}

    def available(self) -> bool:
        """Whether the converter script and its `conversion` package are there."""
        return self.script.is_file() and (self.script.parent / "conversion" / "__init__.py").is_file()

    def _require(self) -> None:
        if not self.available():
            raise FailedPrecondition(
                f"llama.cpp's GGUF converter is not installed on this trainer (looked for {self.script}); "
                f"run scripts/setup.sh, or set {CONVERTER_ENV} to a convert_hf_to_gguf.py",
                reason="GGUF_CONVERTER_MISSING",
                metadata={"converter": str(self.script)},
            )

    async def check_architecture(self, architecture: str, model: str) -> None:
        """Refuse, before any work, an architecture the converter has no model class for."""
        self._require()
        if not architecture:
            raise FailedPrecondition(
                f"{model} has no detected architecture, so llama.cpp's converter cannot be chosen for it",
                reason="ARCHITECTURE_NOT_CONVERTIBLE",
                metadata={"model": model},
            )
        verdict = self._verdicts.get(architecture)
        if verdict is None:
            args = [self.python, "-m", TOOLS, "probe", str(self.script.parent), architecture]
            try:
                verdict = await run_child(args)
            except ChildFailed as failed:
                raise FailedPrecondition(
                    f"llama.cpp's converter could not be asked about {architecture}: {failed.detail}",
                    reason="GGUF_CONVERTER_MISSING",
                    metadata={"converter": str(self.script)},
                ) from None
            self._verdicts[architecture] = verdict
        if not verdict.get("supported"):
            why = f" ({verdict['error']})" if verdict.get("error") else ""
            raise FailedPrecondition(
                f"llama.cpp's converter has no model class for {architecture}{why}, so {model} cannot "
                f"be merged for or exported to GGUF (it converts {verdict.get('known', '?')} "
                "architectures; `python convert_hf_to_gguf.py --print-supported-models` lists them)",
                reason="ARCHITECTURE_NOT_CONVERTIBLE",
                metadata={"model": model, "architecture": architecture},
            )

    def check_quantization(self, quantization: str) -> str:
        """The normalized file type (`f16` when empty), or INVALID_ARGUMENT naming the offered ones."""
        name = (quantization or DEFAULT_TYPE).strip().lower()
        if name in CONVERTER_TYPES:
            return name
        offered = quantizer_types()
        if name in offered:
            return name
        choices = ", ".join([*CONVERTER_TYPES, *offered])
        raise InvalidArgument(
            f"unsupported GGUF quantization {quantization!r}; choose one of: {choices}"
            + ("" if offered else " (quantized types need llama-cpp-python, the llama-cpp extra)"),
            reason="UNSUPPORTED_QUANTIZATION",
            violations=[FieldViolation("quantization", f"one of {choices}")],
        )

    async def export(self, model_dir: Path, target: Path, file_type: str) -> None:
        """Convert `model_dir` to the GGUF file `target` of `file_type` (a checked name)."""
        self._require()
        target.parent.mkdir(parents=True, exist_ok=True)
        direct = file_type in CONVERTER_TYPES
        converted = target if direct else target.with_name(target.stem + ".unquantized.gguf")
        await run_child(
            [
                self.python,
                str(self.script),
                str(model_dir),
                "--outfile",
                str(converted),
                "--outtype",
                file_type if direct else "auto",
            ],
            cwd=target.parent,
        )
        if direct:
            return
        try:
            await run_child([self.python, "-m", TOOLS, "quantize", str(converted), str(target), file_type])
        finally:
            converted.unlink(missing_ok=True)
