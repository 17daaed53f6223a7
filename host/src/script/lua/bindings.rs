//! The `kvdb` table: Lua bindings over [`Host`](crate::script::api::Host)
//! (data), the request, and the response being built.
//!
//! The functions are created once per state and find the current run in the
//! state's app data. Data calls return their error as a value (`nil, err` or
//! `err`); they never raise for a denied or failed operation. Values convert
//! as API.md says: integers and floats as Lua numbers, JSON as tables, raw
//! bytes as strings; a Lua string is typed like an untyped HTTP body.

use mlua::{Function, Lua, LuaSerdeExt, MultiValue, Table, Value, Variadic};

use super::{Run, RunCell};
use crate::bucket::{Number, OperandError, Permission, Permissions, Typing, Value as KvValue};
use crate::script::api::{CallError, Host, ListOptions, permissions};

fn with_run<R>(lua: &Lua, f: impl FnOnce(&mut Run) -> mlua::Result<R>) -> mlua::Result<R> {
    let cell = lua
        .app_data_ref::<RunCell>()
        .ok_or_else(|| mlua::Error::runtime("kvdb functions only work while a script runs"))?;
    let mut run = cell
        .try_borrow_mut()
        .map_err(|_| mlua::Error::runtime("kvdb functions can't be called re-entrantly"))?;
    // A stopped run (a limit, or kvdb.exit) does nothing more, even if the
    // script caught the error that stopped it.
    if run.stopped() {
        return Err(mlua::Error::runtime("the script was stopped"));
    }
    // A call is one VM instruction to the hook: a loop of long calls (JSON
    // of a big table, escaping a long string) ran 20 times past its time
    // limit (found by a review). Each looks at the clock as it starts.
    if run.meter.check(0) {
        return Err(mlua::Error::runtime(super::meter::STOPPED));
    }
    f(&mut run)
}

/// `stopped()`: whether the current run hit a limit or exited (for the
/// `pcall`/`xpcall` guards).
pub(super) fn stopped_function(lua: &Lua) -> mlua::Result<Function> {
    lua.create_function(|lua, ()| {
        Ok(lua
            .app_data_ref::<RunCell>()
            .and_then(|cell| cell.try_borrow().ok().map(|r| r.stopped()))
            .unwrap_or(false))
    })
}

/// `value` on success, `nil, message` on a call error.
fn returned(lua: &Lua, r: Result<Value, CallError>) -> mlua::Result<MultiValue> {
    match r {
        Ok(v) => Ok(MultiValue::from_iter([v])),
        Err(e) => Ok(MultiValue::from_iter([
            Value::Nil,
            Value::String(lua.create_string(e.to_string())?),
        ])),
    }
}

/// A key (or a prefix) as a data call takes it: a string, or a number as
/// Lua writes it. Anything else, or a string that is not UTF-8, is the
/// call's error, returned like a key with a control character (it raised
/// "error converting Lua string to String" and ended the run; found by a
/// review).
struct KeyArg(Result<String, CallError>);

impl mlua::FromLua for KeyArg {
    fn from_lua(value: Value, lua: &Lua) -> mlua::Result<Self> {
        Ok(KeyArg(match value {
            Value::String(s) => s
                .to_str()
                .map(|s| s.to_owned())
                .map_err(|_| CallError::Invalid("a key must be UTF-8 text".into())),
            // As Lua writes it (`1e+20`), as before.
            number @ (Value::Integer(_) | Value::Number(_)) => Ok(String::from_lua(number, lua)?),
            other => Err(CallError::Invalid(format!(
                "a key must be a string, not {}",
                other.type_name()
            ))),
        }))
    }
}

/// `call` with the run and the key, or the key's own error.
fn keyed<T>(
    lua: &Lua,
    KeyArg(key): KeyArg,
    call: impl FnOnce(&mut Run, &str) -> Result<T, CallError>,
) -> mlua::Result<Result<T, CallError>> {
    match key {
        Ok(key) => with_run(lua, |run| Ok(call(run, &key))),
        Err(e) => Ok(Err(e)),
    }
}

/// Starts the write `write` makes of the run's host (see
/// [`Host::start_write`]): its status for the script (see [`status_of`]) if
/// it was done at once, else `true`: the sandbox's wrapper of the write then
/// waits for it (`meter::await_write_function`) and takes its status from
/// [`finish_write_function`]'s function.
fn write<F>(lua: &Lua, write: impl FnOnce(Host) -> F) -> mlua::Result<Value>
where
    F: std::future::Future<Output = Result<(), CallError>> + Send + 'static,
{
    let done = with_run(lua, |run| {
        let write = run.host.start_write(write);
        Ok(run.start_write(write))
    })?;
    match done {
        Some(done) => status_of(lua, done),
        None => Ok(Value::Boolean(true)),
    }
}

/// `finish_write()`, for the sandbox's wrappers of the `kvdb` writes: the
/// status of the run's write that was not done at once (see [`write()`]),
/// waiting for it here if the run could not be suspended meanwhile.
///
/// # Errors
/// Lua could not create the function (out of memory).
pub(super) fn finish_write_function(lua: &Lua) -> mlua::Result<Function> {
    lua.create_function(|lua, ()| {
        let done = with_run(lua, |run| Ok(run.finish_write()))?;
        status_of(lua, done)
    })
}

/// `nil` on success, the message on a call error.
fn status_of(lua: &Lua, r: Result<(), CallError>) -> mlua::Result<Value> {
    match r {
        Ok(()) => Ok(Value::Nil),
        Err(e) => Ok(Value::String(lua.create_string(e.to_string())?)),
    }
}

/// A stored value as a Lua value.
pub(super) fn to_lua(lua: &Lua, v: KvValue) -> mlua::Result<Value> {
    Ok(match v {
        KvValue::Int(i)
        | KvValue::Number {
            number: Number::Int(i),
            ..
        } => Value::Integer(i),
        KvValue::Float(f)
        | KvValue::Number {
            number: Number::Float(f),
            ..
        } => Value::Number(f),
        KvValue::Json(bytes) => match lua_of_json(lua, &bytes)? {
            Ok(v) => v,
            Err(_) => Value::String(lua.create_string(&bytes)?),
        },
        KvValue::Raw { bytes, .. } => Value::String(lua.create_string(&bytes)?),
    })
}

/// JSON text as a Lua value, built in Lua (under its memory limit) as the
/// text is read. Read into a `serde_json::Value` first, it took up to 16
/// times the text's size outside that limit (`[0,0,…]`: 2 bytes a number;
/// found by a review).
///
/// The inner error: the text is not JSON (serde_json's message).
///
/// # Errors
/// Lua's own (out of memory: the run's memory limit).
fn lua_of_json(lua: &Lua, text: &[u8]) -> mlua::Result<Result<Value, String>> {
    long_call(lua, text.len(), || lua_of_json_here(lua, text))
}

/// Inputs past which a call that walks them in Rust (a JSON text to decode,
/// a text to escape) leaves its worker's other tasks first: a megabyte
/// takes milliseconds.
const LONG_CALL_BYTES: usize = 64 * 1024;

