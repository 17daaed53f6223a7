//! The Lua sandbox: which globals exist, and how a run's environment is built.
//!
//! - Only `string`, `table`, `math`, `utf8` and `os.date/time/clock` are
//!   loaded, plus basic functions from a whitelist; no `io`, `require`,
//!   `load`, `dofile`, `loadfile`, `collectgarbage`, `rawset`, `debug`,
//!   `coroutine`, `string.dump`. Chunks are loaded as text, never bytecode.
//! - Library tables are read-only proxies (writes raise, their metatables are
//!   locked) and the string metatable is locked, so a run can't change what
//!   the next run sees.
//! - Each run gets a new global table whose metatable (locked) reads through
//!   to the shared base; globals a run defines die with it.
//! - An instruction hook (see `meter`: on the main state and each run's
//!   thread) enforces the instruction and wall-time limits of the current
//!   run, and suspends a run that has used up its slice on an async worker
//!   (see the parent module). Once a run is stopped (a limit, or
//!   `kvdb.exit`) it stays stopped: `pcall`/`xpcall` are wrapped to re-raise,
//!   an `xpcall` handler is not run, and every `kvdb` call raises.
//! - `setmetatable` refuses `__gc`: a finalizer would run during a later run
//!   of the pooled state, possibly another bucket's, outside any limit.
//! - To-be-closed variables (`<close>`) are refused when a script is compiled
//!   (see `bytecode`); a generic `for`'s closing value can't be refused
//!   there, and the hook stops a run without running pending `__close`
//!   outside the limits (see `meter`).
//! - The library functions whose one call can take long look at the limits
//!   as they start ([`SCANS`]); `table.move` over an absurd range is
//!   refused. The pattern functions are KVdb's own (see `pattern`), which
//!   look at the limits as they match too, so that a pattern that
//!   backtracks without end is stopped.

use mlua::chunk::ChunkMode;
use mlua::{Function, Lua, LuaOptions, StdLib, Table, Value};

use super::bindings;

/// The basic functions a script may use.
const BASIC: &[&str] = &[
    "assert",
    "error",
    "getmetatable",
    "ipairs",
    "next",
    "pairs",
    "pcall",
    "rawequal",
    "rawget",
    "rawlen",
    "select",
    "setmetatable",
    "tonumber",
    "tostring",
    "type",
    "xpcall",
    "_VERSION",
];

/// Wrappers of `pcall`, `xpcall` and `setmetatable` (see the module doc).
/// Takes the `stopped()` function, [`error_message`] and
/// `meter::leave_worker_function`; returns the three wrappers. An error a
/// host function raised reaches the script as its message, a string, as
/// Lua's own errors do (see [`error_message`]).
///
/// A run on an async worker leaves it (see `meter::leave_worker_function`)
/// before `xpcall`, whose handler Lua calls where it can't suspend it, and
/// before it gives a table a metatable: a metamethod is called from C by
/// `tostring`, `string.format`, `ipairs`, the `table` functions and
/// `kvdb.say`, where Lua can't suspend it either. A metatable can change
/// after `setmetatable`, so every table given one counts. Scripts that use
/// them (a class's `__index` too) run on a blocking thread, for a hand-off
/// a run (tens of microseconds).
const GUARDS: &str = r#"
local stopped, message, leave = ...
local pcall, xpcall, setmetatable, rawget, type, error =
  pcall, xpcall, setmetatable, rawget, type, error
local function check(...)
  if stopped() then error("the script was stopped", 0) end
  return ...
end
local function plain(ok, ...)
  if ok then return ok, ... end
  return false, message((...))
end
local function safe_pcall(f, ...)
  return plain(check(pcall(f, ...)))
end
local function safe_xpcall(f, handler, ...)
  leave()
  return check(xpcall(f, function(e)
    if stopped() then return e end
    return handler(message(e))
  end, ...))
end
local function safe_setmetatable(t, mt)
  if type(mt) == "table" then
    if rawget(mt, "__gc") ~= nil then
      error("__gc metamethods (finalizers) are not allowed in scripts", 2)
    end
    leave()
  end
  return setmetatable(t, mt)
end
return safe_pcall, safe_xpcall, safe_setmetatable
"#;

