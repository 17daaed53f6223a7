//! The `kvdb` binary: parse the command line, set up logging, act.

use std::io::{IsTerminal, Write};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use kvdb::bucket::{Buckets, Limits};
use kvdb::config::{BackendKind, BackupArgs, Cli, Command, DurabilityArg, RestoreArgs, ServeArgs};
use kvdb::storage::{Backend, Durability, Store, memory::MemoryBackend, redb::RedbBackend};

/// mimalloc: the glibc allocator showed up as ~10% of a write's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours for a terminal only: a log file or a pipe gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(log_filter())
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Backup(args) => backup(&args),
        Command::Restore(args) => restore(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The message and its causes, one line: no backtrace, even with
        // RUST_BACKTRACE set (it says nothing to a user).
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The log filter: `KVDB_LOG`, else `info`. One that can't be read is said
/// on stderr rather than silently replaced (found by a review), and so is
/// a bare word that is no level (`KVDB_LOG=verbose`): the filter takes it
/// for a module's name and logs nothing else, the server's own lines
/// included.
fn log_filter() -> tracing_subscriber::EnvFilter {
    const LEVELS: &str = "off, error, warn, info, debug, trace";
    match std::env::var("KVDB_LOG") {
        Err(_) => tracing_subscriber::EnvFilter::new("info"),
        Ok(text) => match tracing_subscriber::EnvFilter::try_new(&text) {
            Ok(filter) => {
                for word in text.split(',').map(str::trim) {
                    match bare_word(word) {
                        BareWord::Fine => {}
                        BareWord::Module => eprintln!(
                            "note: KVDB_LOG names {word:?}, which is read as a module's name (every event of that module, nothing else); a level is one of {LEVELS} (e.g. KVDB_LOG=debug, or KVDB_LOG=info,{word}=debug)"
                        ),
                        BareWord::NotOurs => eprintln!(
                            "note: KVDB_LOG names {:?}, which is no module of kvdb, so nothing is logged for it; kvdb's modules are {}",
                            word.split_once('=').map_or(word, |(target, _)| target),
                            OUR_MODULES.map(|m| format!("kvdb::{m}")).join(", ")
                        ),
                    }
                }
                filter
            }
            Err(e) => {
                eprintln!(
                    "warning: KVDB_LOG={text:?} is not a log filter ({e}); logging at info (a level is one of {LEVELS}; e.g. KVDB_LOG=debug, or KVDB_LOG=info,kvdb::script=debug)"
                );
                tracing_subscriber::EnvFilter::new("info")
            }
        },
    }
}

/// The top-level modules of the `kvdb` crate: the targets of its log
/// events start with `kvdb::` and one of these.
const OUR_MODULES: [&str; 6] = ["auth", "bucket", "config", "http", "script", "storage"];

/// What a directive of a log filter is, for a note at start.
enum BareWord {
    /// A level, a directive with one for another crate (`hyper=debug`) or
    /// a module path of one (`tower_http::trace`), a span filter, or our
    /// crate or one of its modules.
    Fine,
    /// A bare word that is no level: what a user who meant a level wrote
    /// (`verbose`); the filter reads it as a module's name.
    Module,
    /// `kvdb` followed by something that is none of its modules, bare or
    /// with a level (a typo: `kvdb::scrpt=debug`, `kvdbx`): nothing would
    /// be logged for it (found by a reviewer following the README).
    NotOurs,
}

fn bare_word(directive: &str) -> BareWord {
    if directive.is_empty() || directive.contains('[') {
        return BareWord::Fine;
    }
    let (target, level) = match directive.split_once('=') {
        Some((target, level)) => (target, Some(level)),
        None => (directive, None),
    };
    if level.is_none()
        && target
            .parse::<tracing_subscriber::filter::LevelFilter>()
            .is_ok()
    {
        return BareWord::Fine;
    }
    if !target.starts_with("kvdb") {
        // A bare word without `::`: most likely a level misspelt; a path
        // (`tower_http::trace`) is a module's name as meant.
        return if level.is_none() && !target.contains("::") {
            BareWord::Module
        } else {
            BareWord::Fine
        };
    }
    // The filter matches a target that starts with the directive's: fine
    // if one of our modules' paths does, or it is within one of them.
    // (`kvdb::scripts` starts with `kvdb::script` but is no module: found
    // by a review.)
    let ours = OUR_MODULES.iter().any(|m| {
        let path = format!("kvdb::{m}");
        path.starts_with(target) || target == path || target.starts_with(&format!("{path}::"))
    });
    if ours {
        BareWord::Fine
    } else {
        BareWord::NotOurs
    }
}

/// The data directory's folder of compiled WebAssembly (a cache: deleting
/// it only makes the next run of each component compile it again).
const COMPILED_DIR: &str = "compiled";

fn open_backend(kind: BackendKind, data: &std::path::Path) -> anyhow::Result<Arc<dyn Backend>> {
    if kind == BackendKind::Redb && data.exists() && !data.is_dir() {
        bail!(
            "the data directory {} is not a directory: give --data (KVDB_DATA) a directory, which is created if missing",
            data.display()
        );
    }
    Ok(match kind {
        BackendKind::Redb => Arc::new(
            RedbBackend::open(data)
                .with_context(|| format!("opening the data directory {}", data.display()))?,
        ),
        BackendKind::Memory => Arc::new(MemoryBackend::new()),
    })
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let durability = match args.durability {
        DurabilityArg::Strict => Durability::Strict,
        DurabilityArg::Relaxed => Durability::Relaxed,
    };
    // A blank token (an unset variable in a deployment file) turns the
    // operator routes off rather than stopping the server.
    // Trimmed, as the token a request presents is (found by a review: a
    // token given with a space around it could never match).
    let admin_token = args
        .admin_token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(Arc::from);
    if args.admin_token.is_some() && admin_token.is_none() {
        tracing::warn!(
            "--admin-token (KVDB_ADMIN_TOKEN) is empty: the operator routes (/_admin/, backups) stay disabled"
        );
    }
    let store = Store::open(open_backend(args.backend, &args.data)?, durability)?;
    // Compiled WebAssembly is kept beside durable data, so that a restart
    // does not compile every component again; the memory backend keeps
    // nothing on disk.
    let compiled = match args.backend {
        BackendKind::Redb => Some(args.data.join(COMPILED_DIR)),
        BackendKind::Memory => None,
    };
    let buckets = Buckets::new(
        store,
        Limits {
            max_value_bytes: args.max_value_bytes,
        },
    );
    let state = kvdb::http::AppState {
        scripts: Arc::new(
            kvdb::script::Runtimes::new(args.script_limits(), compiled.as_deref())
                .context("setting up the script runtimes")?,
        ),
        buckets,
        admin_token,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(kvdb::script::blocking_threads(args.script_runs))
        .build()?;
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        match args.backend {
            // The absolute path: a service manager's log says where the
            // data is whatever directory the server was started in.
            BackendKind::Redb => tracing::info!(
                %addr,
                backend = ?args.backend,
                ?durability,
                data = %std::fs::canonicalize(&args.data).unwrap_or_else(|_| args.data.clone()).display(),
                "kvdb is ready"
            ),
            // No directory is used: naming one would say data is kept there.
            BackendKind::Memory => tracing::info!(
                %addr,
                backend = ?args.backend,
                "kvdb is ready; everything is kept in memory and lost when it stops"
            ),
        }
        println!("listening on http://{addr}");
        std::io::stdout().flush()?;
        kvdb::run(
            listener,
            state,
            std::time::Duration::from_secs(args.read_timeout_secs),
            shutdown_signal(),
        )
        .await?;
        tracing::info!("stopped cleanly");
        Ok(())
    });
    // Don't wait for a blocking thread that can't be stopped (a script stuck
    // in a C call): the store is already closed and synced.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down: finishing requests in flight");
}

