"""The trainer's own Prometheus metrics: job states, and the progress of the jobs it runs.

Computed from the job store when Prometheus scrapes. `modelyard_trainer_jobs`
counts the jobs of the whole store (trainers sharing a database report the same
totals: aggregate with `max`); the other gauges describe this trainer's own jobs,
one series per running job, gone when the job ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from modelyard.trainer.v1 import trainer_service_pb2 as pb
from server_kit.errors import NotFound
from server_kit.metrics import PREFIX, ScrapeCollector
from trainer_service.jobs import JobStore, method_name, state_name
from trainer_service.manager import JobManager

_PROGRESS = (
    # (TrainingProgress field, metric suffix, help, optional field)
    ("step", "step", "Optimizer steps done by a running job.", False),
    ("total_steps", "total_steps", "Steps a running job will take in all.", False),
    ("epoch", "epoch", "Epochs done by a running job (fractional).", False),
    ("loss", "loss", "Latest training loss of a running job.", True),
    ("learning_rate", "learning_rate", "Current learning rate of a running job.", True),
    ("samples_per_second", "samples_per_second", "Training throughput of a running job (samples/s).", True),
    ("tokens_per_second", "tokens_per_second", "Training throughput of a running job (tokens/s).", True),
)


def trainer_metrics(store: JobStore, running_ids: Sequence[str], job_slots: int) -> Iterable[Metric]:
    """The trainer gauges: job states from `store`, progress of the jobs this trainer runs (`running_ids`)."""
    jobs = GaugeMetricFamily(
        f"{PREFIX}_trainer_jobs", "Training jobs in the job store, by state.", labels=["state"]
    )
    counts = store.count_by_state()
    for value in pb.TrainingJobState.values():
        if value != pb.TRAINING_JOB_STATE_UNSPECIFIED:
            name = state_name(value)
            jobs.add_metric([name], counts.pop(name, 0))
    for name, count in sorted(counts.items()):
        jobs.add_metric([name], count)

    running = GaugeMetricFamily(f"{PREFIX}_trainer_running_jobs", "Jobs this trainer runs now.")
    running.add_metric([], len(running_ids))
    slots = GaugeMetricFamily(
        f"{PREFIX}_trainer_job_slots", "Jobs this trainer runs at once at most (MAX_CONCURRENT_JOBS)."
    )
    slots.add_metric([], job_slots)

    families = {
        field: GaugeMetricFamily(f"{PREFIX}_trainer_job_{suffix}", help_text, labels=["job", "method"])
        for field, suffix, help_text, _ in _PROGRESS
    }
    for job_id in running_ids:
        try:
            job = store.get(job_id)
        except NotFound:  # finished and deleted between the two reads
            continue
        labels = [job_id, method_name(job.method)]
        for field, _, _, optional in _PROGRESS:
            if optional and not job.progress.HasField(field):  # type: ignore[arg-type]
                continue
            families[field].add_metric(labels, float(getattr(job.progress, field)))
    return [jobs, running, slots, *families.values()]


def trainer_collector(
    store: Callable[[], JobStore | None], manager: Callable[[], JobManager | None]
) -> ScrapeCollector:
    """A collector of the trainer gauges (`store()` and `manager()` are None before start)."""

    def compute() -> Iterable[Metric]:
        current_store, current_manager = store(), manager()
        if current_store is None or current_manager is None:
            return []
        return trainer_metrics(
            current_store, current_manager.running_jobs, current_manager.config.max_concurrent_jobs
        )

    return ScrapeCollector("trainer", compute)