/// Wraps the `kvdb` data calls (in the table it is given, with
/// `meter::check_function`, `meter::await_write_function` and
/// `bindings::finish_write_function`). Each looks at the limits first, as
/// the library wrappers do (see [`SCANS`]): a data call is one VM
/// instruction to the hook, and a loop of them (of large listings, say)
/// held its worker some 200 calls past the slice in every run. A write not
/// done at once returns `true` (see `bindings::write`); the run is then
/// suspended on its worker until it is, and takes its outcome. Each wrapper
/// calls the data call through a local of the same name, not as a tail
/// call, so that Lua's messages still name it.
const DATA_CALLS: &str = r#"
local kvdb, check, await_write, finish_write = ...
local get, exists, list, access_token = kvdb.get, kvdb.exists, kvdb.list, kvdb.access_token
local set, delete, incr = kvdb.set, kvdb.delete, kvdb.incr
local merge, patch, append = kvdb.merge, kvdb.patch, kvdb.append
local function pass(...) return ... end
local function finished(status)
  if status == true then
    await_write()
    return finish_write()
  end
  return status
end
kvdb.get = function(...) check() return pass(get(...)) end
kvdb.exists = function(...) check() return pass(exists(...)) end
kvdb.list = function(...) check() return pass(list(...)) end
kvdb.access_token = function(...) check() return pass(access_token(...)) end
kvdb.set = function(...) check() local status = set(...) return finished(status) end
kvdb.delete = function(...) check() local status = delete(...) return finished(status) end
kvdb.incr = function(...) check() local status = incr(...) return finished(status) end
kvdb.merge = function(...) check() local status = merge(...) return finished(status) end
kvdb.patch = function(...) check() local status = patch(...) return finished(status) end
kvdb.append = function(...) check() local status = append(...) return finished(status) end
"#;

/// Builds one run's globals in one call (far cheaper than a Rust call per
/// table): the environment and its `kvdb` table. Takes their two
/// metatables. The request fields of `kvdb` are filled in when first
/// read (see `bindings::request_field`).
const BUILD_ENV: &str = r#"
local setmetatable = setmetatable
return function(env_mt, kvdb_mt)
  local kvdb = setmetatable({}, kvdb_mt)
  local env = setmetatable({ kvdb = kvdb }, env_mt)
  env._G = env
  return env
end
"#;

/// What each run's thread runs: the chunk under a `pcall` of the host's
/// own, re-raising its error. A run stopped by a limit is caught there
/// first: Lua's recovery turns hooks back on before it closes the pending
/// to-be-closed values (a generic `for`'s closing value), which the hook
/// then stops; without it, the dead thread's stack is cleared by mlua with
/// hooks off, which runs them unchecked (see `meter`). The handler adds the
/// script's line to a message without one (see `position_handler`).
const RUNNER: &str = r#"
local handler = ...
local xpcall, error = xpcall, error
return function(chunk, env)
  local ok, err = xpcall(chunk, handler, env)
  if not ok then error(err, 0) end
end
"#;

/// The runner's message handler: a string error without a position (one
/// raised inside a library function written in C, as `ipairs(nil)`), or
/// with the sandbox's, gets the script's innermost line. A table without
/// `__tostring`, a boolean, nil or a function raised as the error becomes a
/// message saying so (it was answered as `table: 0x…`, an address; found by
/// a review). Anything else is left as it is (a number, a table with
/// `__tostring`, and the host's own errors).
fn position_handler(lua: &Lua, err: Value) -> mlua::Result<Value> {
    let text = match &err {
        Value::String(text) => text.to_string_lossy(),
        Value::Table(t)
            if t.metatable()
                .is_some_and(|mt| !matches!(mt.raw_get("__tostring"), Ok(Value::Nil))) =>
        {
            return Ok(err);
        }
        Value::Table(_)
        | Value::Nil
        | Value::Boolean(_)
        | Value::Function(_)
        | Value::Thread(_) => format!(
            "the script raised a {} as its error, not a message (raise a string: error(\"what went wrong\"))",
            err.type_name()
        ),
        _ => return Ok(err),
    };
    let converted = !matches!(err, Value::String(_));
    // A message from inside the sandbox's own Lua (a library wrapper, see
    // `SCANS`) names the script's line instead.
    let message = match text.strip_prefix("sandbox:") {
        Some(rest) if super::has_position(&text) => rest.split_once(": ").map_or(rest, |(_, m)| m),
        _ if super::has_position(&text) => return Ok(err),
        _ => &text,
    };
    for level in 1.. {
        let Some(found) = lua.inspect_stack(level, |frame| {
            let source = frame.source();
            let name = source.source.as_deref().unwrap_or_default().to_owned();
            (name, frame.current_line())
        }) else {
            break;
        };
        // The script's own chunk is named "=NAME" (see `compile`).
        if let (Some(name), Some(line)) = (found.0.strip_prefix('='), found.1)
            && name != "sandbox"
            && name != "[C]"
        {
            return Ok(Value::String(
                lua.create_string(format!("{name}:{line}: {message}"))?,
            ));
        }
    }
    if converted {
        return Ok(Value::String(lua.create_string(text)?));
    }
    Ok(err)
}

