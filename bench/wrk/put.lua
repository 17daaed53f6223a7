-- PUT a small value ("hello") on a fresh key for every request, so each write
-- creates a new key instead of overwriting a hot one.
--
-- usage: wrk -s put.lua URL -- STYLE PREFIX TAG
--   STYLE kvdb:   PUT  PREFIX/put-TAG-THREAD-N   with body "hello"  (PREFIX is "/BUCKET")
--   STYLE webdis: GET  /SET/put-TAG-THREAD-N/hello
-- TAG differs per run, so later rounds still write keys that do not exist yet.

local threads_made = 0

-- Runs in the main Lua state once per thread: give each thread its own id so
-- keys from different threads never collide.
function setup(thread)
  threads_made = threads_made + 1
  thread:set("tid", threads_made)
end

local style, prefix, tag
local n = 0

function init(args)
  style = args[1] or "kvdb"
  prefix = args[2] or ""
  tag = args[3] or "0"
end

function request()
  n = n + 1
  local key = "put-" .. tag .. "-" .. tid .. "-" .. n
  if style == "webdis" then
    return wrk.format("GET", "/SET/" .. key .. "/hello")
  end
  return wrk.format("PUT", prefix .. "/" .. key, nil, "hello")
end