/// Inputs below which such a call past the run's slice is made where it
/// is: a few microseconds, and the hook suspends the run within a thousand
/// instructions (a hand-off for each of a loop of small calls would cost
/// more than the calls).
const SHORT_CALL_BYTES: usize = 4 * 1024;

/// Runs `work`, a call that walks `len` bytes in Rust, where no hook looks,
/// in `block_in_place` when the run is on an async worker and its slice is
/// over or the input is long, so that the worker's other requests go to
/// another thread (found by a review: a loop of such calls held a worker for
/// the whole time limit). Its script's later runs then start on a blocking
/// thread, as after a long pattern match.
fn long_call<T>(lua: &Lua, len: usize, work: impl FnOnce() -> T) -> T {
    let meter = lua
        .app_data_ref::<RunCell>()
        .and_then(|cell| cell.try_borrow().ok().map(|run| run.meter.clone()));
    match meter {
        Some(meter)
            if meter.on_worker()
                && (len > LONG_CALL_BYTES || (len > SHORT_CALL_BYTES && meter.slice_over()))
                && on_multi_thread_runtime() =>
        {
            meter.mark_left_worker();
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// Whether `block_in_place` may be called here: on a multi-thread tokio
/// runtime (a run driven by a current-thread one, as a test may, would
/// panic in it).
pub(super) fn on_multi_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

fn lua_of_json_here(lua: &Lua, text: &[u8]) -> mlua::Result<Result<Value, String>> {
    let mut de = serde_json::Deserializer::from_slice(text);
    let value = match lua.to_value(&serde_transcode::Transcoder::new(&mut de)) {
        Ok(value) => value,
        // Lua out of memory as it built a value: the reader passed Lua's
        // error on as text (mlua's `Display` of a memory error), which the
        // serializer got back. The run's memory limit, not a JSON error.
        Err(mlua::Error::SerializeError(message)) if message.starts_with("memory error: ") => {
            return Err(mlua::Error::MemoryError(message));
        }
        // The reader's own error, passed through the Lua serializer once a
        // level of nesting, each time with mlua's prefix (found by a review:
        // 127 of them before "recursion limit exceeded").
        Err(mlua::Error::SerializeError(message)) => {
            let cause = message.trim_start_matches("serialize error: ");
            return Ok(Err(format!("not JSON: {cause}")));
        }
        Err(e) => return Err(e),
    };
    Ok(de
        .end()
        .map(|()| value)
        .map_err(|e| format!("not JSON: {e}")))
}

/// A Lua value to store.
fn from_lua(lua: &Lua, v: Value) -> Result<KvValue, CallError> {
    match v {
        Value::Integer(i) => Ok(KvValue::Int(i)),
        Value::Number(f) if f.is_finite() => Ok(KvValue::Float(f)),
        // The same words as the WebAssembly call's.
        Value::Number(_) => Err(CallError::Invalid("a float must be finite".into())),
        Value::String(s) => KvValue::from_body(&s.as_bytes(), &Typing::Coerce)
            .map_err(|e| CallError::Invalid(e.to_string())),
        Value::Boolean(b) => Ok(KvValue::Json(b.to_string().into_bytes())),
        // An object or an array (see `LuaJson`), never a bare number.
        Value::Table(_) => {
            Ok(KvValue::Json(json_text(lua, &v).map_err(|e| {
                CallError::Invalid(format!("the table is not JSON: {e}"))
            })?))
        }
        Value::Nil => Err(CallError::Invalid(
            "can't store nil: use kvdb.delete to remove a key".into(),
        )),
        other => Err(CallError::Invalid(format!(
            "can't store a {}",
            other.type_name()
        ))),
    }
}

/// A writer that refuses to grow past `cap` bytes.
struct Capped {
    out: Vec<u8>,
    cap: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.out.len().saturating_add(bytes.len()) > self.cap {
            return Err(std::io::Error::other("over the cap"));
        }
        self.out.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The JSON text of a Lua value, what `kvdb.set` stores, `kvdb.merge` and
/// `kvdb.patch` read and `json.encode` writes; written as the value is
/// walked (see [`LuaJson`]), and no longer than the run's memory limit: a
/// table can hold one large string, or one large table, many times over,
/// which would otherwise be copied out in full (found by reviews: 100
/// references to an 8 MB string took gigabytes, and a tree built first took
/// ten times its text).
///
/// The walk looks at the run's meter every [`JSON_CHECK_EVERY`] tables, so
/// a table that holds one table many times over (2^24 visits for 24 lines
/// of Lua) ends with the time limit; and one that goes on past the run's
/// slice on an async worker is walked again from its start in
/// `block_in_place`, as a long pattern match is (found by a review: such a
/// walk held a worker for seconds).
fn json_text(lua: &Lua, v: &Value) -> Result<Vec<u8>, String> {
    let (cap, meter) = with_run(lua, |run| Ok((run.limits.memory_bytes, run.meter.clone())))
        .map_err(|e| e.to_string())?;
    let array_mt = lua.array_metatable();
    let attempt = |slice: bool| {
        let mut out = Capped {
            out: Vec::new(),
            cap,
        };
        let watch = JsonWatch {
            meter: &meter,
            slice: std::cell::Cell::new(slice),
            tables: std::cell::Cell::new(0),
            slice_over: std::cell::Cell::new(false),
        };
        let walk = LuaJson {
            value: v,
            array_mt: &array_mt,
            path: &std::cell::RefCell::new(Vec::new()),
            watch: &watch,
        };
        let written = serde_json::to_writer(&mut out, &walk);
        (written.map(|()| out.out), watch.slice_over.get())
    };
    // Past the slice already (a loop of walks of one long table, which the
    // watch never looks at inside): all of it in `block_in_place` (found by
    // a review).
    let written = if meter.on_worker() && meter.slice_over() && on_multi_thread_runtime() {
        meter.mark_left_worker();
        tokio::task::block_in_place(|| attempt(false)).0
    } else {
        match attempt(true) {
            (Err(_), true) => {
                meter.mark_left_worker();
                tokio::task::block_in_place(|| attempt(false)).0
            }
            (written, _) => written,
        }
    };
    match written {
        Ok(text) => Ok(text),
        Err(e) if e.is_io() => Err(format!(
            "its JSON text would be over {cap} bytes (the script's memory limit)"
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Tables a JSON walk writes between two looks at the run's meter.
const JSON_CHECK_EVERY: u64 = 256;

/// The run's meter, as a JSON walk looks at it.
struct JsonWatch<'a> {
    meter: &'a super::meter::Meter,
    /// Whether to give up once the run's slice on its worker is over (to
    /// start again elsewhere: only while the walk has had no effects).
    slice: std::cell::Cell<bool>,
    tables: std::cell::Cell<u64>,
    /// The walk gave up because the slice was over.
    slice_over: std::cell::Cell<bool>,
}

impl JsonWatch<'_> {
    /// Counts a table; every [`JSON_CHECK_EVERY`] tables, whether the run
    /// must stop (its limits; the error's message) or, where `slice`, its
    /// slice is over.
    fn table(&self) -> Result<(), &'static str> {
        let n = self.tables.get() + 1;
        self.tables.set(n);
        if !n.is_multiple_of(JSON_CHECK_EVERY) {
            return Ok(());
        }
        // A table written counts as an instruction.
        if self.meter.check(JSON_CHECK_EVERY) {
            return Err(super::meter::STOPPED);
        }
        if self.slice.get() && self.meter.slice_over() {
            self.slice_over.set(true);
            return Err("the run's slice is over");
        }
        Ok(())
    }
}

/// A Lua value written as JSON. A table whose keys are whole numbers from 1,
/// with at most as many holes as values (or all keys below 10), is an
/// array, its holes `null`; so is an empty table decoded from a JSON array.
/// Any other table is an object, its members in name order, its number
/// keys written as strings; an empty plain table is `{}`. (mlua goes by
/// Lua's length operator, and dropped what a table held past its first
/// hole or besides its sequence: `{"a", name = "b"}` was stored as
/// `["a"]`; found by a review.) A string
/// that is not UTF-8, a float that is not finite, or tables nested deeper
/// than [`MAX_JSON_DEPTH`](crate::bucket::MAX_JSON_DEPTH) are refused.
/// Walks the table with no references kept but the entry at hand.
struct LuaJson<'a> {
    value: &'a Value,
    array_mt: &'a Table,
    /// The tables being written, outermost first (to refuse a table inside
    /// itself, and to count the depth).
    path: &'a std::cell::RefCell<Vec<*const std::ffi::c_void>>,
    watch: &'a JsonWatch<'a>,
}

/// The length of `t` read as an array: its keys whole numbers from 1, with
/// at most as many holes as values (or all keys below 10); `None`: it is
/// not one. An empty table is `Some(0)`.
fn array_len(t: &Table) -> mlua::Result<Option<usize>> {
    let (mut count, mut last, mut positions_only) = (0_usize, 0_usize, true);
    t.for_each::<Value, Value>(|k, _| {
        count += 1;
        match k {
            Value::Integer(i) if i >= 1 => {
                last = last.max(usize::try_from(i).unwrap_or(usize::MAX));
            }
            _ => positions_only = false,
        }
        Ok(())
    })?;
    Ok((positions_only && (last < 10 || count.saturating_mul(2) >= last)).then_some(last))
}

/// How [`LuaJson`] writes a table.
enum Shape {
    Array(usize),
    Object,
}

impl LuaJson<'_> {
    fn shape(&self, t: &Table) -> mlua::Result<Shape> {
        Ok(match array_len(t)? {
            Some(0) if t.metatable().is_none_or(|mt| mt != *self.array_mt) => Shape::Object,
            Some(len) => Shape::Array(len),
            None => Shape::Object,
        })
    }

    fn inner<'b>(&'b self, value: &'b Value) -> LuaJson<'b> {
        LuaJson {
            value,
            array_mt: self.array_mt,
            path: self.path,
            watch: self.watch,
        }
    }

    fn table<S: serde::Serializer>(&self, t: &Table, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeMap, SerializeSeq};
        let e = |e: mlua::Error| S::Error::custom(e.to_string());
        match self.shape(t).map_err(e)? {
            Shape::Array(len) => {
                let mut seq = s.serialize_seq(Some(len))?;
                for i in 1..=len {
                    let item: Value = t.raw_get(i).map_err(e)?;
                    seq.serialize_element(&self.inner(&item))?;
                }
                seq.end()
            }
            Shape::Object => {
                // Members in name order, as JSON documents are stored (and
                // the same table is always the same text); the keys are
                // copied out, the values read one at a time.
                let mut keys: Vec<(String, TableKey)> = Vec::new();
                let mut refused = None;
                t.for_each::<Value, Value>(|k, _| {
                    let key = match k {
                        Value::String(s) => match s.to_str() {
                            Ok(s) => (s.to_owned(), TableKey::Text(s.to_owned())),
                            Err(_) => {
                                refused =
                                    Some("a table key that is not UTF-8 can't be JSON text".into());
                                return Err(mlua::Error::runtime(""));
                            }
                        },
                        Value::Integer(i) => (i.to_string(), TableKey::Integer(i)),
                        Value::Number(f) => match serde_json::Number::from_f64(f) {
                            Some(n) => (n.to_string(), TableKey::Float(f)),
                            None => {
                                refused = Some("a table key must be a finite number".into());
                                return Err(mlua::Error::runtime(""));
                            }
                        },
                        other => {
                            refused = Some(format!(
                                "a table key must be a string or a number to be JSON, not a {}",
                                other.type_name()
                            ));
                            return Err(mlua::Error::runtime(""));
                        }
                    };
                    keys.push(key);
                    Ok(())
                })
                .map_err(|err| refused.take().map_or_else(|| e(err), S::Error::custom))?;
                keys.sort_by(|a, b| a.0.cmp(&b.0));
                // `1` and `"1"` are one name in JSON: refused rather than
                // one of them dropped (it was; found by a review).
                if let Some(pair) = keys.windows(2).find(|pair| pair[0].0 == pair[1].0) {
                    return Err(S::Error::custom(format!(
                        "the table has two keys that are the name {:?} in JSON (a number and a string): keep one",
                        pair[0].0
                    )));
                }
                let mut map = s.serialize_map(Some(keys.len()))?;
                for (name, key) in keys {
                    let value: Value = match key {
                        TableKey::Text(k) => t.raw_get(k),
                        TableKey::Integer(k) => t.raw_get(k),
                        TableKey::Float(k) => t.raw_get(k),
                    }
                    .map_err(e)?;
                    map.serialize_entry(&name, &self.inner(&value))?;
                }
                map.end()
            }
        }
    }
}

/// A table key, copied out of Lua.
enum TableKey {
    Text(String),
    Integer(i64),
    Float(f64),
}

impl serde::Serialize for LuaJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error;
        match self.value {
            // `null` decoded from JSON is a null light userdata.
            Value::Nil => s.serialize_unit(),
            Value::LightUserData(ud) if ud.0.is_null() => s.serialize_unit(),
            Value::Boolean(b) => s.serialize_bool(*b),
            Value::Integer(i) => s.serialize_i64(*i),
            Value::Number(f) if f.is_finite() => s.serialize_f64(*f),
            Value::Number(_) => Err(S::Error::custom("a float must be finite")),
            Value::String(text) => match text.to_str() {
                Ok(text) => s.serialize_str(&text),
                Err(_) => Err(S::Error::custom(
                    "a string that is not UTF-8 can't be JSON text",
                )),
            },
            Value::Table(t) => {
                self.watch.table().map_err(S::Error::custom)?;
                let table = t.to_pointer();
                {
                    let mut path = self.path.borrow_mut();
                    if path.contains(&table) {
                        return Err(S::Error::custom(
                            "a table that contains itself can't be JSON",
                        ));
                    }
                    if path.len() >= crate::bucket::MAX_JSON_DEPTH {
                        return Err(S::Error::custom(format!(
                            "it nests deeper than {} levels",
                            crate::bucket::MAX_JSON_DEPTH
                        )));
                    }
                    path.push(table);
                }
                let written = self.table(t, s);
                self.path.borrow_mut().pop();
                written
            }
            other => Err(S::Error::custom(format!(
                "a {} can't be JSON",
                other.type_name()
            ))),
        }
    }
}