/// A Lua state with only the whitelisted libraries, the string metatable
/// locked, and the limit hook installed.
pub(super) fn new_lua() -> mlua::Result<Lua> {
    let lua = Lua::new_with(
        StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::UTF8 | StdLib::OS,
        LuaOptions::default(),
    )?;
    lua.load(
        r#"
        local mt = getmetatable("")
        mt.__metatable = false
        string.dump = nil
        "#,
    )
    .set_mode(ChunkMode::Text)
    .exec()?;
    lua.load(SCANS)
        .set_name("=sandbox")
        .set_mode(ChunkMode::Text)
        .call::<()>((
            super::meter::check_function(&lua)?,
            TABLE_MOVE_MAX,
            DATE_FORMAT_MAX,
            super::meter::leave_worker_function(&lua)?,
            SORT_ON_WORKER_MAX,
            SORT_STRING_ON_WORKER_MAX,
        ))?;
    super::pattern::install(&lua, &lua.globals().get::<Table>("string")?)?;
    // The limits' hook is installed on the main state and on each run's
    // thread (see `meter`), not here: mlua's hooks can't stop a run safely.
    Ok(lua)
}

/// Wrappers of the library functions whose one call can take long: they
/// scan a long string (`rep`, `upper`, `lower`,
/// `reverse`, `format`, `byte`, the `utf8` functions) or loop over a table or
/// a range they are given (`sort`, `concat`, `unpack`, `move`). Installed in
/// the state's own `string`, `table` and `utf8` (string methods use them
/// too). One such call is one VM instruction to the hook, which looks at the
/// limits every `meter::HOOK_EVERY`: a loop of long scans ran 37 times past its
/// time limit (found by a review). Each wrapper looks at the limits (the
/// time, and whether the run was stopped) before the call, so a run ends at
/// most one call past its time, and a run on an async worker whose slice is
/// over leaves it there (`meter::check_function`), one call past its slice
/// at most; nothing is charged by length, which would
/// make a loop over the parts of a long string quadratic. `table.move` over
/// more than [`TABLE_MOVE_MAX`] elements is refused (`table.move({}, 1,
/// 1e15, 1, {})` never ended). The pattern functions are replaced by
/// `pattern`'s, which also look at the limits while they match.
///
/// Each wrapper calls the original through a local of the same name, not as
/// a tail call, so that Lua's messages still name it (`bad argument #1 to
/// 'rep'`); their position, this chunk's, is replaced by the script's line
/// (see `position_handler`).
const SCANS: &str = r#"
local check, move_max, date_max, leave, sort_max, sort_string_max = ...
local tonumber, error, type, select, floor = tonumber, error, type, select, math.floor
local rawlen, rawget = rawlen, rawget
local function pass(...) return ... end
local rep, upper, lower, reverse = string.rep, string.upper, string.lower, string.reverse
local format, byte = string.format, string.byte
-- Lua copies an empty piece n times without allocating anything:
-- rep("", math.maxinteger) never ended (found by a review). It is "".
string.rep = function(s, n, sep, ...)
  check()
  if s == "" and (sep == nil or sep == "") then
    local k = tonumber(n)
    if k and k > 1 and k == floor(k) then n = 1 end
  end
  return pass(rep(s, n, sep, ...))
