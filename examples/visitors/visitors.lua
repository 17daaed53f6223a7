-- The visitors counter of API.md, the Lua twin of src/lib.rs: the same
-- bytes for the same request. `!` asks os.date for UTC, as the Rust guest
-- uses (API.md's original uses the server's local time zone).
local key = os.date("!visitors:%Y-%m-%d")
local err = kvdb.incr(key, 1)
if err then
  kvdb.say("error incrementing: " .. err)
  kvdb.exit(500)
end
local value = kvdb.get(key)
kvdb.say(value)