/// The options of `kvdb.list`, each checked: a mistyped name or a value of
/// the wrong type is the call's error, not ignored (`{limt = 2}`,
/// `{reverse = "false"}`; found by a review).
fn list_options(lua: &Lua, opts: Value) -> Result<ListOptions, CallError> {
    let mut o = ListOptions::default();
    let opts = match opts {
        Value::Nil => return Ok(o),
        Value::Table(t) => t,
        other => {
            return Err(CallError::Invalid(format!(
                "list options must be a table, not {}",
                other.type_name()
            )));
        }
    };
    let text = |v: Value, name: &str| match v {
        Value::Nil => Ok(None),
        Value::String(s) => s
            .to_str()
            .map(|s| Some(s.to_owned()))
            .map_err(|_| CallError::Invalid(format!("{name} must be UTF-8 text"))),
        n @ (Value::Integer(_) | Value::Number(_)) => <String as mlua::FromLua>::from_lua(n, lua)
            .map(Some)
            .map_err(|e| CallError::Internal(e.to_string())),
        other => Err(CallError::Invalid(format!(
            "{name} must be a string, not {}",
            other.type_name()
        ))),
    };
    let flag = |v: Value, name: &str| match v {
        Value::Nil => Ok(false),
        Value::Boolean(b) => Ok(b),
        other => Err(CallError::Invalid(format!(
            "{name} must be true or false, not {}",
            other.type_name()
        ))),
    };
    // Its own fields are checked by name; each option is read with `get`,
    // so that one a metatable supplies (`__index = defaults`) counts.
    for pair in opts.pairs::<Value, Value>() {
        let (name, _) = pair.map_err(|e| CallError::Internal(e.to_string()))?;
        let known = matches!(&name, Value::String(s)
            if matches!(s.as_bytes().as_ref(), b"limit" | b"start" | b"end" | b"reverse" | b"values"));
        if !known {
            let shown = match &name {
                Value::String(s) => format!("{:?}", s.to_string_lossy()),
                other => format!("of type {}", other.type_name()),
            };
            return Err(CallError::Invalid(format!(
                "unknown list option {shown}: the options are limit, start, end, reverse and values"
            )));
        }
    }
    let get = |name: &str| {
        opts.get::<Value>(name)
            .map_err(|e| CallError::Invalid(format!("list option {name}: {e}")))
    };
    o.limit = whole(&get("limit")?, "limit")?.map(|l| usize::try_from(l).unwrap_or(usize::MAX));
    o.start = text(get("start")?, "start")?;
    o.end = text(get("end")?, "end")?;
    o.reverse = flag(get("reverse")?, "reverse")?;
    o.values = flag(get("values")?, "values")?;
    Ok(o)
}