end
string.upper = function(...) check() return pass(upper(...)) end
string.lower = function(...) check() return pass(lower(...)) end
string.reverse = function(...) check() return pass(reverse(...)) end
string.format = function(...) check() return pass(format(...)) end
string.byte = function(...) check() return pass(byte(...)) end
local sort, concat, unpack, move = table.sort, table.concat, table.unpack, table.move
local insert, remove = table.insert, table.remove
-- Without a comparator, table.sort compares in C, where the hook never
-- looks: sorting copies of one long string ran for minutes (found by a
-- review). The same order, compared in Lua.
local function less(a, b) return a < b end
-- Lua can't suspend a run inside sort's comparisons (called from C): a run
-- on an async worker leaves it first unless the sort is surely short: no
-- comparator of the script's, at most sort_max elements, none of them a
-- string longer than sort_string_max (two equal long strings take a
-- memcmp of their length to compare). A table with a metatable left it
-- when it got one.
local function short_sort(t)
  if type(t) ~= "table" then return true end
  local n = rawlen(t)
  if n > sort_max then return false end
  for i = 1, n do
    local v = rawget(t, i)
    if type(v) == "string" and #v > sort_string_max then return false end
  end
  return true
end
table.sort = function(t, comp, ...)
  check()
  if comp ~= nil or not short_sort(t) then leave() end
  if comp == nil then comp = less end
  return pass(sort(t, comp, ...))
end
-- Both shift the elements after a position one by one in C, as many as #t
-- says: a __len of math.maxinteger never ended (found by a review).
local function shifts(name, t, pos)
  local n = type(t) == "table" and #t
  pos = tonumber(pos)
  if type(n) == "number" and pos and n - pos >= move_max then
    error("table." .. name .. " shifting more than " .. move_max .. " elements", 3)
  end
end
table.insert = function(t, ...)
  check()
  if select('#', ...) >= 2 then shifts("insert", t, (...)) end
  return pass(insert(t, ...))
end
table.remove = function(t, ...)
  check()
  if select('#', ...) >= 1 then shifts("remove", t, (...)) end
  return pass(remove(t, ...))
end
-- Whether first..last spans more than move_max elements (an integer
-- difference that wraps is a span past any limit).
local function too_many(first, last)
  if not (first and last) or last < first then return false end
  local span = last - first
  return span < 0 or span >= move_max
end
-- table.concat reads each element in C, through __index if the table has
-- one: with a C function there (rawlen), up to math.maxinteger reads that
-- the hook never sees, one byte each, held a worker two seconds past the
-- time limit until the memory limit stopped it (found by a review).
table.concat = function(list, sep, i, j)
  check()
  local first, last = tonumber(i) or 1, tonumber(j)
  if j == nil and type(list) == "table" then last = #list end
  if too_many(first, last) then
    error("table.concat of more than " .. move_max .. " elements", 2)
  end
  return pass(concat(list, sep, i, j))
end
table.unpack = function(...) check() return pass(unpack(...)) end
table.move = function(a1, f, e, ...)
  check()
  -- As table.move reads them (numeric strings count).
  local first, last = tonumber(f), tonumber(e)
  if too_many(first, last) then
    error("table.move of more than " .. move_max .. " elements", 2)
  end
  return pass(move(a1, f, e, ...))
end
-- os.date reads its format in C, a conversion at a time, and its result
-- grows with it: 7 million "%%" held a worker two seconds past the run's
-- time limit (found by a review). A format is a few conversions.
local date = os.date
os.date = function(fmt, ...)
  check()
  if type(fmt) == "string" and #fmt > date_max then
    error("os.date: a format of more than " .. date_max .. " bytes: use a shorter one, or several calls", 2)
  end
  return pass(date(fmt, ...))
end
local len, offset, codepoint, char = utf8.len, utf8.offset, utf8.codepoint, utf8.char
utf8.len = function(...) check() return pass(len(...)) end
utf8.offset = function(...) check() return pass(offset(...)) end
utf8.codepoint = function(...) check() return pass(codepoint(...)) end
utf8.char = function(...) check() return pass(char(...)) end
"#;

