"""The API's interactive documentation, served from this machine.

FastAPI's default /docs page loads Swagger UI from a CDN; in a museum's closed network (and
here) that page stays blank. Swagger UI's files come instead from the installed
``swagger-ui-bundle-v2`` package (Swagger UI 5, which reads the OpenAPI 3.1 document FastAPI
writes) and are served under /docs/assets. ReDoc has no such package, so /redoc is off.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"


def swagger_ui_dir() -> Path:
    """The folder holding Swagger UI's bundle, CSS and icons (from swagger-ui-bundle-v2)."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError as exc:
        raise RuntimeError(
            "the API docs need Swagger UI's files: pip install 'swagger-ui-bundle-v2==5.31.0' "
            "(`make install` does)"
        ) from exc
    return Path(swagger_ui_path)


def install(app: FastAPI) -> None:
    """Serve Swagger UI at /docs with its assets from the installed package.

    The app must be created with ``docs_url=None`` and ``redoc_url=None``.
    """
    assets = swagger_ui_dir()
    app.mount(ASSETS_PATH, StaticFiles(directory=assets), name="docs-assets")

    @app.get(DOCS_PATH, include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} — API",
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon-32x32.png",
        )
