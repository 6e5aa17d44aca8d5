"""Loss history of a training job, and the plots `modelyard jobs plot` draws.

The trainer keeps every logged step's metrics with the job
(`ListTrainingMetrics`), so the history comes from the server, from any
machine. Added to it (they matter for trainers that keep no history):

1. the events this CLI saw: `modelyard train --watch`, `jobs watch` and
   `jobs plot` record each logged loss and eval loss under
   `$MODELYARD_DATA_DIR/cli/job-history/{job}.jsonl` (default `~/.modelyard`);
2. the job's checkpoint folder when this machine can read it: its
   `trainer_state.json` holds transformers' `log_history`.

The plot is drawn in the terminal (`render_terminal`) by default; a PNG with
matplotlib when it is installed, else with Pillow.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from modelyard.trainer.v1 import trainer_service_pb2 as trainer_pb

TRAIN_COLOR = (31, 119, 180)
EVAL_COLOR = (255, 127, 14)


def history_dir() -> Path:
    """Where the CLI records the loss histories it watched."""
    data_dir = Path(os.environ.get("MODELYARD_DATA_DIR", str(Path.home() / ".modelyard"))).expanduser()
    return data_dir / "cli" / "job-history"


def history_path(job: str) -> Path:
    """The history file of `job` (`trainingJobs/x` or `x`)."""
    return history_dir() / f"{job.removeprefix('trainingJobs/')}.jsonl"


@dataclass
class LossHistory:
    """Training loss and eval loss by optimizer step."""

    loss: dict[int, float] = field(default_factory=dict)
    eval_loss: dict[int, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.loss) + len(self.eval_loss)

    def add(self, step: int, *, loss: float | None = None, eval_loss: float | None = None) -> bool:
        """Record a point; True when it is new."""
        new = False
        if loss is not None and math.isfinite(loss) and self.loss.get(step) != loss:
            self.loss[step] = loss
            new = True
        if eval_loss is not None and math.isfinite(eval_loss) and self.eval_loss.get(step) != eval_loss:
            self.eval_loss[step] = eval_loss
            new = True
        return new

    def add_event(self, event: trainer_pb.WatchTrainingJobResponse) -> dict[str, float] | None:
        """Record the loss a PROGRESS event or the eval loss an EVAL event carries; the new point or None."""
        progress = event.job.progress
        kind = event.event_type
        if kind == trainer_pb.TRAINING_EVENT_TYPE_PROGRESS and progress.HasField("loss"):
            return (
                {"step": progress.step, "loss": progress.loss}
                if self.add(progress.step, loss=progress.loss)
                else None
            )
        if kind == trainer_pb.TRAINING_EVENT_TYPE_EVAL and progress.HasField("eval_loss"):
            new = self.add(progress.step, eval_loss=progress.eval_loss)
            return {"step": progress.step, "eval_loss": progress.eval_loss} if new else None
        return None

    def merge(self, other: LossHistory) -> None:
        """Add the points of `other` (its values win on the same step)."""
        self.loss.update(other.loss)
        self.eval_loss.update(other.eval_loss)

    def as_json(self) -> dict[str, list[list[float]]]:
        """`{"loss": [[step, loss], ...], "evalLoss": [[step, loss], ...]}`, sorted by step."""
        return {
            "loss": [[step, value] for step, value in sorted(self.loss.items())],
            "evalLoss": [[step, value] for step, value in sorted(self.eval_loss.items())],
        }

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> LossHistory:
        """Read `{"step": .., "loss": ..}` / `{"step": .., "eval_loss": ..}` lines (bad lines skipped)."""
        history = cls()
        for line in lines:
            try:
                point = json.loads(line)
                history.add(int(point["step"]), loss=point.get("loss"), eval_loss=point.get("eval_loss"))
            except (ValueError, KeyError, TypeError):
                continue
        return history


class HistoryRecorder:
    """Appends the points of watched events to the job's history file."""

    def __init__(self, job: str) -> None:
        self.path = history_path(job)
        self.history = load_recorded(job)

    def add_event(self, event: trainer_pb.WatchTrainingJobResponse) -> None:
        """Record the event's point, if it carries a new one."""
        point = self.history.add_event(event)
        if point is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(point) + "\n")
        except OSError:
            pass  # a read-only home must not break watching


def load_recorded(job: str) -> LossHistory:
    """The points this CLI recorded for `job`."""
    path = history_path(job)
    if not path.is_file():
        return LossHistory()
    return LossHistory.from_lines(path.read_text(encoding="utf-8").splitlines())


def load_trainer_state(checkpoint_path: str) -> LossHistory:
    """The `log_history` of `trainer_state.json` in a checkpoint folder readable from here."""
    history = LossHistory()
    if not checkpoint_path:
        return history
    state_file = Path(checkpoint_path) / "trainer_state.json"
    try:
        entries = json.loads(state_file.read_text(encoding="utf-8")).get("log_history", [])
    except (OSError, ValueError, AttributeError):
        return history
    for entry in entries:
        if not isinstance(entry, dict) or "step" not in entry:
            continue
        loss = entry.get("loss")
        eval_loss = entry.get("eval_loss")
        history.add(
            int(entry["step"]),
            loss=float(loss) if isinstance(loss, int | float) else None,
            eval_loss=float(eval_loss) if isinstance(eval_loss, int | float) else None,
        )
    return history


