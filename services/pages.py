"""The web pages the Gateway serves, and the standalone HTML of one trace (`vigorl demo`).

- `GET /`: the demo page: pick or drop an image, ask, see the `/v1/grounded` answer drawn (services/web/).
- `GET /browse`: a predictions/rollouts file browser (the file is read in the browser, never uploaded).
- `GET /web/<file>`: their scripts and style sheet.

Plain HTML, CSS and JavaScript shipped in the package: no build step, no CDN, so the pages work offline.
The pages need no token (they hold no data); the API calls they make carry the token typed on the page.

    add_pages(app)                                    # on the Gateway's FastAPI app
    html = standalone_html(response, image_data_url)  # one self-contained file: styles, script and data inline
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, Response

WEB_DIR = Path(__file__).resolve().parent / "web"
PAGES = {"/": "index.html", "/browse": "browse.html"}
ASSET_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


def _read(name: str) -> str:
    return (WEB_DIR / name).read_text(encoding="utf-8")


def add_pages(app: FastAPI) -> None:
    """Register GET /, /browse and /web/<file> on `app` (files are read per request: small, and edits show)."""
    for route, name in PAGES.items():
        app.add_api_route(route, lambda name=name: HTMLResponse(_read(name)), methods=["GET"],
                          include_in_schema=False)

    @app.get("/web/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        path = WEB_DIR / name
        if path.suffix not in ASSET_TYPES or path.parent != WEB_DIR or not path.is_file():
            raise HTTPException(404, f"no such file: web/{name}")
        return Response(path.read_text(encoding="utf-8"), media_type=ASSET_TYPES[path.suffix])


def _inline(data: Any) -> str:
    # JSON inside <script>: "</" would end the element early (model text can hold anything).
    return json.dumps(data).replace("</", "<\\/")


def standalone_html(response: dict[str, Any], image_url: str | None, title: str = "vigorl trace",
                    meta: dict[str, str] | None = None) -> str:
    """One HTML file showing `response` (a /v1/grounded answer) over `image_url` (a data URL) exactly as the
    demo page does, with nothing to fetch."""
    from html import escape

    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f"<style>\n{_read('view.css')}</style>\n</head>\n<body>\n<header><h1>{escape(title)}</h1></header>\n"
            f'<main><div id="view"></div></main>\n<script>\n{_read("view.js")}</script>\n<script>\n'
            f"Vigorl.renderTrace(document.getElementById('view'), {_inline(response)}, {_inline(image_url)}, "
            f"{{meta: {_inline(meta or {})}}});\n</script>\n</body>\n</html>\n")
