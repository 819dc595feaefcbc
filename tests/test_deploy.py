"""The deployment files agree with each other and with the service.

There is no container runtime here, so these read the files: ``compose.yaml`` parses, its services
run the image's entrypoint with the same commands as ``make run``, they depend on each other as
documented, and every setting they pass is one the service knows. The Dockerfile is multi-stage,
installs exactly the lock and runs as a non-root user with a health check.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from app.core.config import Settings

ROOT = Path(__file__).resolve().parent.parent
REPLICAS = ("connectors-1", "connectors-2")
SECRETS = ("CONNECTORS_JWT_SECRET", "CONNECTORS_ENCRYPTION_KEYS", "POSTGRES_PASSWORD")


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions (keyword, arguments), one list per stage."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, arguments = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword.upper(), arguments.strip()))
    return stages


def final_stage(keyword: str) -> list[str]:
    return [arguments for kw, arguments in dockerfile_stages()[-1] if kw == keyword]


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"not the exec form: {arguments}"
    return [str(part) for part in value]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def effective_command(service: dict[str, Any]) -> list[str]:
    """What the container runs: the service's entrypoint and command, else the image's."""
    (entrypoint,) = final_stage("ENTRYPOINT")
    (cmd,) = final_stage("CMD")
    command = service.get("command", exec_form(cmd))
    if isinstance(command, str):
        command = shlex.split(command)
    return [*service.get("entrypoint", exec_form(entrypoint)), *command]


def make_recipe(target: str) -> list[str]:
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_compose_runs_the_images_serve_and_migrate_commands(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert effective_command(services["migrate"]) == ["python", "-m", "app", "migrate"]
    for name in REPLICAS:
        assert effective_command(services[name]) == ["python", "-m", "app", "serve"]
    # The same two steps as `make run`, in the same order.
    run = make_recipe("run")
    assert [line.split("-m app ")[1] for line in run if "-m app " in line] == ["migrate", "serve"]


def test_replicas_share_one_image_built_from_the_dockerfile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    built = [services[name] for name in ("migrate", *REPLICAS)]
    assert len({service["image"] for service in built}) == 1
    for service in built:
        assert service["build"] == {"context": ".", "dockerfile": "Dockerfile"}
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")


def test_start_order_and_health_checks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["migrate"].get("restart", "no") == "no"
    for name in REPLICAS:
        assert services[name]["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"},
            "postgres": {"condition": "service_healthy"},
            "redis": {"condition": "service_healthy"},
        }
        assert "/readyz" in " ".join(services[name]["healthcheck"]["test"])
    for name in ("postgres", "redis", *REPLICAS):
        assert services[name]["healthcheck"]["test"][0] == "CMD"


def test_replicas_listen_on_ports_of_their_own(compose: dict[str, Any]) -> None:
    (exposed,) = final_stage("EXPOSE")
    host_ports = []
    for name in REPLICAS:
        (mapping,) = compose["services"][name]["ports"]
        host, _, container = str(mapping).rpartition(":")
        assert container == exposed
        host_ports.append(host)
    assert host_ports == ["127.0.0.1:8001", "127.0.0.1:8002"]


def test_settings_are_known_and_secrets_are_never_written_down(compose: dict[str, Any]) -> None:
    known = {f"CONNECTORS_{name.upper()}" for name in Settings.model_fields}
    interpolated: set[str] = set()
    for name in ("migrate", *REPLICAS):
        environment = compose["services"][name]["environment"]
        assert set(environment) <= known, f"{name}: unknown settings {set(environment) - known}"
        url = environment["CONNECTORS_DATABASE_URL"]
        assert url.startswith("postgresql+asyncpg://connectors:")
        assert url.endswith("@postgres:5432/connectors")
        for value in environment.values():
            interpolated |= set(re.findall(r"\$\{(\w+)", value))
    for name in REPLICAS:
        environment = compose["services"][name]["environment"]
        assert environment["CONNECTORS_REDIS_URL"] == "redis://redis:6379/0"
        assert "CONNECTORS_DEV_KEYS" not in environment
        for secret in ("CONNECTORS_JWT_SECRET", "CONNECTORS_ENCRYPTION_KEYS"):
            assert environment[secret].startswith(f"${{{secret}:?")
    # Every secret is required (`:?`): compose stops instead of starting with a default.
    text = (ROOT / "compose.yaml").read_text()
    for secret in SECRETS:
        uses = re.findall(r"\$\{" + secret + r"(:?[?-])?", text)
        assert uses, secret
        assert set(uses) == {":?"}, f"{secret} has a default"
    # The example lists every variable compose reads, with the secrets left empty.
    example = dict(
        line.split("=", 1)
        for line in (ROOT / "compose.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert set(re.findall(r"\$\{(\w+)", text)) == set(example)
    assert all(example[secret] == "" for secret in SECRETS)
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
    assert ".env" in (ROOT / ".dockerignore").read_text().splitlines()


def test_dockerfile_builds_a_non_root_image_from_the_lock() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: build tools stay out of the final image"
    (user,) = final_stage("USER")
    assert user not in ("root", "0") and not user.startswith(("root:", "0:"))
    (healthcheck,) = final_stage("HEALTHCHECK")
    assert "/healthz" in healthcheck
    runs = " ".join(arguments for stage in stages for kw, arguments in stage if kw == "RUN")
    assert "--no-deps -r /tmp/requirements.lock" in runs
    assert "pip check" in runs
    copies = final_stage("COPY")
    assert any(copy.endswith("app ./app") for copy in copies)
    assert any(copy.endswith("alembic ./alembic") for copy in copies)
    env = " ".join(final_stage("ENV"))
    assert "CONNECTORS_PORT=8000" in env
    assert final_stage("EXPOSE") == ["8000"]


def test_the_lock_pins_every_runtime_dependency() -> None:
    import tomllib

    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"not pinned: {line}"
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dependency in project["dependencies"]:
        requirement = Requirement(dependency)
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned is not None, f"{requirement.name} is not in requirements.lock"
        assert requirement.specifier.contains(pinned), f"{requirement.name}=={pinned} breaks {requirement}"
