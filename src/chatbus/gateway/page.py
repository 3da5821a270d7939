"""The web chat page: plain HTML, CSS and JavaScript shipped in the package (no CDN, no
build step), so that it works offline. It talks to the sessions API and `/api/tags`."""

from importlib import resources

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse

OLLAMA_IS_RUNNING = "Ollama is running"
"""What Ollama's server answers at `/`: its clients (the `ollama` CLI among them) probe a
server there."""

_FILES = resources.files("chatbus.gateway") / "web"
_POLICY = "default-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'"


def page_routes() -> APIRouter:
    """`/`, and the page's script and style under `/web/`."""
    router = APIRouter(include_in_schema=False)

    @router.api_route("/", methods=["GET", "HEAD"])
    async def root(request: Request) -> Response:
        """The page for a browser, which asks for HTML (`Accept: text/html`); for any other
        client Ollama's answer."""
        if wants_html(request.headers.get("accept", "")):
            response = _file("index.html", "text/html; charset=utf-8")
        else:
            response = PlainTextResponse(OLLAMA_IS_RUNNING)
        response.headers["Vary"] = "Accept"
        return response

    @router.get("/web/chat.js")
    async def script() -> Response:
        return _file("chat.js", "text/javascript; charset=utf-8")

    @router.get("/web/chat.css")
    async def style() -> Response:
        return _file("chat.css", "text/css; charset=utf-8")

    return router


def wants_html(accept: str) -> bool:
    """Whether an `Accept` header names HTML itself: a browser's does when it opens a page;
    `*/*` (curl, HTTP libraries) does not."""
    media_types = (offered.partition(";")[0].strip().lower() for offered in accept.split(","))
    return "text/html" in media_types


def _file(name: str, media_type: str) -> Response:
    return Response(
        (_FILES / name).read_bytes(),
        media_type=media_type,
        headers={"Cache-Control": "no-cache", "Content-Security-Policy": _POLICY},
    )
