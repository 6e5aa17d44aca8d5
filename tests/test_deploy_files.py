"""The deployment files pass `scripts/check_deploy.py`, and the checker rejects broken ones.

No Docker engine or cluster runs here, so the checker is the only guard of docker/: each
defect test starts from the real file, breaks one thing, and expects that exact problem
(and no problem from the unbroken copy).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_deploy.py"


def _load_checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_deploy", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_deploy"] = module
    spec.loader.exec_module(module)
    return module


cd = _load_checker()


@pytest.fixture(scope="module")
def env() -> Any:
    """The environment rules of the real docs and code."""
    docs = ROOT / "docs" / "deployment.md"
    return cd.EnvRules(cd.documented_env(docs), cd.declared_env(ROOT), docs)


def test_repository_deployment_files_pass() -> None:
    """`python scripts/check_deploy.py` (what CI runs) passes on the repository's files."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check_deploy: OK (" in result.stdout


# ---------------------------------------------------------------- compose


def _real_compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    for service in data["services"].values():
        if "build" in service:  # the copy lives in tmp: point builds back at the repository
            service["build"] = {**service["build"], "context": str(ROOT)}
    return data


def _write_compose(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_relocated_compose_copy_is_clean(tmp_path: Path, env: Any) -> None:
    """The baseline the defect tests break: the real compose file, written to tmp, passes."""
    assert cd.check_compose(_write_compose(tmp_path, _real_compose()), [], env) == []


def _depends_on_missing(d: dict[str, Any]) -> None:
    d["services"]["inference"]["depends_on"]["catalgo"] = {"condition": "service_healthy"}


def _duplicate_port(d: dict[str, Any]) -> None:
    d["services"]["trainer"]["ports"].append("50051:50051")


def _misspelled_env(d: dict[str, Any]) -> None:
    d["services"]["catalog"]["environment"]["MODELYARD_CATALOG_DATABSE_URL"] = "sqlite://"


def _missing_dockerfile(d: dict[str, Any]) -> None:
    d["services"]["trainer"]["build"]["dockerfile"] = "docker/nope.Dockerfile"


def _healthy_without_healthcheck(d: dict[str, Any]) -> None:
    d["services"]["catalog"]["depends_on"]["migrate"] = {"condition": "service_healthy"}


def _one_shot_restarts(d: dict[str, Any]) -> None:
    d["services"]["migrate"]["restart"] = "unless-stopped"


def _cycle(d: dict[str, Any]) -> None:
    d["services"]["catalog"]["depends_on"]["inference"] = {"condition": "service_started"}


def _undeclared_volume(d: dict[str, Any]) -> None:
    d["services"]["inference"]["volumes"] = ["modelz:/var/lib/modelyard"]


def _schema_typo(d: dict[str, Any]) -> None:
    d["services"]["trainer"]["depend_on"] = d["services"]["trainer"].pop("depends_on")


def _missing_service(d: dict[str, Any]) -> None:
    del d["services"]["trainer"]


def _unpinned_image(d: dict[str, Any]) -> None:
    d["services"]["postgres"]["image"] = "postgres"


COMPOSE_DEFECTS: list[tuple[Callable[[dict[str, Any]], None], str]] = [
    (_depends_on_missing, "services.inference.depends_on: 'catalgo' is not a service"),
    (_duplicate_port, "services.trainer.ports: host port :50051/tcp is also published by catalog"),
    (_misspelled_env, "MODELYARD_CATALOG_DATABSE_URL is not documented"),
    (_misspelled_env, "MODELYARD_CATALOG_DATABSE_URL is not read by any service"),
    (_missing_dockerfile, "docker/nope.Dockerfile does not exist"),
    (_healthy_without_healthcheck, "'migrate' is awaited healthy but has no health check"),
    (_one_shot_restarts, "'migrate' is awaited to complete but restarts forever"),
    (_cycle, "depends_on cycle"),
    (_undeclared_volume, "named volume 'modelz' is not declared"),
    (_schema_typo, "services.trainer: Unevaluated properties are not allowed ('depend_on' was unexpected)"),
    (_missing_service, "service 'trainer' is missing"),
    (_unpinned_image, "services.postgres.image: 'postgres' is not pinned"),
]


@pytest.mark.parametrize(
    ("breakage", "expected"), COMPOSE_DEFECTS, ids=[f.__name__.strip("_") for f, _ in COMPOSE_DEFECTS]
)
def test_broken_compose_is_rejected(
    tmp_path: Path, env: Any, breakage: Callable[[dict[str, Any]], None], expected: str
) -> None:
    """Each kind of compose mistake is reported with its location."""
    data = _real_compose()
    breakage(data)
    problems = cd.check_compose(_write_compose(tmp_path, data), [], env)
    assert any(expected in p for p in problems), problems


def test_cli_rejects_compose_with_missing_dependency(tmp_path: Path) -> None:
    """End to end: the command CI runs exits 1 and names the broken depends_on."""
    data = _real_compose()
    _depends_on_missing(data)
    path = _write_compose(tmp_path, data)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--no-hadolint", "--compose", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 1, result.stdout
    assert "'catalgo' is not a service" in result.stdout
    assert "check_deploy: 1 problem(s)" in result.stdout


def test_override_naming_an_unknown_service_is_rejected(tmp_path: Path, env: Any) -> None:
    """An override that misspells a service would silently add a half-defined one."""
    base = _write_compose(tmp_path, _real_compose())
    override = tmp_path / "compose.gpu.yaml"
    override.write_text(yaml.safe_dump({"services": {"inferense": {"shm_size": "8gb"}}}))
    problems = cd.check_compose(base, [override], env)
    assert any("service 'inferense' is not in" in p for p in problems), problems


# ---------------------------------------------------------------- Kubernetes


@pytest.fixture
def k8s_copy(tmp_path: Path) -> Path:
    """A writable copy of docker/k8s."""
    target = tmp_path / "k8s"
    shutil.copytree(ROOT / "docker" / "k8s", target)
    return target


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1))


