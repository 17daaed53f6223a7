"""KVdb hello script in Python (componentize-py), world `kvdb:script/script`.

Behaves like the Lua script from API.md:

    kvdb.say("Hello " .. kvdb.escape_html(kvdb.var.name))
"""

import wit_world
from wit_world.imports.types import Request, Response

TEXT = "text/plain; charset=utf-8"

# The escaping of the Rust `html-escape` crate's `encode_safe`
# (what `kvdb.escape_html` uses).
_ESCAPES = str.maketrans(
    {
        "&": "&amp;",
        "<": "&lt;",
        ">": "&gt;",
        '"': "&quot;",
        "'": "&#x27;",
        "/": "&#x2F;",
    }
)


def escape_html(s: str) -> str:
    return s.translate(_ESCAPES)


def var(request: Request, name: str) -> str | None:
    """`kvdb.var.NAME`: the last value wins, as in the Lua table."""
    found = None
    for k, v in request.vars:
        if k == name:
            found = v
    return found


class WitWorld(wit_world.WitWorld):
    def handle(self, request: Request) -> Response:
        name = var(request, "name") or ""
        body = "Hello " + escape_html(name) + "\n"
        return Response(
            status=200,
            headers=[("content-type", TEXT)],
            body=body.encode("utf-8"),
        )