/// A whole number of 0 or more (a ttl, a limit), or `None` for nil; a bad
/// one is the call's error, as in WebAssembly, not a raised error. A string
/// of digits counts (`kvdb.var` values are strings).
fn whole(v: &Value, what: &str) -> Result<Option<u64>, CallError> {
    let bad = || CallError::Invalid(format!("{what} must be a whole number, 0 or more"));
    match *v {
        Value::Nil => Ok(None),
        Value::String(ref s) => s
            .to_str()
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(bad),
        Value::Integer(i) => u64::try_from(i).map(Some).map_err(|_| bad()),
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Value::Number(f) if f.fract() == 0.0 && (0.0..1.8e19).contains(&f) => Ok(Some(f as u64)),
        _ => Err(bad()),
    }
}

/// What a bad argument was, for an error message: a string's text (cut
/// short), a number, or the type's name.
fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => {
            let text = s.to_string_lossy();
            match text.char_indices().nth(40) {
                Some((end, _)) => format!("{:?}…", &text[..end]),
                None => format!("{text:?}"),
            }
        }
        Value::Integer(i) => i.to_string(),
        Value::Number(f) => f.to_string(),
        Value::Nil => "nil".to_owned(),
        other => format!("a {}", other.type_name()),
    }
}

/// The status `kvdb.status` or `kvdb.exit` answers with.
fn answerable(lua: &Lua, v: &Value, function: &str) -> mlua::Result<u16> {
    let code = status_arg(
        lua,
        v,
        function,
        "an HTTP status, a whole number from 200 to 599",
    )?;
    crate::script::check_status(code)
        .map_err(|e| mlua::Error::runtime(format!("{function}: {e}")))?;
    Ok(code)
}

/// An HTTP status argument of `function`: what Lua reads as an integer
/// (`404`, `404.0`, `"404"`). mlua's own message named neither the
/// function nor what it takes ("error converting Lua string to u16"; found
/// by a review).
fn status_arg(lua: &Lua, v: &Value, function: &str, takes: &str) -> mlua::Result<u16> {
    lua.coerce_integer(v.clone())?
        .and_then(|c| u16::try_from(c).ok())
        .ok_or_else(|| mlua::Error::runtime(format!("{function} takes {takes}, not {}", shown(v))))
}

/// A text argument of `function`: a string, or a number as Lua writes it
/// (`tostring`).
fn text_arg(lua: &Lua, v: &Value, function: &str, takes: &str) -> mlua::Result<String> {
    let Some(text) = lua.coerce_string(v.clone())? else {
        return Err(mlua::Error::runtime(format!(
            "{function} takes {takes}, not {}",
            shown(v)
        )));
    };
    text.to_str().map(|t| t.to_owned()).map_err(|_| {
        mlua::Error::runtime(format!("{function} takes {takes}: this one is not UTF-8"))
    })
}

fn number(v: Option<Value>) -> Result<Number, CallError> {
    match v {
        None | Some(Value::Nil) => Ok(Number::Int(1)),
        Some(Value::Integer(i)) => Ok(Number::Int(i)),
        Some(Value::Number(f)) if f.is_finite() => Ok(Number::Float(f)),
        Some(Value::Number(_)) => Err(CallError::Invalid("the amount must be finite".into())),
        Some(Value::String(s)) => {
            let text = s.to_str().map(|t| t.to_owned()).unwrap_or_default();
            Number::parse_operand(&text).map_err(|e| match e {
                OperandError::NotANumber => {
                    CallError::Invalid("the amount must be a number".into())
                }
                e @ OperandError::OutOfRange(_) => CallError::Invalid(e.to_string()),
            })
        }
        Some(_) => Err(CallError::Invalid("the amount must be a number".into())),
    }
}

/// A merge or JSON patch argument: a table, or a string of JSON text (as
/// the WebAssembly calls take it, and as an HTTP body is).
fn json_arg(lua: &Lua, v: Value) -> Result<serde_json::Value, CallError> {
    let json = match v {
        // A forgotten argument would be JSON `null`: a merge with it makes
        // the whole value null (found by a review). `kvdb.json.null` still
        // says so on purpose.
        Value::Nil => {
            return Err(CallError::Invalid(
                "needs a table, or a string of JSON text, not nil".into(),
            ));
        }
        // Read by the shared host, which refuses text over the value size
        // limit unread.
        Value::String(text) => with_run(lua, |run| Ok(run.host.json_arg(&text.as_bytes())))
            .map_err(|e| CallError::Invalid(e.to_string()))??,
        // Its text read as the text of a string is.
        other => {
            let text =
                json_text(lua, &other).map_err(|e| CallError::Invalid(format!("not JSON: {e}")))?;
            with_run(lua, |run| Ok(run.host.json_arg(&text)))
                .map_err(|e| CallError::Invalid(e.to_string()))??
        }
    };
    // Not deeper than bucket::MAX_JSON_DEPTH either: serde_json refuses
    // the 128th level as it reads.
    Ok(json)
}

