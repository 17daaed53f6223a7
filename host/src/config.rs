//! The command line: `kvdb serve | backup | restore`, flags and environment.
//!
//! Only parsing lives here; `main.rs` acts on it.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Default largest value: 16 MiB, as API.md says.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, Parser)]
#[command(
    name = "kvdb",
    version,
    about = "KVdb: a key-value database as a service",
    after_help = "Environment: every flag has its variable (shown with the flag); KVDB_LOG sets the log filter (default info; e.g. KVDB_LOG=debug, or KVDB_LOG=info,kvdb::script=debug). Logs go to stderr."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Stream a backup from a running server (needs its --admin-token).
    Backup(BackupArgs),
    /// Load one backup, or a chain of backups in order, into an empty data directory.
    Restore(RestoreArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Durable, on disk (default).
    Redb,
    /// In memory: fast, lost on exit.
    Memory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DurabilityArg {
    /// An acknowledged write is on disk (fsync before the answer, shared by
    /// concurrent writers).
    Strict,
    /// Writes are synced every second: a crash loses at most the last second.
    Relaxed,
}

#[derive(Debug, Parser)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free port (the printed line names it).
    #[arg(long, env = "KVDB_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Data directory (created if missing).
    #[arg(long, env = "KVDB_DATA", default_value = "./kvdb-data")]
    pub data: PathBuf,
    /// Storage backend.
    #[arg(long, env = "KVDB_BACKEND", value_enum, default_value_t = BackendKind::Redb)]
    pub backend: BackendKind,
    /// When a write is acknowledged.
    #[arg(long, env = "KVDB_DURABILITY", value_enum, default_value_t = DurabilityArg::Strict)]
    pub durability: DurabilityArg,
    /// Operator token for /_admin/ routes (backups). Without it they are disabled.
    #[arg(long, env = "KVDB_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Seconds a connection may stall (no request answered or started, nothing
    /// sent: idle, or headers never finished) before it is closed, and a
    /// request body may pause (408 beyond).
    #[arg(long, allow_negative_numbers = true, env = "KVDB_READ_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub read_timeout_secs: u64,
    /// Largest value in bytes (larger writes are answered 413), at least 1.
    #[arg(long, allow_negative_numbers = true, env = "KVDB_MAX_VALUE_BYTES", default_value_t = DEFAULT_MAX_VALUE_BYTES, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_value_bytes: usize,
    /// Wall-clock time a script run may take, in milliseconds (504 beyond),
    /// at least 1.
    #[arg(long, allow_negative_numbers = true, env = "KVDB_SCRIPT_TIME_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub script_time_ms: u64,
    /// Lua VM instructions a script run may execute, at least 1.
    #[arg(long, allow_negative_numbers = true, env = "KVDB_SCRIPT_INSTRUCTIONS", default_value_t = 50_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub script_instructions: u64,
    /// WebAssembly fuel a script run may use (about one unit per
    /// instruction), at least 1.
    #[arg(long, allow_negative_numbers = true, env = "KVDB_SCRIPT_FUEL", default_value_t = 500_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub script_fuel: u64,
    /// Memory a script run may allocate, in bytes: 65536 (one WebAssembly
    /// page) to 4294967296 (4 GiB, what a WebAssembly memory can address).
    #[arg(long, allow_negative_numbers = true, env = "KVDB_SCRIPT_MEMORY_BYTES", default_value_t = 32 * 1024 * 1024, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(65536..=4_294_967_296))]
    pub script_memory_bytes: usize,
    /// Response body a script run may produce, in bytes, at least 1.
    #[arg(long, allow_negative_numbers = true, env = "KVDB_SCRIPT_RESPONSE_BYTES", default_value_t = 1024 * 1024, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub script_response_bytes: usize,
    /// Largest Lua script accepted on upload, in bytes, at least 1.
    #[arg(long, allow_negative_numbers = true, env = "KVDB_SCRIPT_SOURCE_BYTES", default_value_t = 256 * 1024, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub script_source_bytes: usize,
    /// Largest WebAssembly component accepted on upload, in bytes, at least 1.
    #[arg(long, allow_negative_numbers = true, env = "KVDB_SCRIPT_COMPONENT_BYTES", default_value_t = 64 * 1024 * 1024, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub script_component_bytes: usize,
    /// Script runs in flight at once, per runtime (Lua, WebAssembly); one
    /// bucket may have a quarter of them (503 beyond, with Retry-After).
    #[arg(long, allow_negative_numbers = true, env = "KVDB_SCRIPT_RUNS", default_value_t = crate::script::DEFAULT_RUNS, value_parser = clap::value_parser!(u32).range(i64::from(*crate::script::RUNS_RANGE.start())..=i64::from(*crate::script::RUNS_RANGE.end())))]
    pub script_runs: u32,
}

impl ServeArgs {
    /// The script limits these flags set.
    pub fn script_limits(&self) -> crate::script::Limits {
        crate::script::Limits {
            time: std::time::Duration::from_millis(self.script_time_ms),
            instructions: self.script_instructions,
            fuel: self.script_fuel,
            memory_bytes: self.script_memory_bytes,
            response_bytes: self.script_response_bytes,
            source_bytes: self.script_source_bytes,
            component_bytes: self.script_component_bytes,
            runs: self.script_runs,
        }
    }
}

#[derive(Debug, Parser)]
pub struct BackupArgs {
    /// The running server.
    #[arg(long, env = "KVDB_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// The server's operator token (its --admin-token).
    #[arg(long, env = "KVDB_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: String,
    /// Only changes after this version: the version a previous backup printed.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    pub since: u64,
    /// Write the backup here (else to standard output).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Parser)]
pub struct RestoreArgs {
    /// Data directory to restore into: empty, or holding the earlier links of the chain.
    #[arg(long, env = "KVDB_DATA", default_value = "./kvdb-data")]
    pub data: PathBuf,
    /// Storage backend of the data directory.
    #[arg(long, env = "KVDB_BACKEND", value_enum, default_value_t = BackendKind::Redb)]
    pub backend: BackendKind,
    /// Backup files, the full one first, then increments in order.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}