fn backup(args: &BackupArgs) -> anyhow::Result<()> {
    if args.admin_token.trim().is_empty() {
        bail!(
            "--admin-token (KVDB_ADMIN_TOKEN) is empty (is the variable you passed set?): give the operator token the server was started with (its --admin-token)"
        );
    }
    let scheme = args
        .server
        .get(..8)
        .unwrap_or(&args.server)
        .to_ascii_lowercase();
    if !(scheme.starts_with("http://") || scheme.starts_with("https://")) {
        bail!(
            "--server {} is not a URL: name the server with its scheme, e.g. --server http://{}",
            args.server,
            args.server
        );
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!(
        "{}/_admin/backup?since={}",
        args.server.trim_end_matches('/'),
        args.since
    );
    let mut response = agent
        .get(&url)
        .header("Authorization", &format!("Bearer {}", args.admin_token))
        .call()
        .with_context(|| {
            format!(
                "connecting to {} (the server to back up is named with --server or KVDB_SERVER; is it running?)",
                args.server
            )
        })?;
    if !response.status().is_success() {
        let detail = response.body_mut().read_to_string().unwrap_or_default();
        bail!(
            "the server refused the backup ({}): {detail}",
            response.status()
        );
    }
    let progress = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} backing up: {bytes} ({bytes_per_sec}, {elapsed})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut reader = progress.wrap_read(response.body_mut().as_reader());
    // `--output` naming this command's own standard output (`/dev/stdout`,
    // `/dev/fd/1`) writes there, as without `--output`: opened again by
    // name it would be written from its start, and the `version` line
    // would land in the backup (found by a review).
    let output = args.output.as_deref().filter(|path| !is_stdout(path));
    // Anything but a regular file (a device such as `/dev/null`, a FIFO,
    // bash's `>(gzip > f)`) is written as it is: the rename below would
    // replace it with a regular file (run as root, `--output /dev/null`
    // replaced the system's /dev/null: found in this project's own test
    // runs). A symbolic link to a file is followed: the backup goes to what
    // it names, and the link stays (found by a review: it was replaced).
    let target = output.map(|path| match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => (true, path.to_owned()),
        Ok(_) => (
            false,
            std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned()),
        ),
        Err(_) => (false, resolve_link(path)),
    });
    let received = receive(&mut reader, target.as_ref());
    progress.finish_and_clear();
    let received = received?;
    // What the checked stream says, not the response's headers: the
    // version printed is the one the file holds (found by a review).
    let (since, version) = (received.info.since, received.info.version);
    let bytes = received.bytes;
    eprintln!(
        "backup of versions {}..={version} complete ({bytes} bytes); for the next incremental backup use --since {version}",
        since + 1
    );
    if output.is_some() {
        println!("version {version}");
    }
    Ok(())
}