fn tostring_bytes(tostring: &Function, v: Value) -> mlua::Result<Vec<u8>> {
    match v {
        Value::String(s) => Ok(s.as_bytes().to_vec()),
        other => Ok(tostring.call::<mlua::LuaString>(other)?.as_bytes().to_vec()),
    }
}

fn write_body(run: &mut Run, bytes: &[u8]) -> mlua::Result<()> {
    if run.body.len().saturating_add(bytes.len()) > run.limits.response_bytes {
        let detail = format!(
            "the response grew beyond {} bytes: {}",
            run.limits.response_bytes,
            crate::script::RESPONSE_HINT
        );
        return Err(run.over_response_limit(detail));
    }
    run.body.extend_from_slice(bytes);
    Ok(())
}

fn output(lua: &Lua, newline: bool) -> mlua::Result<Function> {
    let tostring: Function = lua.globals().raw_get("tostring")?;
    let name = if newline { "say" } else { "print" };
    lua.create_function(move |lua, args: Variadic<Value>| {
        let (meter, start) = with_run(lua, |run| Ok((run.meter.clone(), run.body.len())))?;
        // Each piece goes to the body as it comes, checked against the
        // response limit: the arguments are never all copied at once (found
        // by a review: 60 references to one 8 MB string took 750 MB). The
        // walk of arrays looks at the run's meter as a JSON walk does (a
        // table that holds one table many times over is 2^N visits for N
        // lines of Lua; found by a review), and one that goes on past the
        // run's slice on an async worker starts again in `block_in_place`.
        let attempt = |slice: bool| -> mlua::Result<bool> {
            let watch = JsonWatch {
                meter: &meter,
                slice: std::cell::Cell::new(slice),
                tables: std::cell::Cell::new(0),
                slice_over: std::cell::Cell::new(false),
            };
            for (i, a) in args.iter().enumerate() {
                match write_piece(lua, &tostring, a.clone(), 0, &watch) {
                    Ok(()) => {}
                    Err(_) if watch.slice_over.get() => return Ok(false),
                    Err(OutputError::Lua(e)) => return Err(e),
                    Err(OutputError::Stopped(why)) => return Err(mlua::Error::runtime(why)),
                    Err(OutputError::Refused(what)) => {
                        return Err(mlua::Error::runtime(format!(
                            "bad argument #{} to 'kvdb.{name}' ({what})",
                            i + 1
                        )));
                    }
                }
            }
            Ok(true)
        };
        if !attempt(true)? {
            with_run(lua, |run| {
                run.body.truncate(start);
                Ok(())
            })?;
            meter.mark_left_worker();
            tokio::task::block_in_place(|| attempt(false))?;
        }
        if newline {
            with_run(lua, |run| write_body(run, b"\n"))?;
        }
        Ok(())
    })
}

/// How deep [`write_piece`] follows arrays in arrays (a table that holds
/// itself would go on for ever).
const OUTPUT_DEPTH: usize = 100;

