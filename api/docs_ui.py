"""`/docs` and `/redoc` served entirely from this process: no CDN, works offline.

FastAPI's default pages load Swagger UI and ReDoc from a CDN, so on a laptop without network (or
behind a strict egress policy) `/docs` is a blank page. The assets come from the
``fastapi-offline`` package (Swagger UI 5, which renders OpenAPI 3.1, and ReDoc) and are served
under ``/static/docs``; our own static files (the manifest icon) live under ``/static``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

OWN_STATIC = Path(__file__).parent / "static"
DOCS_ASSETS_URL = "/static/docs"


def ui_assets_dir() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def install_docs(app: FastAPI) -> None:
    """Mount the UI assets and the two pages; the app must be built with docs_url=None."""
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=ui_assets_dir()), name="docs-assets")
    app.mount("/static", StaticFiles(directory=OWN_STATIC), name="static")
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} — API docs",
            oauth2_redirect_url=oauth2_redirect,
            swagger_js_url=f"{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url="/static/x402.svg",
            # The default validator badge would fetch an image from the internet.
            swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": True},
        )

    @app.get(oauth2_redirect, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} — API reference",
            redoc_js_url=f"{DOCS_ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url="/static/x402.svg",
            with_google_fonts=False,
        )
