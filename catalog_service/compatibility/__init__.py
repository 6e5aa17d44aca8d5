"""Which worker can run a model, and why not: per-rule compatibility reports.

`check(model, worker_or_spec)` evaluates the target engine's rules (the common
rules of `rules.COMMON_RULES` plus the engine's extra rules, always the same
list for an engine) and returns a `CompatibilityReport`: one `RuleResult` per
rule with PASS / WARN / FAIL / SKIP and a message a person can act on, the
verdict (INCOMPATIBLE if any rule fails, COMPATIBLE_WITH_WARNINGS if any
warns, else COMPATIBLE) and the estimated memory.

Engines are data: one module per engine under `engines/` builds an
`EngineTable` and registers it by the engine name workers report (`vllm`,
`transformers`, `peft`, `diffusers`, `llama-cpp`). A worker whose engine is not
registered gets a report whose `engine` rule FAILs.

A worker may run several engines (`Worker.engines`, in order of preference,
e.g. vLLM then transformers). Its report is the report of the first engine
that can run the model; the `engine` rule then says which engine that is and,
when it is not the first, why the preferred ones cannot (their reports are in
`other_engines`).

Pure domain code: no gRPC and no store. The catalog passes `lookup_model`
(name -> Model or None) so that an adapter's base model can be found, and
`lookup_outcomes` (name -> what engines did when workers tried the model) for
the `observed` rule.
"""

from __future__ import annotations

from catalog_service.compatibility import engines
from catalog_service.compatibility.context import (
    FAIL,
    SKIP,
    WARN,
    CompatibilityReport,
    Context,
    EngineSpec,
    EngineTable,
    Model,
    ModelLookup,
    OutcomeLookup,
    RuleResult,
    Target,
    Worker,
    first_failure,
    join_or,
    verdict_of,
)
from catalog_service.compatibility.rules import COMMON_RULES
from modelyard.catalog.v1 import worker_pb2

__all__ = [
    "EngineTable",
    "check",
    "engine_names",
    "rule_names",
    "verdict_of",
]


#: Rules whose failure means an engine does not take this kind of model or file at all:
#: another engine of the worker serving it is no fallback.
_FORMAT_RULES = frozenset({"kind", "weight_format"})

#: Rules that still mean something when the engine does not run the model's kind;
#: the others are SKIPped then, so the report shows the one reason that matters.
_KIND_INDEPENDENT = frozenset({"engine", "model_state", "kind", "role"})


def engine_names() -> list[str]:
    """Names of the engines the rules know."""
    return engines.names()


def rule_names(engine: str) -> list[str]:
    """Rule ids a report for `engine` has, in order (the common rules for an unknown engine)."""
    table = engines.get(engine)
    return [rule.name for rule in (*COMMON_RULES, *(table.extra_rules if table else ()))]


def check(
    model: Model,
    target: Worker | EngineSpec,
    *,
    role: worker_pb2.WorkerRole.ValueType | None = None,
    lookup_model: ModelLookup | None = None,
    training_method: str | None = None,
    lookup_outcomes: OutcomeLookup | None = None,
) -> CompatibilityReport:
    """Check whether `model` can run on `target` (a registered worker or an engine spec), rule by rule.

    `role` is the role the caller needs (any when None or unspecified);
    `lookup_model` finds catalog models by name (an adapter's base);
    `training_method` (`lora`, `qlora`, `full`, `dpo`) narrows the training rules;
    `lookup_outcomes` gives what engines did when workers tried a model (the `observed` rule).
    """
    requested = role or None
    targets = Target.all_of(target)
    reports = [
        _check(model, one, requested, lookup_model, training_method, frozenset(), lookup_outcomes)
        for one in targets
    ]
    if len(reports) == 1:
        return reports[0]
    return _choose(reports)


def _choose(reports: list[CompatibilityReport]) -> CompatibilityReport:
    """The report of the first engine that can run the model (the first engine's when none can),
    with the others in `other_engines` and the `engine` rule saying what was chosen and why."""
    chosen = next((r for r in reports if r.verdict != worker_pb2.VERDICT_INCOMPATIBLE), reports[0])
    index = reports.index(chosen)
    report = CompatibilityReport()
    report.CopyFrom(chosen)
    report.other_engines.extend(r for r in reports if r is not chosen)
    skipped_over = reports[:index]
    if skipped_over and report.results and report.results[0].rule == "engine":
        failures = [(r.engine, f) for r in skipped_over if (f := first_failure(r)) is not None]
        engine = report.results[0]
        if all(f.rule in _FORMAT_RULES for _, f in failures):
            # Not a fallback: the preferred engines do not take this kind of file at all (GGUF).
            engine.message += f" (this worker's {join_or([name for name, _ in failures])} does not load it)"
        else:
            why = "; ".join(f"{name} cannot run it ({f.rule}: {f.message})" for name, f in failures)
            engine.outcome = WARN
            engine.message = (
                f"{engine.message}, this worker's fallback engine: {why}; "
                f"served by {chosen.engine}, which is slower"
            )
        report.verdict = verdict_of(report.results)
    elif report.verdict != worker_pb2.VERDICT_INCOMPATIBLE and len(reports) > 1:
        report.results[0].message += " (this worker's preferred engine)"
    return report


def _check(
    model: Model,
    target: Target,
    role: worker_pb2.WorkerRole.ValueType | None,
    lookup_model: ModelLookup | None,
    training_method: str | None,
    visited: frozenset[str],
    lookup_outcomes: OutcomeLookup | None = None,
) -> CompatibilityReport:
    report = CompatibilityReport(model=model.name, worker=target.name, engine=target.engine)
    table = engines.get(target.engine)
    if table is None:
        known = ", ".join(engines.names())
        shown = repr(target.engine) if target.engine else "(none)"
        report.results.append(
            RuleResult(
                rule="engine",
                outcome=FAIL,
                message=f"unknown engine {shown}; the worker must report one of: {known}",
            )
        )
        for rule in COMMON_RULES[1:]:
            report.results.append(
                RuleResult(rule=rule.name, outcome=SKIP, message="not checked: the engine is unknown")
            )
        report.verdict = verdict_of(report.results)
        return report

    def check_other(other: Model) -> CompatibilityReport:
        return _check(other, target, role, lookup_model, None, visited | {model.name}, lookup_outcomes)

    ctx = Context(
        model=model,
        target=target,
        table=table,
        engines=engines.tables(),
        requested_role=role,
        training_method=training_method,
        lookup_model=lookup_model,
        check_other=check_other,
        visited=visited,
        lookup_outcomes=lookup_outcomes,
    )
    kind_failed = False
    for rule in (*COMMON_RULES, *table.extra_rules):
        if kind_failed and rule.name not in _KIND_INDEPENDENT:
            message = f"not checked: {table.name} does not run this kind of model (see kind)"
            report.results.append(RuleResult(rule=rule.name, outcome=SKIP, message=message))
            continue
        finding = rule.evaluate(ctx)
        report.results.append(RuleResult(rule=rule.name, outcome=finding.outcome, message=finding.message))
        kind_failed = kind_failed or (rule.name == "kind" and finding.outcome == FAIL)
    report.verdict = verdict_of(report.results)
    if not kind_failed and ctx.memory is not None:
        report.estimated_memory_bytes = ctx.memory.total
    return report
