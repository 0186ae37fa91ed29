"""docker-compose.yml, checked without a docker binary.

The file is interpolated from `.env.example` as Compose would, validated against the vendored
Compose Specification JSON Schema, and then held to our own rules: every x402c command and option
exists, secrets are files that reach only the services that need them, every long-running
service has a healthcheck, Flower is not open to the world, the image build skips local state.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "tests" / "fixtures" / "compose" / "compose-spec.json"

# Values only the API and the workers may see.
SECRET_ENV = {"X402C_MASTER_KEYS", "X402C_DATABASE_URL", "X402C_DATABASE_PASSWORD_FILE",
              "X402C_MASTER_KEY_FILE", "POSTGRES_PASSWORD"}  # fmt: skip
_VAR = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\})")


class InterpolationError(ValueError):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution: ``$$``, ``${V}``, ``${V:-d}``, ``${V-d}``, ``${V:?e}``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        have = name in env
        empty = not env.get(name)
        if op in (":-", "-"):
            return arg if (empty if op == ":-" else not have) else env[name]
        if op in (":?", "?"):
            if empty if op == ":?" else not have:
                raise InterpolationError(f"{name}: {arg}")
            return env[name]
        return env.get(name, "")

    return _VAR.sub(sub, value)


def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            env[key.strip()] = value.strip()
    return env


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE.read_text())  # resolves anchors and `<<` merge keys
    doc: dict[str, Any] = interpolate(raw, read_env_file(ROOT / ".env.example") if env is None
                                      else env)  # fmt: skip
    return doc


def schema_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def long_running(service: dict[str, Any]) -> bool:
    return service.get("restart") != "no"


# ------------------------------------------------------------------------------------- tests


def test_compose_file_matches_the_compose_specification() -> None:
    assert schema_errors(load_compose()) == []


def test_schema_check_catches_a_broken_file() -> None:
    """The validator is not a rubber stamp: typical mistakes are reported."""
    doc = load_compose()
    broken = copy.deepcopy(doc)
    broken["services"]["api"]["healthcheck"]["intervall"] = "10s"  # misspelt key
    assert any("intervall" in e for e in schema_errors(broken))
    broken = copy.deepcopy(doc)
    broken["services"]["worker"]["depends_on"] = "redis"  # must be a list or a mapping
    assert schema_errors(broken)
    broken = copy.deepcopy(doc)
    broken["secrets"]["master_keys"] = {"file": 42}
    assert schema_errors(broken)


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("$${HOSTNAME} ${SET} ${NOPE:-d} ${EMPTY:-d} ${EMPTY-d}", env) == (
        "${HOSTNAME} x d d "
    )
    with pytest.raises(InterpolationError):
        interpolate("${EMPTY:?needed}", env)
    # The file needs the public URL from .env: without it Compose refuses, and so do we.
    with pytest.raises(InterpolationError, match="X402C_PUBLIC_BASE_URL"):
        load_compose(env={})


def test_compose_uses_real_cli_commands_and_options() -> None:
    from typer.main import get_command

    from api.cli import app

    cli = get_command(app)
    known = cli.commands  # type: ignore[attr-defined]
    checked = 0
    for name, service in load_compose()["services"].items():
        command = service.get("command")
        if not command or command[0] != "x402c":
            continue
        assert command[1] in known, f"service {name} runs unknown command {command[1]}"
        options = {o for p in known[command[1]].params for o in p.opts}
        for arg in command[2:]:
            if arg.startswith("--"):
                assert arg in options, f"service {name}: {command[1]} has no option {arg}"
        checked += 1
    assert checked >= 6


def test_every_x402c_variable_in_compose_is_a_real_setting() -> None:
    from connector.settings import Settings

    fields = {f"X402C_{n.upper()}" for n in Settings.model_fields}
    for name, service in load_compose()["services"].items():
        for var in env_of(service):
            if var.startswith("X402C_"):
                assert var in fields, f"service {name} sets unknown setting {var}"


def test_secrets_are_files_and_reach_only_the_services_that_need_them() -> None:
    doc = load_compose()
    declared = doc["secrets"]
    assert set(declared) >= {"master_keys", "postgres_password"}
    for name, spec in declared.items():
        assert set(spec) == {"file"}, f"secret {name} must come from a file"
        assert spec["file"].startswith("./secrets/")
    needs_keys = {"api", "worker"}
    needs_db = {"api", "worker", "migrate", "postgres", "beat"}  # beat-health reads beat_ticks
    for name, service in doc["services"].items():
        assert "env_file" not in service, f"{name}: env_file hands every variable to the container"
        used = set(service.get("secrets", []))
        assert used <= set(declared), f"{name} uses undeclared secrets {used - set(declared)}"
        assert ("master_keys" in used) == (name in needs_keys), name
        assert ("postgres_password" in used) == (name in needs_db), name
        env = env_of(service)
        assert not (set(env) & {"X402C_MASTER_KEYS", "POSTGRES_PASSWORD"}), (
            f"{name}: a secret in plain environment"
        )
        if name not in needs_db:
            assert not (set(env) & SECRET_ENV), f"{name} gets database or vault settings"
        for value in env.values():
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", value), f"{name}: password in a URL"
    postgres_env = env_of(doc["services"]["postgres"])
    assert postgres_env["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    app_env = env_of(doc["services"]["api"])
    assert app_env["X402C_MASTER_KEY_FILE"] == "/run/secrets/master_keys"
    assert app_env["X402C_DATABASE_PASSWORD_FILE"] == "/run/secrets/postgres_password"


def test_every_long_running_service_has_a_healthcheck() -> None:
    doc = load_compose()
    for name, service in doc["services"].items():
        if not long_running(service):
            continue
        check = service.get("healthcheck") or {}
        assert not check.get("disable") and check.get("test"), f"{name} has no healthcheck"
    names = set(doc["services"])
    for name, service in doc["services"].items():
        deps = service.get("depends_on") or {}
        assert set(deps) <= names, f"{name} depends on an unknown service"


def test_worker_healthcheck_pings_its_own_node() -> None:
    test = " ".join(load_compose()["services"]["worker"]["healthcheck"]["test"])
    assert "inspect ping" in test
    # `$$HOSTNAME` in the file is `$HOSTNAME` for the shell: the container's own node name.
    assert re.search(r"--destination celery@\$HOSTNAME\b", test), test


def test_flower_is_neither_public_nor_open() -> None:
    flower = load_compose()["services"]["flower"]
    for port in flower.get("ports", []):
        assert str(port).startswith("127.0.0.1:"), f"flower published beyond loopback: {port}"
    command = " ".join(flower.get("entrypoint", []) + flower.get("command", []))
    assert "FLOWER_BASIC_AUTH=" in command and "/run/secrets/flower_password" in command
    assert flower.get("secrets") == ["flower_password"]


def test_dockerignore_keeps_local_state_and_secrets_out_of_the_image() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".devtools", ".x402c", ".env", "secrets", ".git"} <= ignored
    assert "secrets/" in (ROOT / ".gitignore").read_text().split()


def test_env_example_holds_no_secrets() -> None:
    env = read_env_file(ROOT / ".env.example")
    assert not (set(env) & SECRET_ENV)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="optional: docker-compose")
def test_docker_compose_binary_agrees(tmp_path: Path) -> None:  # pragma: no cover - optional
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    (tmp_path / "secrets").mkdir()
    for name in ("master.keys", "postgres_password", "flower_password"):
        (tmp_path / "secrets" / name).write_text("x\n")
    check = subprocess.run(
        ["docker-compose", "config", "-q"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("X402C_")},
    )
    assert check.returncode == 0, check.stderr


def test_database_password_comes_from_its_secret_file(tmp_path: Path) -> None:
    from connector.settings import Settings

    secret = tmp_path / "postgres_password"
    secret.write_text("s3cr:t/pw\n")
    settings = Settings(
        database_url="postgresql+psycopg://x402c@postgres:5432/x402c",
        database_password_file=secret,
    )
    from sqlalchemy.engine import make_url

    url = make_url(settings.resolved_database_url)
    assert url.password == "s3cr:t/pw" and url.username == "x402c" and url.host == "postgres"
