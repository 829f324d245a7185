"""OpenAI's request body and error shape, read the same way by the activator (cold /v1 requests)
and the built-in runtime (warm ones): one parser, so both refuse the same bodies with the same
words."""

from __future__ import annotations

import json
from typing import Any


class OpenAIError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code

    def body(self) -> dict[str, Any]:
        return error_body(str(self), self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"null")
    except RecursionError:  # json's C decoder recurses per level: 10,000 '[' exhaust the stack
        raise OpenAIError(400, "We could not parse the JSON body of your request: it is nested too deeply") from None
    except ValueError as e:
        raise OpenAIError(400, f"We could not parse the JSON body of your request: {e}") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object")
    return body


def body_model(body: dict[str, Any]) -> str:
    m = body.get("model")
    if not isinstance(m, str) or not m:
        raise OpenAIError(400, "you must provide a model parameter (a string)", param="model", code="missing_required_parameter" if m is None else None)
    return m