/// Copies the backup stream to where `--output` says (`target`: whether
/// it is written as it is, and the path; `None`: standard output),
/// checking it as it goes ([`kvdb::storage::receive_backup`]): a stream
/// that ends before its footer is refused, never called complete, whatever
/// the transport made of its end (found by a review: a body delimited by
/// the connection's close, or a server whose backup task died, ended
/// "cleanly" and the cut-off file was renamed into place).
fn receive(
    reader: &mut dyn std::io::Read,
    target: Option<&(bool, std::path::PathBuf)>,
) -> anyhow::Result<kvdb::storage::Received> {
    match target {
        Some((true, path)) => {
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            kvdb::storage::receive_backup(reader, &mut out).map_err(|e| {
                not_whole(
                    &e,
                    &format!(
                        "what went into {} is incomplete (a restore refuses it)",
                        path.display()
                    ),
                )
            })
        }
        Some((false, path)) => {
            // FILE.partial until complete (not `with_extension`, which would
            // take `b.partial` for `b.kvdb`, a file of the user's).
            let mut partial = path.as_os_str().to_owned();
            partial.push(".partial");
            let partial = std::path::PathBuf::from(partial);
            // Readable by its owner only: a backup holds every bucket's keys
            // in the clear (found by a review: it was made world-readable
            // under the usual umask).
            // Set on the open file, not only at creation: a `.partial`
            // left by an earlier run keeps its mode otherwise (found by a
            // review), and nothing is written before.
            let mut file = std::fs::File::create(&partial)
                .with_context(|| format!("creating {}", partial.display()))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                file.set_permissions(std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("making {} private", partial.display()))?;
            }
            let received = match kvdb::storage::receive_backup(reader, &mut file) {
                Ok(received) => received,
                Err(e) => {
                    drop(file);
                    // Removed rather than kept: it can't be resumed or
                    // restored, and it holds keys in the clear.
                    let left = match std::fs::remove_file(&partial) {
                        Ok(()) => format!(
                            "the incomplete {} was removed and {} not written",
                            partial.display(),
                            path.display()
                        ),
                        Err(_) => format!(
                            "{} is incomplete: delete it ({} was not written)",
                            partial.display(),
                            path.display()
                        ),
                    };
                    return Err(not_whole(&e, &left));
                }
            };
            file.sync_all()
                .with_context(|| format!("syncing {}", partial.display()))?;
            std::fs::rename(&partial, path)
                .with_context(|| format!("renaming {} to {}", partial.display(), path.display()))?;
            // The rename itself on disk too: after a power cut the backup
            // is there under its name (found by a review).
            let folder = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => std::path::Path::new("."),
            };
            std::fs::File::open(folder)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("syncing the directory {}", folder.display()))?;
            Ok(received)
        }
        None => {
            let mut out = std::io::stdout().lock();
            if out.is_terminal() {
                bail!(
                    "refusing to write a binary backup to a terminal: use --output FILE or a pipe"
                );
            }
            // Streamed, not held in memory (a backup can be gigabytes): if
            // the transfer breaks, the reader of the pipe has a stream
            // without its footer, which a restore refuses, and this command
            // fails.
            kvdb::storage::receive_backup(reader, &mut out).map_err(|e| {
                not_whole(
                    &e,
                    "what went to the standard output is incomplete (a restore refuses it)",
                )
            })
        }
    }
}