/// The most elements one `table.move` may move: a table that large is over
/// any memory limit, and a call over that many takes about a second.
const TABLE_MOVE_MAX: i64 = 10_000_000;

/// The most elements a `table.sort` sorts on an async worker (see `SCANS`):
/// without a comparator of the script's, a few hundred comparisons of
/// numbers or short strings, microseconds.
const SORT_ON_WORKER_MAX: i64 = 64;

/// The longest string a `table.sort` sorts on an async worker (see
/// `SCANS`).
const SORT_STRING_ON_WORKER_MAX: i64 = 256;

/// The longest format `os.date` takes (`%Y-%m-%d %H:%M:%S` is 17 bytes).
const DATE_FORMAT_MAX: i64 = 4096;

/// Compiles a script as text. The chunk takes its environment as argument, so
/// one compiled chunk serves every run with a fresh environment; the prefix is
/// on the first line, so error lines match the source.
pub(super) fn compile(lua: &Lua, name: &str, source: &[u8]) -> mlua::Result<Function> {
    // As the `lua` command reads a file (found by a review): a UTF-8 byte
    // order mark, and a first line starting with `#` (`#!/usr/bin/env
    // lua`), are skipped; the line break stays, so line numbers hold.
    let source = source.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(source);
    let source = if source.starts_with(b"#") {
        let end = source
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or(source.len());
        &source[end..]
    } else {
        source
    };
    let mut chunk = Vec::with_capacity(source.len() + 24);
    chunk.extend_from_slice(b"local _ENV = ...; ");
    chunk.extend_from_slice(source);
    let f = lua
        .load(chunk)
        .set_name(format!("={name}"))
        .set_mode(ChunkMode::Text)
        .into_function()?;
    match super::bytecode::declares_to_be_closed(&f.dump(true)) {
        Ok(false) => Ok(f),
        Ok(true) => Err(mlua::Error::runtime(
            "to-be-closed variables (`local x <close>`) are not available in KVdb scripts: \
             a script holds no resource that needs closing (`<const>` is fine)",
        )),
        Err(e) => Err(mlua::Error::runtime(format!(
            "the compiled script could not be checked ({e})"
        ))),
    }
}

/// What `pcall` and an `xpcall` handler hand a script for an error a host
/// function raised (`kvdb.json.decode` of bad text, a bad argument): its
/// message, a string, as Lua's own errors are (without a position: the
/// host function has none), not mlua's error object, which a script could
/// not concatenate and whose text held the traceback and the sandbox's
/// frames (found by a review). A memory error stays the error object, so
/// that a script raising it again still ends with the memory limit (found
/// by a review of this change). Any other error value is left as it is.
fn error_message(lua: &Lua, e: Value) -> mlua::Result<Value> {
    match e {
        Value::Error(e) if !super::is_memory_error(&e) => {
            Ok(Value::String(lua.create_string(super::lua_error(&e))?))
        }
        other => Ok(other),
    }
}

/// A read-only view of `table`: reads go through, writes raise (at the
/// writer's line), `pairs` lists the fields (without handing out `table`
/// itself: found by a review, `pairs(string)` listed nothing), and the
/// metatable can't be read or replaced.
fn read_only(lua: &Lua, table: Table) -> mlua::Result<Table> {
    lua.load(
        r#"
        local t = ...
        local next = next
        local function step(_, k) return next(t, k) end
        return setmetatable({}, {
          __index = t,
          __pairs = function() return step, nil, nil end,
          __newindex = function(_, k)
            error("attempt to modify a read-only library table (field " .. tostring(k) .. ")", 2)
          end,
          __metatable = false,
        })
        "#,
    )
    .set_name("=sandbox")
    .set_mode(ChunkMode::Text)
    .call(table)
}

