"""KVdb visitors counter in Python (componentize-py), world `kvdb:script/script`.

Behaves like the Lua script from API.md:

    local key = os.date("visitors:%Y-%m-%d")
    local err = kvdb.incr(key, 1)
    if err then
      kvdb.say("error incrementing: " .. err)
      kvdb.exit(500)
    end
    local value = kvdb.get(key)
    kvdb.say(value)
"""

import time

import wit_world
from componentize_py_types import Err
from wit_world.imports import kv
from wit_world.imports.types import (
    Error,
    Error_Internal,
    Error_InvalidInput,
    Error_Limit,
    Error_NotFound,
    Error_PermissionDenied,
    Error_TypeMismatch,
    Number_Integer,
    Request,
    Response,
    Value,
    Value_Float,
    Value_Integer,
    Value_Json,
    Value_Raw,
)

TEXT = "text/plain; charset=utf-8"


def error_text(e: Error) -> str:
    """The text the Lua runtime gives for an error (the host's `CallError`)."""
    if isinstance(e, Error_NotFound):
        return "not found"
    if isinstance(e, Error_PermissionDenied):
        return "permission denied: " + e.value
    if isinstance(e, Error_TypeMismatch):
        return "type mismatch: " + e.value
    if isinstance(e, Error_Limit):
        return "limit exceeded: " + e.value
    if isinstance(e, Error_InvalidInput):
        return "invalid input: " + e.value
    if isinstance(e, Error_Internal):
        return "internal error: " + e.value
    return str(e)


def value_bytes(v: Value | None) -> bytes:
    """A value as `kvdb.say` writes it."""
    if v is None:
        return b"nil"
    if isinstance(v, Value_Raw):
        return v.value
    if isinstance(v, Value_Integer):
        return str(v.value).encode()
    if isinstance(v, Value_Float):
        # Lua 5.4's `tostring` of a float: "%.14g", with ".0" on whole numbers.
        s = "%.14g" % v.value
        if s.lstrip("-").isdigit():
            s += ".0"
        return s.encode()
    if isinstance(v, Value_Json):
        return v.value.encode("utf-8")
    return str(v).encode("utf-8")


def text(status: int, body: bytes) -> Response:
    return Response(status=status, headers=[("content-type", TEXT)], body=body)


class WitWorld(wit_world.WitWorld):
    def handle(self, request: Request) -> Response:
        key = time.strftime("visitors:%Y-%m-%d", time.gmtime())
        try:
            kv.incr(key, Number_Integer(1))
        except Err as e:
            return text(500, ("error incrementing: " + error_text(e.value) + "\n").encode("utf-8"))
        try:
            value = kv.get(key)
        except Err:
            # Lua's `kvdb.get` gives nil and an error; `kvdb.say(nil)` prints "nil".
            value = None
        return text(200, value_bytes(value) + b"\n")
