//! The Lua runtime (Lua 5.4 through `mlua`): a pool of sandboxed states, a
//! compiled-chunk cache per state, and runs confined by [`Limits`].
//!
//! Building a sandboxed state costs far more than a plain GET, so states are
//! reused: each thread that runs scripts keeps one (a thread-local, so runs
//! never contend for a shared pool), and each run gets a fresh global environment (its globals never outlive
//! it) over a read-only base, and library tables are read-only proxies, so
//! nothing a run does is visible to the next one (see the `sandbox` module). A state
//! whose run hit a limit is dropped, not reused.
//!
//! Blocking: call [`LuaRuntime::run`] off the async threads. Data calls go
//! through [`Host`], never to storage directly.

mod bindings;
mod sandbox;

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Instant;

use mlua::{Function, Lua};

use super::SourceLoader;
use super::api::Host;
use super::{Limit, Limits, Request, Response, ScriptError};
use crate::bucket::{ScriptName, StoredScript};

/// Compiled scripts cached per state; past it the cache starts over.
const MAX_CACHED_CHUNKS: usize = 256;

/// The Lua runtime: sandboxed states, one per thread that runs scripts.
pub struct LuaRuntime {
    limits: Limits,
}

thread_local! {
    /// This thread's idle state (taken during a run, put back after it).
    static IDLE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// One sandboxed Lua state with what it needs to start runs quickly.
struct State {
    lua: Lua,
    base: sandbox::Base,
    /// Compiled chunks by the SHA-256 of their source and the script name
    /// (the name is in error messages).
    chunks: HashMap<([u8; 32], ScriptName), Function>,
}

/// What a run accumulates; lives in the state's app data during the run.
pub(crate) struct Run {
    pub host: Host,
    pub limits: Limits,
    pub deadline: Instant,
    pub instructions: u64,
    /// A limit, once hit, stays hit: every later hook call raises again, so a
    /// script can't `pcall` its way past it.
    pub exceeded: Option<(Limit, String)>,
    /// `kvdb.exit` was called: the run ends with what it has said so far.
    pub exited: bool,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The scope the script set (prefix, permissions), once it sets one.
    pub script_scope: Option<(String, crate::bucket::Permissions)>,
    pub label: String,
}

pub(crate) type RunCell = RefCell<Run>;

fn lua_error(e: &mlua::Error) -> String {
    // The first line: "name:LINE: message" without the traceback.
    let text = match e {
        mlua::Error::CallbackError { cause, .. } => return lua_error(cause),
        mlua::Error::WithContext { cause, .. } => return lua_error(cause),
        other => other.to_string(),
    };
    let line = text.lines().next().unwrap_or("").trim();
    line.strip_prefix("runtime error: ")
        .or_else(|| line.strip_prefix("syntax error: "))
        .unwrap_or(line)
        .to_owned()
}

fn is_memory_error(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } | mlua::Error::WithContext { cause, .. } => {
            is_memory_error(cause)
        }
        _ => false,
    }
}

impl LuaRuntime {
    pub fn new(limits: Limits) -> Self {
        Self { limits }
    }

    fn take(&self) -> Result<State, ScriptError> {
        match IDLE.with(RefCell::take) {
            Some(state) => Ok(state),
            None => State::new().map_err(|e| ScriptError::Internal(e.to_string())),
        }
    }

    fn give_back(&self, state: State) {
        IDLE.with(|idle| *idle.borrow_mut() = Some(state));
    }

    /// Checks that `source` compiles (uploads); the message names the line.
    ///
    /// # Errors
    /// [`ScriptError::Invalid`] with Lua's message.
    pub fn validate(&self, name: &str, source: &[u8]) -> Result<(), ScriptError> {
        if source.iter().all(u8::is_ascii_whitespace) {
            return Err(ScriptError::Invalid("the script is empty".into()));
        }
        let state = self.take()?;
        let compiled = sandbox::compile(&state.lua, name, source);
        self.give_back(state);
        compiled
            .map(drop)
            .map_err(|e| ScriptError::Invalid(lua_error(&e)))
    }

