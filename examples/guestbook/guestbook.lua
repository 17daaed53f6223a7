-- A small JSON guestbook, the Lua twin of src/lib.rs (see its contract):
-- the same bytes for the same request. The JSON is written out by hand so
-- the key order is fixed (id, name, message), as the Rust struct's.
-- kvdb.incr answers nil or an error, not the new value, so the count is
-- read back: unlike the Rust guest, two concurrent posts may share a number.
local COUNTER, PREFIX = "guestbook-count", "guestbook:"
local enc = kvdb.json.encode

kvdb.header("content-type", "application/json")

local function fail(status, message)
  kvdb.print('{"error":', enc(message), '}')
  kvdb.exit(status)
end

-- A data call's error: 403 if the caller's scope does not allow it.
local function failed(err)
  fail(err:find("^permission denied") and 403 or 500, err)
end

local function entry_json(id, name, message)
  return '{"id":' .. id .. ',"name":' .. enc(name) .. ',"message":' .. enc(message) .. '}'
end

if kvdb.method == "POST" then
  local name, message = kvdb.var.name, kvdb.var.message
  if not name or name == "" or not message or message == "" then
    fail(400, "name and message are required")
  end
  local err = kvdb.incr(COUNTER, 1)
  if err then failed(err) end
  local id, err = kvdb.get(COUNTER)
  if not id then failed(err) end
  if math.type(id) ~= "integer" then fail(500, "the counter is not an integer") end
  local entry = entry_json(id, name, message)
  err = kvdb.set(string.format("%s%08d", PREFIX, id), entry)
  if err then failed(err) end
  kvdb.status(201)
  kvdb.print(entry)
else
  local list, err = kvdb.list(PREFIX, {values = true})
  if not list then failed(err) end
  local out = {}
  for _, e in ipairs(list) do
    local v = e.value
    if type(v) == "table" and math.type(v.id) == "integer"
        and type(v.name) == "string" and type(v.message) == "string" then
      out[#out + 1] = entry_json(v.id, v.name, v.message)
    end
  end
  kvdb.print("[", table.concat(out, ","), "]")
end
