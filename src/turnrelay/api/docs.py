"""``GET /openapi.json`` and ``GET /docs``: the document, and a page that
renders it. The page is one file of the package (``web/docs.html``) with no
script or style from elsewhere, so it works offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

DOCS_PAGE = Path(__file__).resolve().parent.parent / "web" / "docs.html"


class DocsRoutes:
    def __init__(self, document: dict[str, Any]) -> None:
        self._document = JSONResponse(document).body  # rendered once
        self._page = DOCS_PAGE.read_bytes()

    async def openapi(self, request: Request) -> Response:
        return Response(self._document, media_type="application/json")

    async def page(self, request: Request) -> Response:
        return HTMLResponse(self._page)
