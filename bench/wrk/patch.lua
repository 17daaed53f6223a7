-- Atomic increment by one, on one hot key or on a key drawn at random from NKEYS.
--
-- usage: wrk -s patch.lua URL -- STYLE PREFIX NKEYS
--   STYLE kvdb:   PATCH PREFIX/ctr-I  with body "+1"  (PREFIX is "/BUCKET")
--   STYLE webdis: GET   /INCR/ctr-I
-- NKEYS 1 means every request hits the same key (worst case for contention).

local threads_made = 0

function setup(thread)
  threads_made = threads_made + 1
  thread:set("tid", threads_made)
end

local style, prefix, nkeys

function init(args)
  style = args[1] or "kvdb"
  prefix = args[2] or ""
  nkeys = tonumber(args[3]) or 1
  -- Different seed per thread, or both threads would draw the same sequence.
  math.randomseed(os.time() * 100 + tid)
end

function request()
  local key = "ctr-0"
  if nkeys > 1 then
    key = "ctr-" .. math.random(nkeys)
  end
  if style == "webdis" then
    return wrk.format("GET", "/INCR/" .. key)
  end
  return wrk.format("PATCH", prefix .. "/" .. key, nil, "+1")
end
