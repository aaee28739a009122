"""The request body size limit, enforced before a route reads the body."""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import Problem, problem_response


class BodyTooLarge(Problem):
    def __init__(self, limit: int, size: int | None = None):
        told = f"{size:,} bytes" if size is not None else "the body"
        super().__init__(413, "content-too-large", "Content too large",
                         f"{told} is over the limit of {limit:,} bytes")


class BodyLimitMiddleware:
    """Refuses a declared Content-Length over ``limit`` at once, and stops a chunked body as soon
    as it passes ``limit`` (the route then answers the 413 through the error handlers)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = problem_response(Request(scope), BodyTooLarge(self.limit, int(declared)))
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counting_receive, send)
