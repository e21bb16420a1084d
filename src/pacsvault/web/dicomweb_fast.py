"""The QIDO-RS searches without a path parameter, answered without FastAPI's routing and
dependency resolution (issue 17: "route dependencies out of the hot path").

Why: a viewer's study list is one ``GET /dicom-web/studies`` after another. FastAPI spends
some 0.2 ms of server CPU on each (route matching through the included routers, dependency
solving, its wrappers; measured 3.44 -> 3.22 and 3.85 -> 3.58 ms a request, ``bench.qido_cpu
--pair``) on what ``_route`` does in four lines: the same role check
(``dicomweb.PHYSICIAN``, the very ``RoleRequirement`` the routes declare, so tokens,
share sessions and browser sessions are decided by the same code at the same moment), the
same handler (``dicomweb.search_*``) and the same exception handlers as the app's
(``ExceptionMiddleware`` built from ``app.exception_handlers``, as FastAPI builds it).

It is the innermost of the app's own middlewares: the trusted-network gate, the security
headers and the session (with its CSRF rule) have run. Only an exact ``GET`` of one of the
three paths is taken; anything else (another method, a trailing slash, a path parameter)
goes on to the router unchanged. The routes stay declared in ``dicomweb`` (the route
inventory test walks them) and answer the same requests identically.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from pacsvault.web import dicomweb
from pacsvault.web.asgi import HttpMiddleware
from pacsvault.web.principal import Principal

Handler = Callable[[Request, Principal], Awaitable[Response]]

SEARCHES: dict[str, Handler] = {
    "/dicom-web/studies": dicomweb.search_studies,
    "/dicom-web/series": dicomweb.search_series,
    "/dicom-web/instances": dicomweb.search_instances,
}


class SearchFastPath(HttpMiddleware):
    """``GET`` of a path of ``SEARCHES``: role check, handler, the app's exception handlers."""

    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app)
        self._exceptions: tuple[object, ExceptionMiddleware] | None = None

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        search = SEARCHES.get(scope["path"]) if scope["method"] == "GET" else None
        if search is None or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        await self.answer(search, scope, receive, send)

    async def answer(self, search: Handler, scope: Scope, receive: Receive,
                     send: Send) -> None:
        """What the route does, inside the app's exception handlers."""
        scope["pacsvault.search"] = search
        await self._handled(scope)(scope, receive, send)

    def _handled(self, scope: Scope) -> ExceptionMiddleware:
        """``_route`` inside an ``ExceptionMiddleware`` with the app's handlers, as
        ``FastAPI.build_middleware_stack`` makes it (500 and ``Exception`` stay with the
        outermost layer, which answers them as before)."""
        application = scope["app"]
        if self._exceptions is None or self._exceptions[0] is not application:
            handlers = {key: value for key, value in application.exception_handlers.items()
                        if key not in (500, Exception)}
            self._exceptions = (application, ExceptionMiddleware(_route, handlers=handlers))
        return self._exceptions[1]


async def _route(scope: Scope, receive: Receive, send: Send) -> None:
    """The route's dependency (the same ``RoleRequirement``), then its handler."""
    request = Request(scope, receive, send)
    search: Handler = scope["pacsvault.search"]
    who = await dicomweb.PHYSICIAN(request)
    response = await search(request, who)
    await response(scope, receive, send)
