"""`/docs` and `/redoc` render without network: every asset they reference is served here.

No browser is available to the suite, so the check is structural and strict: the pages name no
remote URL at all, each `src`/`href`/spec URL they name answers 200 from this app with the
right content type, and the Swagger UI served is one that renders OpenAPI 3.1 (what FastAPI
emits). The manifest's icon is served the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from connector.settings import Settings
from connector.vault import MasterKeyRing

_REFS = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|url:\s*'([^']+)'""")
_EXPECTED_TYPES = {".js": "javascript", ".css": "text/css", ".svg": "image/svg+xml",
                   ".json": "application/json"}  # fmt: skip


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path, master_keys=MasterKeyRing.generate_spec("t1"))
    with TestClient(create_app(settings)) as c:
        yield c


def references(html: str) -> list[str]:
    return [a or b for a, b in _REFS.findall(html)]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_page_assets_are_all_local(client: TestClient, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200
    html = response.text
    assert not re.search(r"https?://", html), "the page names a remote URL"
    refs = references(html)
    assert "/openapi.json" in refs
    assert any(r.endswith(".js") for r in refs), refs
    for ref in refs:
        assert urlparse(ref).netloc == "" and ref.startswith("/"), ref
        asset = client.get(ref)
        assert asset.status_code == 200, ref
        suffix = Path(urlparse(ref).path).suffix
        if suffix in _EXPECTED_TYPES:
            assert _EXPECTED_TYPES[suffix] in asset.headers["content-type"], ref
        assert len(asset.content) > 0


def test_swagger_ui_served_renders_openapi_3_1(client: TestClient) -> None:
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    bundle = next(r for r in references(client.get("/docs").text) if r.endswith(".js"))
    # Swagger UI < 5 shows "Unable to render this definition" for 3.1 documents.
    assert "isOAS31" in client.get(bundle).text


def test_swagger_ui_does_not_call_the_online_validator(client: TestClient) -> None:
    assert '"validatorUrl": null' in client.get("/docs").text


def test_manifest_icon_is_served(client: TestClient) -> None:
    icon = client.get("/v1/manifest").json()["icon"]
    response = client.get(urlparse(icon).path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("image/svg+xml")
    assert b"<svg" in response.content