def render_png(history: LossHistory, path: Path, title: str) -> str:
    """Draw the loss curves into `path`; returns the library used (`matplotlib` or `pillow`)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:
        _render_matplotlib(history, path, title)
        return "matplotlib"
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise RuntimeError("jobs plot needs matplotlib or Pillow: pip install matplotlib") from None
    _render_pillow(history, path, title)
    return "pillow"


def _render_matplotlib(history: LossHistory, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.8), dpi=100)
    for points, label, color in (
        (history.loss, "training loss", TRAIN_COLOR),
        (history.eval_loss, "eval loss", EVAL_COLOR),
    ):
        if points:
            steps = sorted(points)
            axes.plot(
                steps,
                [points[s] for s in steps],
                label=label,
                color=tuple(c / 255 for c in color),
                marker="o" if points is history.eval_loss else None,
            )
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)


def _render_pillow(history: LossHistory, path: Path, title: str) -> None:
    from PIL import Image, ImageDraw

    width, height = 800, 480
    left, right, top, bottom = 70, 20, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    steps = [*history.loss, *history.eval_loss]
    values = [*history.loss.values(), *history.eval_loss.values()]
    x_min, x_max = min(steps), max(steps)
    if x_min == x_max:
        x_min, x_max = x_min - 1, x_max + 1
    y_min, y_max = min(values), max(values)
    pad = (y_max - y_min) * 0.05 or abs(y_max) * 0.05 or 1.0
    y_min, y_max = y_min - pad, y_max + pad

    def point(step: float, value: float) -> tuple[float, float]:
        x = left + (step - x_min) / (x_max - x_min) * (width - left - right)
        y = top + (y_max - value) / (y_max - y_min) * (height - top - bottom)
        return x, y

    grey = (200, 200, 200)
    for i in range(6):
        y_value = y_min + (y_max - y_min) * i / 5
        _, y = point(x_min, y_value)
        draw.line([(left, y), (width - right, y)], fill=(235, 235, 235))
        draw.text((5, y - 6), f"{y_value:.3g}", fill="black")
        x_value = x_min + (x_max - x_min) * i / 5
        x, _ = point(x_value, y_min)
        draw.text((x - 10, height - bottom + 6), f"{x_value:.0f}", fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline=grey)
    draw.text((left, 12), title, fill="black")
    draw.text((width // 2 - 12, height - 20), "step", fill="black")
    draw.text((5, top - 16), "loss", fill="black")

    for points, color in ((history.loss, TRAIN_COLOR), (history.eval_loss, EVAL_COLOR)):
        line = [point(step, points[step]) for step in sorted(points)]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        if points is history.eval_loss or len(line) == 1:
            for x, y in line:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)

    legend_x = width - right - 150
    for row, (label, color, points) in enumerate(
        (("training loss", TRAIN_COLOR, history.loss), ("eval loss", EVAL_COLOR, history.eval_loss))
    ):
        if not points:
            continue
        y = top + 10 + row * 16
        draw.line([(legend_x, y + 6), (legend_x + 20, y + 6)], fill=color, width=3)
        draw.text((legend_x + 26, y), label, fill="black")
    image.save(path, format="PNG")


def history_from_points(points: Iterable[trainer_pb.MetricPoint]) -> LossHistory:
    """The loss and eval loss of a job's metric history (`ListTrainingMetrics` points)."""
    history = LossHistory()
    for point in points:
        values = point.values
        if point.kind == trainer_pb.METRIC_KIND_TRAIN and "loss" in values:
            history.add(point.step, loss=values["loss"])
        elif point.kind == trainer_pb.METRIC_KIND_EVAL and "eval_loss" in values:
            history.add(point.step, eval_loss=values["eval_loss"])
    return history


def render_terminal(history: LossHistory, title: str, width: int = 64, height: int = 16) -> str:
    """The loss curves as text: `*` training loss, `o` eval loss, on a step x loss grid."""
    steps = [*history.loss, *history.eval_loss]
    values = [*history.loss.values(), *history.eval_loss.values()]
    x_min, x_max = min(steps), max(steps)
    y_min, y_max = min(values), max(values)
    if y_max == y_min:
        y_min, y_max = y_min - 0.5, y_max + 0.5
    grid = [[" "] * width for _ in range(height)]

    def put(step: int, value: float, mark: str) -> None:
        x = 0 if x_max == x_min else round((step - x_min) / (x_max - x_min) * (width - 1))
        y = round((y_max - value) / (y_max - y_min) * (height - 1))
        grid[y][x] = mark

    for step, value in history.loss.items():
        put(step, value, "*")
    for step, value in history.eval_loss.items():
        put(step, value, "o")
    label_width = max(len(f"{y_max:.4g}"), len(f"{y_min:.4g}"))
    lines = [title]
    for row, cells in enumerate(grid):
        label = f"{y_max:.4g}" if row == 0 else f"{y_min:.4g}" if row == height - 1 else ""
        lines.append(f"{label:>{label_width}} |" + "".join(cells).rstrip())
    lines.append(" " * label_width + " +" + "-" * width)
    left, right = f"step {x_min}", f"{x_max}"
    lines.append(" " * (label_width + 2) + left + right.rjust(width - len(left)))
    legend = []
    if history.loss:
        legend.append(
            f"* training loss ({len(history.loss)} points, last {history.loss[max(history.loss)]:.4g})"
        )
    if history.eval_loss:
        last_eval = history.eval_loss[max(history.eval_loss)]
        legend.append(f"o eval loss ({len(history.eval_loss)} points, last {last_eval:.4g})")
    lines.append("   ".join(legend))
    return "\n".join(lines)