def test_k8s_copy_is_clean(k8s_copy: Path, env: Any) -> None:
    """The baseline the defect tests break: the real manifests, copied, pass."""
    assert cd.check_k8s(k8s_copy, env) == []


K8S_DEFECTS: list[tuple[str, str, str, str]] = [
    # file, text, replacement, expected problem
    ("catalog.yaml", "readinessProbe:", "readinesProbe:", "'readinesProbe' was unexpected"),
    ("catalog.yaml", "replicas: 2", "replicas: two", "spec.replicas: 'two' is not of type 'integer'"),
    (
        "inference.yaml",
        "  selector:\n    app.kubernetes.io/name: modelyard\n    app.kubernetes.io/component: inference",
        "  selector:\n    app.kubernetes.io/name: modelyard\n    app.kubernetes.io/component: inferenc",
        "Service/modelyard-inference: selector",
    ),
    ("trainer.yaml", "targetPort: metrics", "targetPort: metric", "targetPort metric is not a port"),
    (
        "catalog.yaml",
        "key: MODELYARD_CATALOG_DATABASE_URL",
        "key: DATABASE_URL",
        "uses key 'DATABASE_URL', which Secret 'modelyard-database' does not have",
    ),
    (
        "trainer.yaml",
        "claimName: modelyard-models",
        "claimName: models",
        "claims 'models', which is not defined",
    ),
    ("inference.yaml", "name: modelyard-config", "name: modelyard-cfg", "envFrom ConfigMap 'modelyard-cfg'"),
    (
        "catalog.yaml",
        "livenessProbe:\n            grpc:",
        "livenessProbe:\n            tcpSocket:",
        "no gRPC livenessProbe",
    ),
    (
        "inference.yaml",
        "grpc:\n              port: 50053\n            periodSeconds: 5",
        "grpc:\n              port: 50054\n            periodSeconds: 5",
        "readinessProbe port 50054 is not a container port",
    ),
    ("trainer.yaml", "              memory: 16Gi\n", "", "resources.limits.memory is not set"),
    ("trainer.yaml", "$(POD_IP):50052", "$(POD_ADDRESS):50052", "refers to $(POD_ADDRESS)"),
    (
        "configmap.yaml",
        "MODELYARD_LOG_LEVEL: INFO",
        "MODELYARD_LOGLEVEL: INFO",
        "MODELYARD_LOGLEVEL is not documented",
    ),
    (
        "catalog.yaml",
        "image: modelyard/catalog:0.1.0",
        "image: modelyard/catalog",
        "is not pinned to a version tag",
    ),
    ("pvc.yaml", "namespace: modelyard", "namespace: default", "namespace is 'default'"),
    ("kustomization.yaml", "  - trainer.yaml\n", "", "trainer.yaml is not listed in resources"),
]


