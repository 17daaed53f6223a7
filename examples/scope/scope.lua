-- The scope example of the original KVdb description, the Lua twin of
-- src/lib.rs: the same bytes for the same request.
-- only allow writing to a subset of the database
kvdb.scope.prefix = "users:1:"
kvdb.scope.permissions = {"write"}

local err = kvdb.set("users:1:name", "bob")
kvdb.say("users:1:name: ", err or "ok")
err = kvdb.set("users:2:name", "kim") -- this will fail
kvdb.say("users:2:name: ", err or "ok")
