-- Hello from API.md, the Lua twin of src/lib.rs: the same bytes for the
-- same request ("Hello <escaped name>\n", text/plain; charset=utf-8).
kvdb.say("Hello " .. kvdb.escape_html(kvdb.var.name))