enum OutputError {
    Lua(mlua::Error),
    /// An argument `kvdb.say` / `kvdb.print` does not write: what it is.
    Refused(String),
    /// The run's meter says stop, or its slice is over ([`JsonWatch`]).
    Stopped(&'static str),
}

impl From<mlua::Error> for OutputError {
    fn from(e: mlua::Error) -> Self {
        Self::Lua(e)
    }
}

/// Writes one argument of `kvdb.say` / `kvdb.print` to the body as
/// OpenResty's `ngx.say` does (API.md): strings as they are; numbers,
/// booleans and `nil` as `tostring` writes them; `kvdb.json.null` as
/// `null`; an array (as [`LuaJson`] reads one), its elements one after the
/// other, arrays in it too, a hole as `nil`. Any other table (unless its
/// metatable has `__tostring`), a function or a coroutine is refused, where
/// `tostring` would have written a heap address. Every table and element
/// counts on `watch`; a `__tostring` called keeps the walk from giving up
/// for the slice (its effects would happen twice).
fn write_piece(
    lua: &Lua,
    tostring: &Function,
    v: Value,
    depth: usize,
    watch: &JsonWatch<'_>,
) -> Result<(), OutputError> {
    watch.table().map_err(OutputError::Stopped)?;
    match v {
        Value::String(s) => with_run(lua, |run| write_body(run, &s.as_bytes()))?,
        Value::Nil | Value::Boolean(_) | Value::Integer(_) | Value::Number(_) => {
            let text = tostring.call::<mlua::LuaString>(v)?;
            with_run(lua, |run| write_body(run, &text.as_bytes()))?;
        }
        v if v.is_null() => with_run(lua, |run| write_body(run, b"null"))?,
        Value::Table(t)
            if t.metatable()
                .is_some_and(|m| !matches!(m.raw_get::<Value>("__tostring"), Ok(Value::Nil))) =>
        {
            // The script's own code, which may have effects: from here on
            // this call is never started again, so it finishes where it is
            // (holding its worker to the run's limits at most).
            watch.slice.set(false);
            let text = tostring.call::<mlua::LuaString>(t)?;
            with_run(lua, |run| write_body(run, &text.as_bytes()))?;
        }
        Value::Table(t) => {
            if depth >= OUTPUT_DEPTH {
                return Err(OutputError::Refused(format!(
                    "arrays nested deeper than {OUTPUT_DEPTH}: does a table hold itself?"
                )));
            }
            let Some(last) = array_len(&t)? else {
                return Err(OutputError::Refused(
                    "a table that is not an array: write its parts, or kvdb.json.encode(t)".into(),
                ));
            };
            for index in 1..=last {
                write_piece(lua, tostring, t.raw_get(index)?, depth + 1, watch)?;
            }
        }
        other => {
            return Err(OutputError::Refused(format!(
                "a {} is not written: a string, number, boolean, nil, kvdb.json.null or an array of them is",
                other.type_name()
            )));
        }
    }
    Ok(())
}

/// The global `print`: writes a line to the server log, tagged with the
/// bucket and script (the response is `kvdb.say` / `kvdb.print`).
pub(super) fn log_function(lua: &Lua) -> mlua::Result<Function> {
    let tostring: Function = lua.globals().raw_get("tostring")?;
    lua.create_function(move |lua, args: Variadic<Value>| {
        // Past the run's log budget, not even converted.
        if with_run(lua, |run| Ok(run.log.spent()))? {
            return with_run(lua, |run| {
                if let Some(notice) = run.log.line("") {
                    tracing::info!(script = %run.label, "{notice}");
                }
                Ok(())
            });
        }
        let mut text = Vec::new();
        for (i, a) in args.into_iter().enumerate() {
            if i > 0 {
                text.push(b'\t');
            }
            text.extend(tostring_bytes(&tostring, a)?);
            if text.len() > crate::script::LOG_BUDGET {
                break;
            }
        }
        with_run(lua, |run| {
            if let Some(line) = run.log.line(&String::from_utf8_lossy(&text)) {
                tracing::info!(script = %run.label, "{line}");
            }
            Ok(())
        })
    })
}

fn exit_now(run: &mut Run) -> mlua::Error {
    run.exited = true;
    run.meter.stop();
    mlua::Error::runtime("kvdb.exit")
}

/// The `__index` of the shared `kvdb` functions: the request fields
/// (`var`, `method`, `path`, `headers`, `body`) of the current run, and its
/// `kvdb.scope` (a table of its own with `scope_mt`, so that what a run
/// `rawset`s there stays in it), built on first use (most scripts read few
/// of them) and kept for the run. Not a field of each run's `kvdb` table,
/// so that assigning `kvdb.scope` reaches its `__newindex`.
pub(super) fn request_field_function(lua: &Lua, scope_mt: Table) -> mlua::Result<Function> {
    lua.create_function(move |lua, (_, key): (Value, mlua::LuaString)| {
        let Some(cell) = lua.app_data_ref::<RunCell>() else {
            return Ok(Value::Nil);
        };
        let mut run = cell
            .try_borrow_mut()
            .map_err(|_| mlua::Error::runtime("kvdb functions can't be called re-entrantly"))?;
        let request = &run.request;
        let value = match &*key.as_bytes() {
            b"method" => Value::String(lua.create_string(&request.method)?),
            b"path" => Value::String(lua.create_string(&request.path)?),
            b"body" => Value::String(lua.create_string(&request.body)?),
            b"var" => {
                if let Some(t) = &run.var {
                    return Ok(Value::Table(t.clone()));
                }
                let t = lua.create_table_with_capacity(0, request.fields.len() + 1)?;
                for (k, v) in request.vars() {
                    t.raw_set(k, &*v)?;
                }
                run.var = Some(t.clone());
                Value::Table(t)
            }
            b"headers" => {
                if let Some(t) = &run.headers_table {
                    return Ok(Value::Table(t.clone()));
                }
                let t = lua.create_table_with_capacity(0, request.headers.len())?;
                for (k, v) in &request.headers {
                    let joined = match t.raw_get::<Option<mlua::LuaString>>(k.as_str())? {
                        Some(prev) => {
                            let mut joined = prev.as_bytes().to_vec();
                            joined.extend_from_slice(b", ");
                            joined.extend_from_slice(v.as_bytes());
                            lua.create_string(joined)?
                        }
                        None => lua.create_string(v)?,
                    };
                    t.raw_set(k.as_str(), joined)?;
                }
                run.headers_table = Some(t.clone());
                Value::Table(t)
            }
            b"scope" => {
                if let Some(t) = &run.scope_table {
                    return Ok(Value::Table(t.clone()));
                }
                let t = lua.create_table()?;
                t.set_metatable(Some(scope_mt.clone()))?;
                run.scope_table = Some(t.clone());
                Value::Table(t)
            }
            _ => Value::Nil,
        };
        Ok(value)
    })
}

/// The `kvdb` functions shared by every run of a state.
#[allow(clippy::too_many_lines)]
pub(super) fn functions(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.raw_set(
        "get",
        lua.create_function(|lua, key: KeyArg| {
            let r = keyed(lua, key, |run, key| run.host.get(key))?;
            let r = match r {
                Ok(Some(v)) => Ok(to_lua(lua, v)?),
                Ok(None) => Err(CallError::NotFound),
                Err(e) => Err(e),
            };
            returned(lua, r)
        })?,
    )?;
    t.raw_set(
        "exists",
        lua.create_function(|lua, key: KeyArg| {
            let r = keyed(lua, key, |run, key| run.host.exists(key))?;
            returned(lua, r.map(Value::Boolean))
        })?,
    )?;
    t.raw_set(
        "set",
        lua.create_function(|lua, (KeyArg(key), value, ttl): (KeyArg, Value, Value)| {
            match key.and_then(|key| {
                let ttl = whole(&ttl, "ttl")?;
                Ok((key, from_lua(lua, value)?, ttl))
            }) {
                // A stopped run raises here, as from every call.
                Ok((key, v, ttl)) => write(lua, move |host| async move {
                    host.set_async(&key, v, ttl).await
                }),
                Err(e) => status_of(lua, Err(e)),
            }
        })?,
    )?;
    t.raw_set(
        "delete",
        lua.create_function(|lua, KeyArg(key): KeyArg| match key {
            Ok(key) => write(lua, move |host| async move {
                host.delete_async(&key).await.map(drop)
            }),
            Err(e) => status_of(lua, Err(e)),
        })?,
    )?;
    t.raw_set(
        "incr",
        lua.create_function(|lua, (KeyArg(key), n): (KeyArg, Option<Value>)| {
            match key.and_then(|key| Ok((key, number(n)?))) {
                Ok((key, n)) => write(lua, move |host| async move {
                    host.incr_async(&key, n).await.map(drop)
                }),
                Err(e) => status_of(lua, Err(e)),
            }
        })?,
    )?;
    t.raw_set(
        "merge",
        lua.create_function(|lua, (KeyArg(key), patch): (KeyArg, Value)| {
            match key.and_then(|key| Ok((key, json_arg(lua, patch)?))) {
                Ok((key, p)) => write(lua, move |host| async move {
                    host.merge_async(&key, p).await.map(drop)
                }),
                Err(e) => status_of(lua, Err(e)),
            }
        })?,
    )?;
    t.raw_set(
        "patch",
        lua.create_function(|lua, (KeyArg(key), patch): (KeyArg, Value)| {
            match key.and_then(|key| Ok((key, json_arg(lua, patch)?))) {
                Ok((key, p)) => write(lua, move |host| async move {
                    host.patch_async(&key, p).await.map(drop)
                }),
                Err(e) => status_of(lua, Err(e)),
            }
        })?,
    )?;
    t.raw_set(
        "append",
        lua.create_function(|lua, (KeyArg(key), bytes): (KeyArg, Value)| {
            // Text, or a number as Lua writes it; anything else is the
            // call's error, not a raised one.
            let bytes = match bytes {
                Value::String(s) => s.as_bytes().to_vec(),
                n @ (Value::Integer(_) | Value::Number(_)) => {
                    <String as mlua::FromLua>::from_lua(n, lua)?.into_bytes()
                }
                other => {
                    let e = CallError::Invalid(format!(
                        "append needs a string to add, not {}",
                        other.type_name()
                    ));
                    return status_of(lua, Err(e));
                }
            };
            match key {
                Ok(key) => write(lua, move |host| async move {
                    host.append_async(&key, bytes).await.map(drop)
                }),
                Err(e) => status_of(lua, Err(e)),
            }
        })?,
    )?;
    t.raw_set(
        "list",
        lua.create_function(|lua, (prefix, opts): (Option<KeyArg>, Value)| {
            let prefix = match prefix.map(|KeyArg(p)| p).transpose() {
                Ok(prefix) => prefix,
                Err(e) => return returned(lua, Err(e)),
            };
            let o = match list_options(lua, opts) {
                Ok(o) => o,
                Err(e) => return returned(lua, Err(e)),
            };
            let values = o.values;
            let r = with_run(lua, |run| {
                Ok(run.host.list(prefix.as_deref().unwrap_or(""), o))
            })?;
            let r = match r {
                Ok(entries) => {
                    let list = lua.create_table_with_capacity(entries.len(), 0)?;
                    for (key, value) in entries {
                        if values {
                            let item = lua.create_table()?;
                            item.raw_set("key", key)?;
                            if let Some(v) = value {
                                item.raw_set("value", to_lua(lua, v)?)?;
                            }
                            list.raw_push(item)?;
                        } else {
                            list.raw_push(key)?;
                        }
                    }
                    Ok(Value::Table(list))
                }
                Err(e) => Err(e),
            };
            returned(lua, r)
        })?,
    )?;
    t.raw_set(
        "access_token",
        lua.create_function(|lua, opts: Value| {
            let opts = match opts {
                Value::Nil => None,
                Value::Table(t) => Some(t),
                other => {
                    let e = CallError::Invalid(format!(
                        "access_token takes a table ({{prefix = ..., permissions = {{...}}, ttl = ...}}), not {}",
                        other.type_name()
                    ));
                    return returned(lua, Err(e));
                }
            };
            if let Some(o) = &opts {
                for pair in o.pairs::<Value, Value>() {
                    let (name, _) = pair?;
                    let known = matches!(&name, Value::String(s)
                        if matches!(s.as_bytes().as_ref(), b"prefix" | b"permissions" | b"ttl"));
                    if !known {
                        let e = CallError::Invalid(format!(
                            "unknown access_token field {}: the fields are prefix, permissions and ttl",
                            match &name {
                                Value::String(s) => format!("{:?}", s.to_string_lossy()),
                                other => other.type_name().to_owned(),
                            }
                        ));
                        return returned(lua, Err(e));
                    }
                }
            }
            let prefix: String = match opts.as_ref().map(|o| o.get::<Value>("prefix")).transpose()? {
                None | Some(Value::Nil) => String::new(),
                // Refused rather than replaced, as every key (a token for
                // another prefix than the one asked for; found by a review).
                Some(Value::String(s)) => match s.to_str() {
                    Ok(text) => text.to_owned(),
                    Err(_) => {
                        let e = CallError::Invalid("a token's prefix must be UTF-8 text".into());
                        return returned(lua, Err(e));
                    }
                },
                Some(other) => {
                    let e = CallError::Invalid(format!(
                        "prefix must be a string, not {}",
                        other.type_name()
                    ));
                    return returned(lua, Err(e));
                }
            };
            let ttl = match &opts {
                Some(o) => whole(&o.get::<Value>("ttl")?, "ttl"),
                None => Ok(None),
            };
            let not_names = || CallError::Invalid("permissions must be a list of names".into());
            // A string is read as HTTP reads the field ("read,write").
            let asked_permissions: Result<Permissions, CallError> = match opts
                .as_ref()
                .map(|o| o.get::<Value>("permissions"))
                .transpose()?
            {
                None | Some(Value::Nil) => Ok(Permissions::of(&[Permission::Read])),
                Some(Value::String(s)) => s
                    .to_str()
                    .map_err(|_| not_names())
                    .and_then(|list| Permissions::parse_list(&list).map_err(CallError::Invalid)),
                Some(v @ Value::Table(_)) => lua
                    .from_value::<Vec<String>>(v)
                    .map_err(|_| not_names())
                    .and_then(|names| permissions(names.iter().map(String::as_str))),
                Some(_) => Err(not_names()),
            };
            let asked = ttl.and_then(|ttl| {
                Ok((
                    ttl.unwrap_or(crate::bucket::DEFAULT_TOKEN_TTL_S),
                    asked_permissions?,
                ))
            });
            let r = match asked {
                // A stopped run raises here, as from every call.
                Ok((ttl, p)) => with_run(lua, |run| Ok(run.host.access_token(&prefix, p, ttl)))?,
                Err(e) => Err(e),
            };
            match r {
                Ok((token, expires_at)) => Ok(MultiValue::from_iter([
                    Value::String(lua.create_string(token)?),
                    Value::Integer(i64::try_from(expires_at).unwrap_or(i64::MAX)),
                ])),
                Err(e) => returned(lua, Err(e)),
            }
        })?,
    )?;
    t.raw_set("say", output(lua, true)?)?;
    t.raw_set("print", output(lua, false)?)?;
    t.raw_set(
        "header",
        lua.create_function(|lua, (name, value): (Value, Value)| {
            const TAKES: &str = "a header's name and value, both strings";
            let name = text_arg(lua, &name, "kvdb.header", TAKES)?;
            let value = text_arg(lua, &value, "kvdb.header", TAKES)?;
            let lower = crate::script::check_header(&name, &value)
                .map_err(|e| mlua::Error::runtime(format!("kvdb.header: {e}")))?;
            with_run(lua, |run| {
                run.headers.retain(|(k, _)| *k != lower);
                run.headers.push((lower, value));
                if let Err(detail) = crate::script::check_header_total(&run.headers) {
                    // Not kept: they count against no other limit.
                    run.headers.pop();
                    return Err(run.over_response_limit(detail));
                }
                Ok(())
            })
        })?,
    )?;
    t.raw_set(
        "status",
        lua.create_function(|lua, code: Value| {
            let code = answerable(lua, &code, "kvdb.status")?;
            with_run(lua, |run| {
                run.status = code;
                Ok(())
            })
        })?,
    )?;
    t.raw_set(
        "exit",
        lua.create_function(|lua, code: Value| -> mlua::Result<()> {
            let code = match code {
                Value::Nil => None,
                code => Some(answerable(lua, &code, "kvdb.exit")?),
            };
            with_run(lua, |run| {
                if let Some(code) = code {
                    run.status = code;
                }
                Err(exit_now(run))
            })
        })?,
    )?;
    t.raw_set(
        "redirect",
        lua.create_function(
            |lua, (url, code): (Value, Value)| -> mlua::Result<()> {
                const REDIRECTS: [u16; 5] = [301, 302, 303, 307, 308];
                const TAKES: &str = "a redirect status: 301, 302 (the default), 303, 307 or 308";
                let url = text_arg(lua, &url, "kvdb.redirect", "a URL, a string")?;
                let code = match code {
                    Value::Nil => 302,
                    code => status_arg(lua, &code, "kvdb.redirect", TAKES)?,
                };
                if !REDIRECTS.contains(&code) {
                    return Err(mlua::Error::runtime(format!(
                        "kvdb.redirect takes {TAKES}, not {code}"
                    )));
                }
                if axum::http::HeaderValue::from_str(&url).is_err() {
                    return Err(mlua::Error::runtime(
                        "kvdb.redirect: the URL is not a valid header value (percent-encode spaces, control characters and non-ASCII)",
                    ));
                }
                // The header limits hold for a redirect's Location as for
                // any header (a 30 MB URL went out; found by a review).
                let lower = crate::script::check_header("Location", &url)
                    .map_err(|e| mlua::Error::runtime(format!("kvdb.redirect: {e}")))?;
                with_run(lua, |run| {
                    run.headers.retain(|(k, _)| *k != lower);
                    run.headers.push((lower, url));
                    if let Err(detail) = crate::script::check_header_total(&run.headers) {
                        run.headers.pop();
                        return Err(run.over_response_limit(detail));
                    }
                    run.status = code;
                    Err(exit_now(run))
                })
            },
        )?,
    )?;
    t.raw_set(
        "escape_html",
        lua.create_function(|lua, s: Option<mlua::LuaString>| {
            let memory = with_run(lua, |run| Ok(run.limits.memory_bytes))?;
            let s = s.map(|s| s.to_string_lossy()).unwrap_or_default();
            long_call(lua, s.len(), || escape_html(&s, memory))
        })?,
    )?;
    Ok(t)
}

/// `kvdb.escape_html` of `s`, held to the run's `memory` limit.
fn escape_html(s: &str, memory: usize) -> mlua::Result<String> {
    // Built outside Lua's memory limit, and up to 6 times as long
    // as the text (`"` is `&quot;`; found by a review).
    let escaped_len = s.len()
        + s.bytes()
            .map(|b| match b {
                b'&' => 4,
                b'<' | b'>' => 3,
                b'"' | b'\'' | b'/' => 5,
                _ => 0,
            })
            .sum::<usize>();
    if escaped_len > memory {
        return Err(mlua::Error::runtime(format!(
            "kvdb.escape_html: the escaped text would be {escaped_len} bytes, over the script's memory limit ({memory} bytes)"
        )));
    }
    Ok(html_escape::encode_safe(s).into_owned())
}

/// `kvdb.json`: `encode(value)` and `decode(text)`; both raise on bad input.
/// `null` is what a JSON `null` decodes to (a value, unlike `nil`, so that
/// an array keeps its place): compare with it, `v == kvdb.json.null`.
pub(super) fn json(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.raw_set("null", mlua::LuaSerdeExt::null(lua))?;
    t.raw_set(
        "encode",
        lua.create_function(|lua, v: Value| {
            // What kvdb.set would store.
            let text = json_text(lua, &v)
                .map_err(|e| mlua::Error::runtime(format!("json.encode: {e}")))?;
            lua.create_string(text)
        })?,
    )?;
    t.raw_set(
        "decode",
        lua.create_function(|lua, s: mlua::LuaString| {
            with_run(lua, |_| Ok(()))?;
            lua_of_json(lua, &s.as_bytes())?
                .map_err(|e| mlua::Error::runtime(format!("json.decode: {e}")))
        })?,
    )?;
    Ok(t)
}

fn scope_permissions(lua: &Lua, v: Value) -> mlua::Result<crate::bucket::Permissions> {
    let names: Vec<String> = match v {
        Value::String(s) => s
            .to_str()?
            .split(',')
            .map(|p| p.trim().to_owned())
            .collect(),
        v @ Value::Table(_) => lua.from_value(v)?,
        _ => {
            return Err(mlua::Error::runtime(
                "kvdb.scope.permissions must be a list of names",
            ));
        }
    };
    permissions(names.iter().map(String::as_str)).map_err(|e| mlua::Error::runtime(e.to_string()))
}

/// The metatable of `kvdb.scope`: reading gives the current prefix and
/// permissions; assigning either replaces the run's scope from then on.
pub(super) fn scope_metatable(lua: &Lua) -> mlua::Result<Table> {
    let mt = lua.create_table()?;
    mt.raw_set(
        "__index",
        lua.create_function(|lua, (_t, k): (Value, String)| {
            with_run(lua, |run| {
                let (prefix, perms) = run.host.scope();
                match k.as_str() {
                    "prefix" => Ok(Value::String(lua.create_string(prefix)?)),
                    "permissions" => Ok(Value::Table(lua.create_sequence_from(perms.names())?)),
                    _ => Ok(Value::Nil),
                }
            })
        })?,
    )?;
    mt.raw_set(
        "__newindex",
        lua.create_function(|lua, (_t, k, v): (Value, String, Value)| match k.as_str() {
            "prefix" => set_scope(lua, Some(v), None),
            "permissions" => set_scope(lua, None, Some(v)),
            other => Err(mlua::Error::runtime(format!(
                "kvdb.scope has only prefix and permissions, not {other:?}"
            ))),
        })?,
    )?;
    mt.raw_set("__metatable", false)?;
    Ok(mt)
}

/// `__newindex` of each run's `kvdb` table: `kvdb.scope = {prefix = ...,
/// permissions = {...}}` sets the fields it has (as assigning them one by
/// one does; it replaced the table and left the scope as it was, found by
/// a review); any other name is set on the table as usual.
pub(super) fn kvdb_newindex_function(lua: &Lua) -> mlua::Result<Function> {
    lua.create_function(|lua, (t, k, v): (Table, Value, Value)| {
        if !matches!(&k, Value::String(s) if s.as_bytes() == b"scope") {
            return t.raw_set(k, v);
        }
        let Value::Table(fields) = v else {
            return Err(mlua::Error::runtime(
                "kvdb.scope takes a table {prefix = ..., permissions = {...}}, or set kvdb.scope.prefix and kvdb.scope.permissions one at a time",
            ));
        };
        let (mut prefix, mut permissions) = (None, None);
        for pair in fields.pairs::<Value, Value>() {
            let (name, value) = pair?;
            match &name {
                Value::String(s) if s.as_bytes() == b"prefix" => prefix = Some(value),
                Value::String(s) if s.as_bytes() == b"permissions" => permissions = Some(value),
                Value::String(other) => {
                    return Err(mlua::Error::runtime(format!(
                        "kvdb.scope has only prefix and permissions, not {:?}",
                        other.to_string_lossy()
                    )));
                }
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "kvdb.scope has only prefix and permissions, not a {} key",
                        other.type_name()
                    )));
                }
            }
        }
        // `kvdb.scope = kvdb.scope`: the proxy has no fields of its own; its
        // current values are read through it.
        if prefix.is_none() && permissions.is_none() {
            prefix = fields.get::<Option<Value>>("prefix")?;
            permissions = fields.get::<Option<Value>>("permissions")?;
        }
        if prefix.is_none() && permissions.is_none() {
            return Err(mlua::Error::runtime(
                "kvdb.scope = {...} needs prefix, permissions or both: {prefix = \"users:1:\", permissions = {\"read\"}}",
            ));
        }
        set_scope(lua, prefix, permissions)
    })
}

/// Replaces the run's scope: the given prefix and permissions, the current
/// ones where `None`.
fn set_scope(lua: &Lua, prefix: Option<Value>, permissions: Option<Value>) -> mlua::Result<()> {
    let permissions = permissions.map(|v| scope_permissions(lua, v)).transpose()?;
    let prefix = match prefix {
        None => None,
        Some(Value::String(s)) => Some(s.to_str()?.to_owned()),
        Some(_) => return Err(mlua::Error::runtime("kvdb.scope.prefix must be a string")),
    };
    with_run(lua, |run| {
        let (current_prefix, current_permissions) = run.host.scope();
        let prefix = prefix.unwrap_or(current_prefix);
        let permissions = permissions.unwrap_or(current_permissions);
        run.host
            .set_scope(&prefix, permissions)
            .map_err(|e| mlua::Error::runtime(e.to_string()))?;
        Ok(())
    })
}