    /// Runs `script` for `request` with `host` as its scoped bucket.
    ///
    /// # Errors
    /// A Lua error (with its message and line), or a limit.
    pub fn run(
        &self,
        script: &StoredScript,
        source: SourceLoader<'_>,
        host: Host,
        request: &Request,
    ) -> Result<Response, ScriptError> {
        let mut state = self.take()?;
        let result = state.run(script, source, host, request, self.limits);
        match &result {
            Ok(_) | Err(ScriptError::Failed(_)) => self.give_back(state),
            // A state that hit a limit or failed inside is not trusted again.
            Err(_) => drop(state),
        }
        result
    }
}

impl State {
    fn new() -> mlua::Result<Self> {
        let lua = sandbox::new_lua()?;
        let base = sandbox::Base::new(&lua)?;
        Ok(Self {
            lua,
            base,
            chunks: HashMap::new(),
        })
    }

    fn chunk(
        &mut self,
        script: &StoredScript,
        source: SourceLoader<'_>,
    ) -> Result<Function, ScriptError> {
        let key = (script.digest, script.name.clone());
        if let Some(f) = self.chunks.get(&key) {
            return Ok(f.clone());
        }
        let f = sandbox::compile(&self.lua, script.name.as_str(), &source()?)
            .map_err(|e| ScriptError::Failed(lua_error(&e)))?;
        if self.chunks.len() >= MAX_CACHED_CHUNKS {
            self.chunks.clear();
        }
        self.chunks.insert(key, f.clone());
        Ok(f)
    }

    fn run(
        &mut self,
        script: &StoredScript,
        source: SourceLoader<'_>,
        host: Host,
        request: &Request,
        limits: Limits,
    ) -> Result<Response, ScriptError> {
        let internal = |e: mlua::Error| ScriptError::Internal(e.to_string());
        let f = self.chunk(script, source)?;
        let env = self
            .base
            .environment(&self.lua, request)
            .map_err(internal)?;
        let lua = &self.lua;
        lua.set_app_data::<RunCell>(RefCell::new(Run {
            host,
            limits,
            deadline: Instant::now() + limits.time,
            instructions: 0,
            exceeded: None,
            exited: false,
            status: 200,
            headers: Vec::new(),
            body: Vec::new(),
            script_scope: None,
            label: format!("{}/{}", script.bucket, script.name),
        }));
        lua.set_memory_limit(lua.used_memory().saturating_add(limits.memory_bytes))
            .map_err(internal)?;
        let outcome = f.call::<()>(env);
        let limit_reset = lua.set_memory_limit(0);
        let run = lua
            .remove_app_data::<RunCell>()
            .ok_or_else(|| ScriptError::Internal("the run's state vanished".into()))?
            .into_inner();
        limit_reset.map_err(internal)?;
        if let Some((limit, detail)) = run.exceeded {
            return Err(ScriptError::Limit { limit, detail });
        }
        match outcome {
            Ok(()) => {}
            Err(_) if run.exited => {}
            Err(e) if is_memory_error(&e) => {
                return Err(ScriptError::Limit {
                    limit: Limit::Memory,
                    detail: format!(
                        "the script allocated more than {} bytes",
                        limits.memory_bytes
                    ),
                });
            }
            Err(e) => {
                let message = lua_error(&e);
                if message.contains("stack overflow") {
                    return Err(ScriptError::Limit {
                        limit: Limit::Stack,
                        detail: message,
                    });
                }
                return Err(ScriptError::Failed(message));
            }
        }
        let mut headers = run.headers;
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            headers.push(("content-type".into(), "text/plain; charset=utf-8".into()));
        }
        Ok(Response {
            status: run.status,
            headers,
            body: run.body,
        })
    }
}
