//! Lines in the server log, tagged with the bucket and script (as `print`
//! in Lua). The response is built with [`Response`](crate::Response).
//!
//! The server logs at `info` and above unless its `KVDB_LOG` filter says
//! otherwise: debug lines appear with `KVDB_LOG=info,kvdb::script=debug`.
//!
//! Like the data functions, these call the host: outside a running script
//! (a native `cargo test`) a call panics, as the crate's "Testing natively"
//! says.
//!
//! ```no_run
//! kvdb_guest::log::info("starting");
//! kvdb_guest::log(kvdb_guest::Level::Debug, "details");
//! ```

use crate::wit::kvdb::script::log as wit;

/// How important a log line is.
///
/// # Example
///
/// ```no_run
/// kvdb_guest::log(kvdb_guest::Level::Warn, "low on quota");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Details for debugging.
    Debug,
    /// Normal events.
    Info,
    /// Something unexpected that the script handled.
    Warn,
    /// Something failed.
    Error,
}

impl From<Level> for wit::Level {
    fn from(l: Level) -> Self {
        match l {
            Level::Debug => wit::Level::Debug,
            Level::Info => wit::Level::Info,
            Level::Warn => wit::Level::Warn,
            Level::Error => wit::Level::Error,
        }
    }
}

/// Writes `message` to the server log at `level`.
///
/// # Example
///
/// ```no_run
/// kvdb_guest::log(kvdb_guest::Level::Info, "hello");
/// ```
pub fn log(level: Level, message: &str) {
    crate::host_only("log");
    wit::log(level.into(), message);
}

/// Logs `message` at [`Level::Debug`].
///
/// # Example
///
/// ```no_run
/// kvdb_guest::log::debug("cache miss");
/// ```
pub fn debug(message: &str) {
    log(Level::Debug, message);
}

/// Logs `message` at [`Level::Info`].
///
/// # Example
///
/// ```no_run
/// kvdb_guest::log::info("user created");
/// ```
pub fn info(message: &str) {
    log(Level::Info, message);
}

/// Logs `message` at [`Level::Warn`].
///
/// # Example
///
/// ```no_run
/// kvdb_guest::log::warn("retrying");
/// ```
pub fn warn(message: &str) {
    log(Level::Warn, message);
}

/// Logs `message` at [`Level::Error`].
///
/// # Example
///
/// ```no_run
/// kvdb_guest::log::error("the patch failed");
/// ```
pub fn error(message: &str) {
    log(Level::Error, message);
}