@pytest.mark.parametrize(
    ("file", "old", "new", "expected"), K8S_DEFECTS, ids=[d[3][:40] for d in K8S_DEFECTS]
)
def test_broken_k8s_manifest_is_rejected(
    k8s_copy: Path, env: Any, file: str, old: str, new: str, expected: str
) -> None:
    """Schema errors and broken references between objects are reported."""
    _edit(k8s_copy / file, old, new)
    problems = cd.check_k8s(k8s_copy, env)
    assert any(expected in p for p in problems), problems


def test_env_order_matters_in_k8s(k8s_copy: Path, env: Any) -> None:
    """`$(POD_IP)` only expands when POD_IP is defined earlier in the list, as in Kubernetes."""
    path = k8s_copy / "inference.yaml"
    data = list(yaml.safe_load_all(path.read_text()))
    container = data[0]["spec"]["template"]["spec"]["containers"][0]
    container["env"] = list(reversed(container["env"]))
    path.write_text(yaml.safe_dump_all(data, sort_keys=False))
    problems = cd.check_k8s(k8s_copy, env)
    assert any("MODELYARD_INFERENCE_ADVERTISE_ADDRESS refers to $(POD_IP)" in p for p in problems), problems


# ---------------------------------------------------------------- Dockerfiles and docs


def test_bad_dockerfile_is_rejected(tmp_path: Path, env: Any) -> None:
    """hadolint findings, a missing COPY source, no HEALTHCHECK and a root user are all reported."""
    dockerfile = tmp_path / "bad.Dockerfile"
    dockerfile.write_text(
        "FROM python:latest\nCOPY no_such_package ./pkg\nRUN pip install requests\nENV MODELYARD_NOPE=1\n"
    )
    problems = cd.check_dockerfiles([dockerfile], ROOT, env)
    text = "\n".join(problems)
    assert "DL3007" in text  # `latest` tag
    assert "DL3013" in text  # unpinned pip install
    assert "COPY source no_such_package does not exist" in text
    assert "no HEALTHCHECK CMD" in text
    assert "does not run as a non-root USER" in text
    assert "MODELYARD_NOPE is not read by any service" in text


def test_dockerignore_must_let_copied_sources_through(tmp_path: Path, env: Any) -> None:
    """A COPY of a folder the Dockerfile's own .dockerignore excludes would fail the build."""
    source = (ROOT / "docker" / "catalog.Dockerfile").read_text()
    dockerfile = tmp_path / "catalog.Dockerfile"
    dockerfile.write_text(source)
    ignore = (ROOT / "docker" / "catalog.Dockerfile.dockerignore").read_text()
    (tmp_path / "catalog.Dockerfile.dockerignore").write_text(ignore.replace("!clients/\n", ""))
    problems = cd.check_dockerfiles([dockerfile], ROOT, env, hadolint=False)
    assert any("COPY source clients is excluded" in p for p in problems), problems


def test_healthcheck_must_probe_an_exposed_port(tmp_path: Path, env: Any) -> None:
    """A trainer image whose probe asks the catalog's port would never turn healthy."""
    source = (ROOT / "docker" / "trainer.Dockerfile").read_text()
    dockerfile = tmp_path / "trainer.Dockerfile"
    dockerfile.write_text(source.replace('"localhost:50052"', '"localhost:50051"'))
    problems = cd.check_dockerfiles([dockerfile], ROOT, env, hadolint=False)
    assert any("HEALTHCHECK probes port 50051, which is not EXPOSEd" in p for p in problems), problems


def test_docs_table_rows_must_be_read_by_the_code(tmp_path: Path) -> None:
    """The environment table cannot document a variable no service reads."""
    docs = tmp_path / "deployment.md"
    docs.write_text(
        (ROOT / "docs" / "deployment.md").read_text() + "\n| `MODELYARD_IMAGINARY` | catalog | x | y |\n"
    )
    rules = cd.EnvRules(cd.documented_env(docs), cd.declared_env(ROOT), docs)
    assert "MODELYARD_IMAGINARY" in rules.documented
    assert any("documents MODELYARD_IMAGINARY, which no service reads" in p for p in rules.check_docs())
