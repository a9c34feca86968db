"""Request errors: small named exceptions, one handler that turns them into a JSON body.

Once a stream has begun, errors travel as events instead (see relay.py).
"""

from __future__ import annotations

from typing import ClassVar

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from shared.cursors import is_job_id

CATCH_ALL = "not-a-job"  # the name of the route that answers 404 for other /chat/ paths


class ApiError(Exception):
    status = 400
    retry_after: int | None = None
    headers: ClassVar[dict[str, str]] = {}
    param: str | None = None  # for the OpenAI API's error shape: the field at fault
    code: str | None = None

    def __init__(
        self, message: str, param: str | None = None, details: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param
        # Keys beside "error" for programs, so none has to parse the words (409's job_id).
        self.details = details or {}


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": 'Bearer realm="streamgate"'}


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class PromptTooLong(ApiError):
    status = 413


class RateLimited(ApiError):
    status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(ApiError):
    status = 503
    retry_after = 5


OPENAI_PREFIX = "/v1/"
# The OpenAI API's error types by status (its SDKs raise by status; the type is for people).
OPENAI_TYPES = {
    401: "authentication_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
OPENAI_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


def error_response(
    status: int,
    message: str,
    retry_after: int | None = None,
    request: Request | None = None,
    param: str | None = None,
    code: str | None = None,
    details: dict[str, str] | None = None,
) -> JSONResponse:
    """The JSON error: ``{"error": message, **details}``, or under /v1/ the OpenAI API's
    shape (which has no room for ``details``)."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    openai = request is not None and request.url.path.startswith(OPENAI_PREFIX)
    body = error_body(status, message, openai, param, code)
    if not openai and details:
        body = {**details, **body}  # the words stay the words
    return JSONResponse(body, status_code=status, headers=headers)


def error_body(
    status: int, message: str, openai: bool, param: str | None = None, code: str | None = None
) -> dict[str, object]:
    """An error's JSON: ``openai`` (a path under /v1/), the OpenAI API's shape."""
    if not openai:
        return {"error": message}
    return {
        "error": {
            "message": message,
            "type": OPENAI_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code or OPENAI_CODES.get(status),
        }
    }


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    response = error_response(
        exc.status,
        exc.message,
        exc.retry_after,
        request,
        param=exc.param,
        code=exc.code,
        details=exc.details,
    )
    response.headers.update(exc.headers)
    for name, value in exc.details.items():  # as headers too: a HEAD's answer has no body
        response.headers["Streamgate-" + name.replace("_", "-").title()] = value
    return response


async def handle_redis_down(request: Request, exc: Exception) -> Response:
    return error_response(
        503,
        "Redis is unreachable (the Redis, or the shard, this request needs), so it cannot"
        " be served now; retry shortly",
        5,
        request,
    )


async def handle_redis_full(request: Request, exc: Exception) -> Response:
    return error_response(
        503,
        "Redis is out of memory (maxmemory, noeviction); retry once old streams expire",
        30,
        request,
    )


def allowed_methods(request: Request) -> set[str]:
    """Every method some route serves at this path: Starlette's 405 names only the first
    route's (``PUT /chat`` said ``GET, HEAD``; ``POST`` is served there too)."""
    path = request.scope["path"]
    allowed: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Mount) and route.path_regex.match(path):
            allowed |= {"GET", "HEAD"}  # the one mount serves static files
        if not isinstance(route, Route) or route.name == CATCH_ALL:
            continue
        match = route.path_regex.match(path)
        # A job URL with something else for a job id names no job: a 404, whatever the method.
        if match and is_job_id(match.groupdict().get("job_id", "0" * 32)):
            allowed |= route.methods or set()
    return allowed


def method_not_allowed() -> HTTPException:
    return HTTPException(405)
