//! KVdb: a key-value database as a service.
//!
//! The map, bottom up:
//!
//! - [`storage`]: the backend trait, the redb and memory backends, and the
//!   [`Store`](storage::Store) that adds entries, expiry, versions, group
//!   commit and backups. The only code that touches a storage engine.
//! - [`bucket`]: bucket ids, keys, typed values, policies, scopes, and
//!   [`Scoped`](bucket::Scoped), the one place where permissions are checked.
//! - [`auth`]: credentials (keys, JWT access tokens) to a scope.
//! - [`script`]: scripts that run next to the data: the shared host API,
//!   limits, the Lua runtime and the WebAssembly runtime.
//! - [`http`]: the axum routes of API.md, mapping errors to problem documents.
//! - [`config`]: the command line.
//!
//! [`run`] serves a router on a listener until a shutdown signal, then
//! finishes requests in flight and syncs the store.

pub mod auth;
pub mod bucket;
pub mod config;
pub mod http;
pub mod script;
pub mod storage;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bucket::Buckets;
use storage::StorageError;

/// How often expired entries and deleted buckets are reclaimed when nothing
/// asks sooner: expired entries are invisible at once, so this only bounds
/// how long their space stays taken.
pub const GC_INTERVAL: Duration = Duration::from_secs(10);

/// How long a shutdown waits for requests in flight before it stops anyway
/// (a backup being streamed, a script stuck in a C call).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Reclaims space in the background: on a timer, and at once when a bucket is
/// deleted. Each step is a small write batch, so requests never stall on it.
pub async fn gc_loop(buckets: Arc<Buckets>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(GC_INTERVAL) => {}
            () = buckets.purge_wanted().notified() => {}
        }
        match buckets.store().gc().await {
            Ok(stats) if stats != storage::GcStats::default() => {
                tracing::info!(?stats, "reclaimed space");
            }
            Ok(_) => {}
            Err(storage::StorageError::Closed) => return,
            Err(e) => tracing::error!(error = %e, "background clean-up failed"),
        }
    }
}

/// Serves `state` on `listener` until `shutdown` resolves; then stops
/// accepting, lets requests in flight finish, and closes (syncs) the store.
///
/// # Errors
/// The listener fails, or the store's last sync (see [`storage::Store::close`]).
pub async fn run(
    listener: tokio::net::TcpListener,
    state: http::AppState,
    read_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let buckets = state.buckets.clone();
    let gc = tokio::spawn(gc_loop(buckets.clone()));
    let app = http::App::new(state);
    let (stopping, mut stopped) = tokio::sync::watch::channel(false);
    let signal = async move {
        shutdown.await;
        let _ = stopping.send(true);
    };
    let serve = async move {
        http::serve::serve(listener, app, read_timeout, signal).await;
        Ok::<(), std::io::Error>(())
    };
    let grace = async move {
        let _ = stopped.wait_for(|s| *s).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let served = tokio::select! {
        served = serve => served,
        () = grace => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "requests still running after the grace period: stopping anyway");
            Ok(())
        }
    };
    gc.abort();
    let store = buckets.store().clone();
    // Closing joins the writer thread (it drains and syncs): off the runtime.
    let closed = tokio::task::spawn_blocking(move || store.close())
        .await
        .map_err(|e| StorageError::Engine(format!("its task failed: {e}")))
        .and_then(|closed| closed);
    served?;
    // A server that could not put what it acknowledged on disk does not
    // say it stopped cleanly (a relaxed store's last second, or any store
    // after a disk error: found by a review).
    closed.map_err(|e| {
        std::io::Error::other(format!(
            "closing the store: {e}; free space or fix the disk, then restart"
        ))
    })
}
