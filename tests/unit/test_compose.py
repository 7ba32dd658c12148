"""Static checks of the Docker deployment: docker-compose.yml, Dockerfile and .dockerignore.

Docker does not run on the development machines, so nothing here starts a container. Instead
the files are checked against the code they drive: every app command must parse with the real
`triage` parser, every TRIAGE_* variable must be a real setting, and the wiring between services
(dependencies, volumes, host names) must be consistent.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from triage.bus.settings import SettingsError
from triage.cli import build_parser
from triage.settings import Settings, settings_rows

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
APP_SERVICES = sorted(name for name, spec in SERVICES.items() if "build" in spec)

# The `triage` subcommand each app service is meant to run. A new app service must be added
# here, which makes whoever adds it say what it is for.
EXPECTED_COMMAND = {
    "init-topics": "topics",
    "init-data": "datagen",
    "init-model": "train",
    "consumer": "consume",
    "windows": "windows",
    "replay": "replay",
    "drift-monitor": "drift",
    "gateway": "serve",
}
DEPENDS_ON_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def _environment(spec: dict[str, Any]) -> dict[str, str]:
    """A service's environment, from either the mapping or the `- KEY=value` list form."""
    env = spec.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def _depends_on(spec: dict[str, Any]) -> dict[str, str]:
    """Dependency -> condition, from either the short (list) or the long (mapping) form."""
    deps = spec.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (opts or {}).get("condition", "service_started") for name, opts in deps.items()}


def _mounts(spec: dict[str, Any]) -> list[tuple[str, PurePosixPath]]:
    """(source, target) of each volume, from either the short or the long syntax."""
    mounts = []
    for volume in spec.get("volumes") or []:
        if isinstance(volume, dict):
            mounts.append((str(volume.get("source", "")), PurePosixPath(volume["target"])))
        else:
            parts = str(volume).split(":")
            source, target = (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])
            mounts.append((source, PurePosixPath(target)))
    return mounts


def _parse(service: str, capsys: pytest.CaptureFixture[str]) -> Any:
    command = SERVICES[service].get("command")
    assert isinstance(command, list) and all(isinstance(arg, str) for arg in command), (
        f"service {service!r}: `command` must be a YAML list of strings (the argv after the "
        f"image's `triage` entrypoint), got {command!r}")
    try:
        return build_parser().parse_args(command)
    except SystemExit as exc:
        # argparse prints its usage, then the one line that says what is wrong.
        lines = capsys.readouterr().err.strip().splitlines()
        message = lines[-1] if lines else "no message"
        pytest.fail(f"service {service!r}: `triage {shlex.join(command)}` is rejected by the "
                    f"triage CLI (exit {exc.code}): {message}")


# --- app commands ---------------------------------------------------------------------------

