//! Storage: the only code that touches a storage engine.
//!
//! Two layers, after the seed's `KVBackend`:
//!
//! - [`Backend`] is an ordered byte-to-byte map with snapshot reads and
//!   all-or-nothing write transactions. It is all an engine has to provide;
//!   [`redb`] (durable, the default) and [`memory`] implement it.
//! - [`Store`] builds the KVdb semantics on top of any backend, once: entries
//!   with a type tag, an expiry and a version; expiry that hides an entry at
//!   once and reclaims it in the background ([`Store::gc`]); tombstones for
//!   incremental [`backup`](Store::backup) / [`restore`](Store::restore); and
//!   group commit, so that many concurrent writers share one fsync.
//!
//! This module knows nothing of buckets, keys, permissions or HTTP: its keys
//! and values are bytes. All writes go through one writer thread (see
//! the `store` module); reads are snapshot reads that never wait for a writer.

mod backup;
pub mod memory;
mod received;
pub mod redb;
mod store;

#[cfg(test)]
mod conformance;

use std::ops::Bound;

pub use backup::{
    BackupInfo, Lineage, chain_hint as backup_chain_hint,
    other_server_hint as backup_other_server_hint, verify as verify_backup,
};
pub use received::{ReceiveError, Received, copy as receive_backup};
pub(crate) use store::prefix_end;
pub use store::{Backup, Durability, Entry, GcStats, NewValue, Snapshot, Store, WriteCtx};

/// A failure of the storage engine or of the data it holds.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage engine: {0}")]
    Engine(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the store is shutting down")]
    Closed,
    #[error("backup: {0}")]
    Backup(String),
    #[error(
        "an incremental backup since version {since} is no longer possible: this store keeps no record of deletions up to version {horizon} (forgotten after the retention time, or applied by the restore it came from); take a full backup (since 0)"
    )]
    BackupTooOld { since: u64, horizon: u64 },
    #[error(
        "an incremental backup since version {since} is no longer possible: a backup was restored into this store after that version (its versions went on from {floor}), and an increment from before it would miss what the restore changed; take a full backup (since 0)"
    )]
    BackupBeforeRestore { since: u64, floor: u64 },
    #[error(
        "an incremental backup since version {since} is not possible: this store only reaches version {version} (was that version printed by a backup of another server?); take a full backup (since 0), or pass the version a backup of this server printed"
    )]
    BackupAhead { since: u64, version: u64 },
    #[error("restore: {0}")]
    Restore(String),
    /// The system's error as it is (`{:#}` of a message with it as its
    /// source said it twice).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A point-in-time, read-only view of a backend.
pub trait RawRead: Send + Sync {
    /// The value stored under `key`.
    ///
    /// # Errors
    /// An engine failure.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;

    /// Visits the pairs with keys in `(lower, upper)` in byte order (or reverse),
    /// until `visit` returns `false`.
    ///
    /// # Errors
    /// An engine failure.
    fn scan(
        &self,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        reverse: bool,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError>;
}

/// The inside of a write transaction: reads see the transaction's own writes.
pub trait RawWrite {
    /// # Errors
    /// An engine failure.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;
    /// # Errors
    /// An engine failure.
    fn scan(
        &self,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        reverse: bool,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError>;
    /// # Errors
    /// An engine failure.
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), StorageError>;
    /// [`RawWrite::put`], calling `old` with the value it replaces if there
    /// was one: the insert hands it back, one lookup where `get` and then
    /// `put` take two.
    ///
    /// # Errors
    /// An engine failure.
    fn replace(
        &mut self,
        key: &[u8],
        value: &[u8],
        old: &mut dyn FnMut(&[u8]),
    ) -> Result<(), StorageError>;
    /// # Errors
    /// An engine failure.
    fn delete(&mut self, key: &[u8]) -> Result<(), StorageError>;
    /// [`RawWrite::delete`], calling `old` with the value it removes if there
    /// was one: the removal hands it back, one lookup where `get` and then
    /// `delete` take two.
    ///
    /// # Errors
    /// An engine failure.
    fn take(&mut self, key: &[u8], old: &mut dyn FnMut(&[u8])) -> Result<(), StorageError>;
    /// Calls `change` once with the value under `key` (`None` if there is
    /// none) and stores the value it returns in its place; `None` leaves the
    /// key as it was. Where the backend allows, one lookup where `get` and
    /// then `put` take two (redb: for a key that exists and a value that does
    /// not grow).
    ///
    /// # Errors
    /// An engine failure.
    fn update(&mut self, key: &[u8], change: &mut RawChange<'_>) -> Result<(), StorageError>;
}

/// What [`RawWrite::update`] calls with the current value (if any): the new
/// value, or `None` to leave it.
pub type RawChange<'a> = dyn FnMut(Option<&[u8]>) -> Option<Vec<u8>> + 'a;

/// A storage engine: an ordered map of bytes with snapshots and transactions.
///
/// Implementations are blocking; [`Store`] calls [`Backend::write`] from its
/// writer thread only, so a backend never sees two write transactions at once.
pub trait Backend: Send + Sync + 'static {
    /// A consistent snapshot of everything committed so far.
    ///
    /// # Errors
    /// An engine failure.
    fn snapshot(&self) -> Result<Box<dyn RawRead>, StorageError>;

    /// Runs `body` in one write transaction and commits it if `body` returns
    /// `Ok`; on `Err` nothing it wrote is kept. With `durable`, the commit is on
    /// stable storage when this returns.
    ///
    /// # Errors
    /// `body`'s error, or an engine failure (then nothing is committed).
    fn write(
        &self,
        durable: bool,
        body: &mut dyn FnMut(&mut dyn RawWrite) -> Result<(), StorageError>,
    ) -> Result<(), StorageError>;

    /// Makes every commit so far durable.
    ///
    /// # Errors
    /// An engine failure.
    fn sync(&self) -> Result<(), StorageError>;
}
