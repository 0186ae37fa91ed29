"""Schemathesis over the full OpenAPI document, with a valid admin key, on PostgreSQL.

Stateless: every operation gets generated valid and invalid requests (fixed seed, bounded number
of examples). Every answer must be a non-5xx status that the document lists, with the documented
content type, headers and schema; errors are problem+json. Nothing leaves loopback: name
resolution is stubbed to refuse every non-loopback host, so connection tests, webhook checks and
`send` probes that a generated body points elsewhere fail before any packet is sent.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis.stateful import run_state_machine_as_test
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy.engine import Engine

from api.app import create_app
from connector import admin_keys
from connector.actions.registry import BY_KEY
from connector.actions.schemas import ReceiveInput
from connector.payments.context_loader import load_connection
from connector.payments.receive import create_request
from connector.runtime import Runtime
from connector.settings import Settings
from connector.storage.db import make_engine, transaction
from connector.vault import MasterKeyRing
from tests.fixtures.db import _truncate, create_schema

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def _loopback_only_resolver(real: Any) -> Any:
    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host or "")
        if name != "localhost":
            try:
                if not ipaddress.ip_address(name.strip("[]")).is_loopback:
                    raise socket.gaierror(socket.EAI_NONAME, "test: non-loopback address")
            except ValueError:
                raise socket.gaierror(socket.EAI_NONAME, "test: no DNS in tests") from None
        return real(host, *args, **kwargs)

    return getaddrinfo


@pytest.fixture(scope="module")
def pg_engine(pg_database: str) -> Iterator[Engine]:
    engine = make_engine(pg_database)
    create_schema(engine)
    _truncate(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def harness(
    pg_engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, str]]:
    settings_ = Settings(
        data_dir=Path(tmp_path_factory.mktemp("openapi")),
        master_keys=MasterKeyRing.generate_spec("t1"),
        webhook_allow_loopback=True,
        send_allow_loopback=True,
    )
    rt = Runtime(settings=settings_, engine=pg_engine)
    rt.dispatch = lambda task, args: None  # nothing runs: requests only
    with transaction(pg_engine) as s:
        _, key = admin_keys.create_key(s, name="schemathesis", scopes=["admin"])
    mp = pytest.MonkeyPatch()
    mp.setattr(socket, "getaddrinfo", _loopback_only_resolver(socket.getaddrinfo))
    yield create_app(runtime=rt), key
    mp.undo()


@pytest.fixture(scope="module")
def api_schema(harness: tuple[Any, str]) -> Any:
    app, _ = harness
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _document_app() -> Any:
    return create_app(runtime=Runtime(settings=Settings(), engine=make_engine("sqlite://")))


# Operation labels, read once at collection from the same document the app serves.
LABELS = [
    f"{method.upper()} {path}"
    for path, item in TestClient(_document_app()).get("/openapi.json").json()["paths"].items()
    for method in item
]
EXAMPLES = 12


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("label", LABELS)
def test_api_conforms_to_its_openapi(
    label: str, mode: GenerationMode, api_schema: Any, harness: tuple[Any, str]
) -> None:
    _run(api_schema, harness, label, mode, {})


@pytest.fixture(scope="module")
def seeded(harness: tuple[Any, str]) -> dict[str, str]:
    """Real ids, so generated requests reach the services behind the lookups, not only 404s."""
    app, key = harness
    client = TestClient(app)
    created = client.post(
        "/v1/admin/connections",
        headers={"authorization": f"Bearer {key}"},
        json={
            "name": "seeded",
            "network": "base-sepolia",
            "rpc_url": "http://127.0.0.1:9/",
            "facilitator_url": "http://127.0.0.1:9/",
            "webhook_url": "http://127.0.0.1:9/hook",
        },
    )
    assert created.status_code == 201, created.text
    connection_id = created.json()["id"]
    rt = app.state.runtime
    offer = create_request(rt, load_connection(rt, connection_id), ReceiveInput(amount="100"))
    return {"connection_id": connection_id, "request_id": offer.id}


SEEDED = [
    label
    for label in LABELS
    if ("{connection_id}" in label or "{request_id}" in label) and not label.startswith("DELETE")
]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("label", SEEDED)
def test_api_conforms_with_existing_resources(
    label: str,
    mode: GenerationMode,
    api_schema: Any,
    harness: tuple[Any, str],
    seeded: dict[str, str],
) -> None:
    fixed = {name: value for name, value in seeded.items() if "{" + name + "}" in label}
    if "{action}" in label:
        for action in sorted(BY_KEY):
            _run(api_schema, harness, label, mode, {**fixed, "action": action})
    else:
        _run(api_schema, harness, label, mode, fixed)


def _run(
    api_schema: Any, harness: tuple[Any, str], label: str, mode: GenerationMode, fixed: Any
) -> None:
    _, key = harness
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None

    # No worker runs here: a job never finishes, so waiting for it would only stall the run.
    # Each action has its own operation (…/actions/send, …) besides the generic {action} one.
    query = {"wait": 0} if "/actions/" in label else None
    strategy = operation.as_strategy(
        generation_mode=mode, path_parameters=fixed or None, query=query
    )

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,  # a fixed seed: the same requests on every run
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(strategy)
    def run(case: Any) -> None:
        case.call_and_validate(headers={"authorization": f"Bearer {key}"}, checks=CHECKS)

    try:
        run()
    except Unsatisfiable:
        # Nothing to negate: no parameters, or only free-form strings (any value is valid).
        assert mode is GenerationMode.NEGATIVE


def test_errors_are_documented_as_problem_json_and_docs_can_authorize() -> None:
    document = TestClient(_document_app()).get("/openapi.json").json()
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path, item in document["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "application/problem+json" in responses["default"]["content"], (method, path)
            for status, response in responses.items():
                report = path == "/healthz" and status == "503"  # the health report itself
                if status.startswith(("4", "5")) and status not in ("402", "410") and not report:
                    assert list(response["content"]) == ["application/problem+json"], (
                        method,
                        path,
                        status,
                    )
            public = (
                "/pay/",
                "/healthz",
                "/metrics",
                "/openapi",
                "/docs",
                "/redoc",
                "/v1/manifest",
            )
            if not path.startswith(public):
                assert operation["security"] == [{"bearerAuth": []}], (method, path)
                # The failed-authentication limit can answer any keyed operation.
                assert "Retry-After" in responses["429"]["headers"], (method, path)


def test_api_conforms_in_stateful_sequences(api_schema: Any, harness: tuple[Any, str]) -> None:
    """Stateful: schemathesis infers links between operations (a created connection's id fed to
    its reads, updates and actions, …) and runs sequences of calls. Every answer of every step
    passes the same checks as the stateless run."""
    _, key = harness
    machine = api_schema.as_state_machine()
    seen: list[tuple[str, int]] = []

    class Workflow(machine):  # type: ignore[misc,valid-type]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"headers": {"authorization": f"Bearer {key}"}}

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            seen.append((case.operation.label, response.status_code))
            case.validate_response(response, checks=CHECKS)

    run_state_machine_as_test(
        Workflow,
        settings=settings(
            max_examples=EXAMPLES * 3,
            stateful_step_count=8,
            derandomize=True,  # a fixed seed
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        ),
    )
    # The run really walked the API: many operations, several of them answered with success.
    operations = {label for label, _ in seen}
    succeeded = {label for label, status in seen if status < 300}
    assert len(operations) >= 10, seen
    assert len(succeeded) >= 3, seen