def test_app_services_are_the_expected_ones() -> None:
    unexpected = sorted(set(APP_SERVICES) - set(EXPECTED_COMMAND))
    missing = sorted(set(EXPECTED_COMMAND) - set(APP_SERVICES))
    assert not unexpected, (
        f"services {unexpected} are built from the Dockerfile but not in EXPECTED_COMMAND in "
        "this test; add each with the triage subcommand it runs")
    assert not missing, f"services {missing} are missing or no longer built from the Dockerfile"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_app_command_parses_with_the_triage_cli(
        service: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert "entrypoint" not in SERVICES[service], (
        f"service {service!r} overrides the image's `triage` entrypoint; keep one `triage` "
        "command per service so this test can check it")
    args = _parse(service, capsys)
    assert args.command == EXPECTED_COMMAND.get(service), (
        f"service {service!r} runs `triage {args.command}`, expected "
        f"`triage {EXPECTED_COMMAND.get(service)}`")


@pytest.mark.parametrize("service", APP_SERVICES)
def test_app_paths_are_on_mounted_volumes(
        service: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Data and models are handed between containers on volumes; a path the command uses but no
    volume holds would be a directory private to one container, lost when it exits."""
    args = _parse(service, capsys)
    targets = [target for _, target in _mounts(SERVICES[service])]
    for value in vars(args).values():
        if isinstance(value, Path) and value.is_absolute():
            path = PurePosixPath(value.as_posix())
            assert any(path == t or t in path.parents for t in targets), (
                f"service {service!r} uses {path}, which is on none of its volumes {targets}")


def test_named_volumes_are_declared() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    for name, spec in SERVICES.items():
        for source, target in _mounts(spec):
            if source and not source.startswith((".", "/", "~")):
                assert source in declared, (
                    f"service {name!r} mounts volume {source!r} at {target}, but the top-level "
                    f"`volumes:` declares only {sorted(declared)}")


# --- settings -------------------------------------------------------------------------------

def test_triage_variables_are_real_settings() -> None:
    known = {row[0] for row in settings_rows()}
    for name, spec in SERVICES.items():
        env = {k: v for k, v in _environment(spec).items() if k.startswith("TRIAGE_")}
        unknown = sorted(set(env) - known)
        assert not unknown, (
            f"service {name!r} sets {unknown}, which no setting reads (see `triage settings`)")
        try:
            Settings.from_env(env)
        except SettingsError as exc:
            pytest.fail(f"service {name!r}: {exc}")


@pytest.mark.parametrize("service", APP_SERVICES)
def test_app_services_point_at_the_compose_broker_and_registry(service: str) -> None:
    """Without TRIAGE_BOOTSTRAP_SERVERS a command would look for the embedded broker, which is
    not in the image's container; the host names must be services of this file."""
    env = _environment(SERVICES[service])
    bootstrap = env.get("TRIAGE_BOOTSTRAP_SERVERS", "")
    assert bootstrap, f"service {service!r} does not set TRIAGE_BOOTSTRAP_SERVERS"
    for server in bootstrap.split(","):
        host = server.rsplit(":", 1)[0]
        assert host in SERVICES, f"service {service!r}: broker host {host!r} is no service"
    registry = env.get("TRIAGE_SCHEMA_REGISTRY_URL", "")
    if registry:
        host = re.sub(r"^\w+://", "", registry).split("/")[0].rsplit(":", 1)[0]
        assert host in SERVICES, f"service {service!r}: registry host {host!r} is no service"
    assert env.get("TRIAGE_LOG_FORMAT") == "json", (
        f"service {service!r}: services log JSON lines (TRIAGE_LOG_FORMAT=json)")


# --- scaling and start-up order ---------------------------------------------------------------

def test_consumer_can_be_scaled() -> None:
    consumer = SERVICES["consumer"]
    assert "container_name" not in consumer, (
        "consumer has a container_name; `docker compose up --scale consumer=N` needs N names")
    assert not consumer.get("ports"), (
        "consumer publishes host ports; a second replica could not bind the same host port")


def test_depends_on_references_exist_and_conditions_hold() -> None:
    for name, spec in SERVICES.items():
        for dep, condition in _depends_on(spec).items():
            assert dep in SERVICES, f"service {name!r} depends on {dep!r}, which is no service"
            assert condition in DEPENDS_ON_CONDITIONS, (
                f"service {name!r}: unknown depends_on condition {condition!r} for {dep!r}")
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[dep], (
                    f"service {name!r} waits for {dep!r} to be healthy, but {dep!r} has no "
                    "healthcheck, so it never becomes healthy")
            if condition == "service_completed_successfully":
                assert SERVICES[dep].get("restart", "no") == "no", (
                    f"service {name!r} waits for {dep!r} to complete, but {dep!r} restarts")


def test_depends_on_has_no_cycle() -> None:
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"depends_on cycle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for dep in _depends_on(SERVICES.get(name, {})):
            visit(dep, (*path, name))
        done.add(name)

    for name in SERVICES:
        visit(name, ())


def test_infrastructure_has_healthchecks() -> None:
    for name in ("kafka", "schema-registry"):
        assert "healthcheck" in SERVICES[name], f"service {name!r} has no healthcheck"


# --- image --------------------------------------------------------------------------------------

def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))
    instructions = []
    for line in logical.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_entrypoint_is_triage() -> None:
    entrypoints = [args for keyword, args in _dockerfile_instructions() if keyword == "ENTRYPOINT"]
    assert entrypoints, "the Dockerfile has no ENTRYPOINT"
    # The exec (JSON) form: a shell form would run `triage` under /bin/sh -c, which neither
    # passes the compose `command` as arguments nor forwards SIGTERM.
    assert json.loads(entrypoints[-1]) == ["triage"]


def test_dockerfile_installs_the_pinned_runtime_requirements() -> None:
    runs = [args for keyword, args in _dockerfile_instructions() if keyword == "RUN"]
    installs = [shlex.split(run) for run in runs if "pip install" in run]
    assert any("-r" in argv and any(a.endswith("requirements.txt") and "dev" not in a
                                    for a in argv) for argv in installs), (
        "the Dockerfile must `pip install -r requirements.txt` (the runtime pins)")
    assert not any("requirements-dev.txt" in run for run in runs), (
        "the image must not install the test tools from requirements-dev.txt")
    assert any("--no-deps" in argv and "." in argv for argv in installs), (
        "the package itself must be installed with `pip install --no-deps .`, so that its "
        "dependencies are the pinned ones")


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = [args for keyword, args in _dockerfile_instructions() if keyword == "USER"]
    assert users, "the Dockerfile never switches away from root (no USER)"
    assert users[-1].split(":")[0] not in ("root", "0"), f"the image runs as {users[-1]!r}"


def test_dockerignore_lets_the_package_into_the_build_context() -> None:
    """.dockerignore is an allowlist; a package added to pyproject.toml but not re-included
    there would be silently missing from the image."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    included = {line[1:].strip().rstrip("/") for line in lines if line.startswith("!")}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = pyproject["tool"]["setuptools"]["package-dir"].values()  # triage.model: model/
    needed = {"pyproject.toml", "requirements.txt", *folders}
    if "*" in lines:
        missing = sorted(needed - included)
        assert not missing, f".dockerignore excludes {missing}, which the image build needs"
    else:
        excluded = {line.rstrip("/") for line in lines if line and not line.startswith("#")}
        assert not needed & excluded, f".dockerignore excludes {sorted(needed & excluded)}"