/// What every run of a state shares, built once per state.
pub(super) struct Base {
    /// Metatable of each run's globals: reads through to the base, locked.
    env_mt: Table,
    /// Metatable of each run's `kvdb` table: reads through to the shared
    /// functions (so a run needs no copy of them), sets the scope on
    /// `kvdb.scope = {...}`, locked.
    kvdb_mt: Table,
    /// [`BUILD_ENV`], loaded.
    build_env: Function,
    /// [`RUNNER`], loaded.
    runner: Function,
    /// The state's own `math.randomseed`: the generator behind
    /// `math.random` belongs to the state, which runs the scripts of every
    /// bucket in turn, so each run starts it afresh (else one run could
    /// seed, or read ahead, the numbers of the next: found by a review).
    randomseed: Function,
}

impl Base {
    pub(super) fn new(lua: &Lua) -> mlua::Result<Self> {
        let globals = lua.globals();
        let randomseed = globals.raw_get::<Table>("math")?.raw_get("randomseed")?;
        let base = lua.create_table()?;
        for name in BASIC {
            base.raw_set(*name, globals.raw_get::<Value>(*name)?)?;
        }
        for lib in ["string", "table", "math", "utf8"] {
            base.raw_set(lib, read_only(lua, globals.raw_get::<Table>(lib)?)?)?;
        }
        let os_full: Table = globals.raw_get("os")?;
        let os = lua.create_table()?;
        for f in ["date", "time", "clock"] {
            os.raw_set(f, os_full.raw_get::<Value>(f)?)?;
        }
        base.raw_set("os", read_only(lua, os)?)?;
        base.raw_set("print", bindings::log_function(lua)?)?;
        let (pcall, xpcall, setmetatable): (Function, Function, Function) = lua
            .load(GUARDS)
            .set_name("=sandbox")
            .set_mode(ChunkMode::Text)
            .call((
                bindings::stopped_function(lua)?,
                lua.create_function(error_message)?,
                super::meter::leave_worker_function(lua)?,
            ))?;
        base.raw_set("pcall", pcall)?;
        base.raw_set("xpcall", xpcall)?;
        base.raw_set("setmetatable", setmetatable)?;
        let env_mt = lua.create_table()?;
        env_mt.raw_set("__index", base)?;
        env_mt.raw_set("__metatable", false)?;
        let kvdb = bindings::functions(lua)?;
        lua.load(DATA_CALLS)
            .set_name("=sandbox")
            .set_mode(ChunkMode::Text)
            .call::<()>((
                &kvdb,
                super::meter::check_function(lua)?,
                super::meter::await_write_function(lua)?,
                bindings::finish_write_function(lua)?,
            ))?;
        // What `kvdb` does not hold is a request field or `kvdb.scope`, made
        // on first use.
        let fields_mt = lua.create_table()?;
        fields_mt.raw_set(
            "__index",
            bindings::request_field_function(lua, bindings::scope_metatable(lua)?)?,
        )?;
        fields_mt.raw_set("__metatable", false)?;
        kvdb.set_metatable(Some(fields_mt))?;
        kvdb.raw_set("json", read_only(lua, bindings::json(lua)?)?)?;
        let kvdb_mt = lua.create_table()?;
        kvdb_mt.raw_set("__index", kvdb)?;
        kvdb_mt.raw_set("__newindex", bindings::kvdb_newindex_function(lua)?)?;
        kvdb_mt.raw_set("__metatable", false)?;
        let build_env = lua
            .load(BUILD_ENV)
            .set_name("=sandbox")
            .set_mode(ChunkMode::Text)
            .call(())?;
        let runner = lua
            .load(RUNNER)
            .set_name("=sandbox")
            .set_mode(ChunkMode::Text)
            .call(lua.create_function(position_handler)?)?;
        Ok(Self {
            env_mt,
            kvdb_mt,
            build_env,
            runner,
            randomseed,
        })
    }

    /// What each run's thread runs ([`RUNNER`]).
    pub(super) fn runner(&self) -> Function {
        self.runner.clone()
    }

    /// A fresh global table for one run, with its own `kvdb` table, and
    /// `math.random` seeded afresh (from `rand`'s generator, which the
    /// operating system seeds).
    pub(super) fn environment(&self) -> mlua::Result<Table> {
        self.randomseed
            .call::<()>((rand::random::<i64>(), rand::random::<i64>()))?;
        self.build_env.call((&self.env_mt, &self.kvdb_mt))
    }
}