/// A backup not received whole: why, what became of what was written
/// (`left`), and what to do.
fn not_whole(e: &kvdb::storage::ReceiveError, left: &str) -> anyhow::Error {
    match e {
        kvdb::storage::ReceiveError::Output(_) => anyhow::anyhow!(
            "the backup is not complete: {e}; {left}; free space (or fix the output), then run the backup again"
        ),
        _ => anyhow::anyhow!(
            "the backup was cut off before its end, so it is not complete: {e}; {left}; run the backup again"
        ),
    }
}

/// What a `path` that does not exist names once its symbolic links are
/// followed: a link whose target does not exist yet names that target.
fn resolve_link(path: &std::path::Path) -> std::path::PathBuf {
    let mut path = path.to_owned();
    // A bounded number of links, as the system follows them.
    for _ in 0..40 {
        let Ok(target) = std::fs::read_link(&path) else {
            break;
        };
        path = match path.parent() {
            Some(dir) => dir.join(target),
            None => target,
        };
    }
    path
}

/// Whether `path` is this process's standard output (the same file).
fn is_stdout(path: &std::path::Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(path), std::fs::metadata("/dev/stdout")) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

fn restore(args: &RestoreArgs) -> anyhow::Result<()> {
    // The memory backend keeps nothing: a restore into it would report
    // success and leave nothing behind (KVDB_BACKEND=memory left over from a
    // development server, say).
    anyhow::ensure!(
        args.backend != BackendKind::Memory,
        "kvdb restore writes a data directory, and the memory backend has none: restore with --backend redb (check KVDB_BACKEND), then serve that directory"
    );
    // Check every file whole, and that each continues the one before it,
    // before touching the data directory.
    let mut previous: Option<(&std::path::Path, kvdb::storage::BackupInfo)> = None;
    let mut first = None;
    for path in &args.files {
        // Each file is read twice (checked whole first): a pipe would be
        // empty the second time (found by a review: the error then called
        // a good backup corrupt, and left a data directory behind).
        anyhow::ensure!(
            !std::fs::metadata(path).is_ok_and(|m| !m.is_file()),
            "{} is not a regular file (a pipe or a device?): kvdb restore reads each backup twice, checking it whole before it touches the data directory; save the backup to a file first (kvdb backup --output FILE)",
            path.display()
        );
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let info =
            kvdb::storage::verify_backup(&mut std::io::BufReader::with_capacity(256 * 1024, file))
                .with_context(|| format!("checking {}", path.display()))?;
        if let Some((before, b)) = previous {
            anyhow::ensure!(
                info.since != 0,
                "{} is a full backup, and full backups come first: kvdb restore --data DIR FULL [INCREMENT...], the increments in the order they were taken",
                path.display()
            );
            if let (Some(base), Some(before_from)) = (info.base, b.lineage) {
                anyhow::ensure!(
                    base == before_from,
                    "{} was taken from another server than {}: {}",
                    path.display(),
                    before.display(),
                    kvdb::storage::backup_other_server_hint()
                );
            }
            anyhow::ensure!(
                info.since == b.version,
                "{} does not continue {}: {}",
                path.display(),
                before.display(),
                kvdb::storage::backup_chain_hint(info.since, b.version)
            );
        }
        first.get_or_insert((path, info.since));
        previous = Some((path, info));
    }
    // A chain that starts with an increment continues a directory restored
    // before: refuse it here if there is none, rather than create one.
    if let Some((first, since)) = first
        && since != 0
        && !args.data.join(kvdb::storage::redb::FILE_NAME).exists()
    {
        anyhow::bail!(
            "{} is an increment (it continues from version {since}), and {} holds no restored data: restore the full backup first, then each increment in the order they were taken",
            first.display(),
            args.data.display()
        );
    }
    let store = Store::open(open_backend(args.backend, &args.data)?, Durability::Strict)?;
    for path in &args.files {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut input = std::io::BufReader::with_capacity(256 * 1024, file);
        let info = store
            .restore(&mut input)
            .with_context(|| format!("restoring {}", path.display()))?;
        eprintln!(
            "restored {} (versions {}..={})",
            path.display(),
            info.since + 1,
            info.version
        );
    }
    store.close().context(
        "syncing the restored store (free space or fix the disk, then run the restore again into an empty directory)",
    )?;
    Ok(())
}
