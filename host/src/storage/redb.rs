//! The redb backend: one table of bytes to bytes in one file, `kvdb.redb`.
//!
//! redb is blocking and allows one write transaction at a time, which is what
//! the store's single writer thread gives it. Snapshots are redb read
//! transactions: they never wait for the writer.

use std::ops::Bound;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Backend, RawChange, RawRead, RawWrite, StorageError};

const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");

/// The file name inside the data directory.
pub const FILE_NAME: &str = "kvdb.redb";

/// A durable backend on a redb file.
pub struct RedbBackend {
    db: Database,
}

fn engine(e: impl std::fmt::Display) -> StorageError {
    StorageError::Engine(e.to_string())
}

/// Where a new database file is made before it takes [`FILE_NAME`].
const NEW_FILE_NAME: &str = "kvdb.redb.new";

impl RedbBackend {
    /// Opens (or creates) the database in `dir`.
    ///
    /// A new database is made whole before it takes its name: initialised
    /// as [`NEW_FILE_NAME`], committed, then renamed (and the directory
    /// synced), so that a server killed while it makes one leaves no file
    /// that is not a database (one was left, refused at every start after,
    /// found by a review). A directory and file it makes are its owner's
    /// only (0700, 0600): they hold every bucket's keys, as a backup does.
    ///
    /// # Errors
    /// The directory can't be created, or the file can't be opened (another
    /// process holds it, or it is not a redb file).
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        let mut folder = std::fs::DirBuilder::new();
        folder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut folder, 0o700);
        folder.create(dir)?;
        let path = dir.join(FILE_NAME);
        if !path.exists() {
            Self::create(dir)?;
        }
        let db = Database::builder()
            .create(&path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StorageError::Engine(format!(
                    "{} is in use by another process (a running kvdb serve, or a restore): stop it, or use another data directory",
                    path.display()
                )),
                e => StorageError::Engine(format!("opening {}: {e}", path.display())),
            })?;
        let backend = Self { db };
        // Create the table so that read transactions can always open it.
        backend.write(true, &mut |_| Ok(()))?;
        Ok(backend)
    }

    /// Makes a new, empty database as `dir`/[`FILE_NAME`] (see
    /// [`RedbBackend::open`]). A [`NEW_FILE_NAME`] left by a process killed
    /// while making one is made again. Two processes starting on the same
    /// new directory take turns (a lock on the directory): the second
    /// finds the database made.
    fn create(dir: &Path) -> Result<(), StorageError> {
        let turn = std::fs::File::open(dir)?;
        turn.lock()?;
        if dir.join(FILE_NAME).exists() {
            return Ok(());
        }
        let new = dir.join(NEW_FILE_NAME);
        match std::fs::remove_file(&new) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let mut file = std::fs::OpenOptions::new();
        file.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
        file.open(&new)?;
        let db = Database::builder()
            .create(&new)
            .map_err(|e| StorageError::Engine(format!("creating {}: {e}", new.display())))?;
        Self { db }.write(true, &mut |_| Ok(()))?;
        std::fs::rename(&new, dir.join(FILE_NAME))?;
        turn.sync_all()?;
        Ok(())
    }
}

fn scan_table<T: ReadableTable<&'static [u8], &'static [u8]>>(
    table: &T,
    lower: Bound<&[u8]>,
    upper: Bound<&[u8]>,
    reverse: bool,
    visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
) -> Result<(), StorageError> {
    if let (Bound::Included(l) | Bound::Excluded(l), Bound::Included(u) | Bound::Excluded(u)) =
        (lower, upper)
        && l > u
    {
        return Ok(());
    }
    let range = table.range::<&[u8]>((lower, upper)).map_err(engine)?;
    let mut go = |item: Result<_, redb::StorageError>| -> Result<bool, StorageError> {
        let (k, v): (redb::AccessGuard<&[u8]>, redb::AccessGuard<&[u8]>) = item.map_err(engine)?;
        Ok(visit(k.value(), v.value()))
    };
    if reverse {
        for item in range.rev() {
            if !go(item)? {
                break;
            }
        }
    } else {
        for item in range {
            if !go(item)? {
                break;
            }
        }
    }
    Ok(())
}

struct Snapshot(redb::ReadOnlyTable<&'static [u8], &'static [u8]>);

impl RawRead for Snapshot {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.0.get(key).map_err(engine)?.map(|v| v.value().to_vec()))
    }

    fn scan(
        &self,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        reverse: bool,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        scan_table(&self.0, lower, upper, reverse, visit)
    }
}

struct Txn<'a, 't>(&'a mut redb::Table<'t, &'static [u8], &'static [u8]>);

impl RawWrite for Txn<'_, '_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.0.get(key).map_err(engine)?.map(|v| v.value().to_vec()))
    }

    fn scan(
        &self,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        reverse: bool,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        scan_table(&*self.0, lower, upper, reverse, visit)
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        self.0.insert(key, value).map_err(engine)?;
        Ok(())
    }

    fn replace(
        &mut self,
        key: &[u8],
        value: &[u8],
        old: &mut dyn FnMut(&[u8]),
    ) -> Result<(), StorageError> {
        if let Some(previous) = self.0.insert(key, value).map_err(engine)? {
            old(previous.value());
        }
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> Result<(), StorageError> {
        self.0.remove(key).map_err(engine)?;
        Ok(())
    }

    fn take(&mut self, key: &[u8], old: &mut dyn FnMut(&[u8])) -> Result<(), StorageError> {
        if let Some(previous) = self.0.remove(key).map_err(engine)? {
            old(previous.value());
        }
        Ok(())
    }

    fn update(&mut self, key: &[u8], change: &mut RawChange<'_>) -> Result<(), StorageError> {
        // `get_mut` finds the leaf once (copying the path to it, as an
        // insert would), and a value that does not grow is replaced there in
        // place. A longer one goes through `insert`, which splits a full
        // leaf: the guard's own insert would rebuild it as one ever larger
        // page, which every later write to it would copy whole.
        let longer = match self.0.get_mut(key).map_err(engine)? {
            Some(mut current) => match change(Some(current.value())) {
                Some(new) if new.len() <= current.value().len() => {
                    current.insert(new.as_slice()).map_err(engine)?;
                    None
                }
                other => other,
            },
            None => change(None),
        };
        if let Some(new) = longer {
            self.0.insert(key, new.as_slice()).map_err(engine)?;
        }
        Ok(())
    }
}

impl Backend for RedbBackend {
    fn snapshot(&self) -> Result<Box<dyn RawRead>, StorageError> {
        let txn = self.db.begin_read().map_err(engine)?;
        Ok(Box::new(Snapshot(txn.open_table(TABLE).map_err(engine)?)))
    }

    fn write(
        &self,
        durable: bool,
        body: &mut dyn FnMut(&mut dyn RawWrite) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        let mut txn = self.db.begin_write().map_err(engine)?;
        txn.set_durability(if durable {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        })
        .map_err(engine)?;
        {
            let mut table = txn.open_table(TABLE).map_err(engine)?;
            body(&mut Txn(&mut table))?;
        }
        txn.commit().map_err(engine)
    }

    fn sync(&self) -> Result<(), StorageError> {
        // An empty durable commit makes every earlier non-durable commit durable.
        self.write(true, &mut |_| Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::ops::Bound;

    use super::{FILE_NAME, RedbBackend};
    use crate::storage::{Backend, RawWrite};

    fn contents(backend: &RedbBackend) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut all = BTreeMap::new();
        backend
            .snapshot()
            .expect("snapshot")
            .scan(Bound::Unbounded, Bound::Unbounded, false, &mut |k, v| {
                all.insert(k.to_vec(), v.to_vec());
                true
            })
            .expect("scan");
        all
    }

    /// A new database appears whole or not at all, its owner's only: what
    /// a process killed while making one left (here a file that is not a
    /// database, as redb leaves one half made) is made again, and the file
    /// is never opened under its name before it is a database (one killed
    /// in the middle was refused at every start after).
    #[test]
    fn a_new_database_is_made_whole_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("data");
        std::fs::create_dir(&dir).expect("dir");
        std::fs::write(dir.join(super::NEW_FILE_NAME), vec![0u8; 72 * 1024]).expect("stale");
        let backend = RedbBackend::open(&dir).expect("open over a half-made file");
        backend
            .write(true, &mut |w: &mut dyn RawWrite| w.put(b"k", b"v"))
            .expect("write");
        drop(backend);
        assert!(!dir.join(super::NEW_FILE_NAME).exists());
        let mode = |p: &std::path::Path| {
            std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
        };
        assert_eq!(mode(&dir.join(FILE_NAME)), 0o600);
        let backend = RedbBackend::open(&dir).expect("reopen");
        assert_eq!(contents(&backend).get(&b"k"[..]), Some(&b"v".to_vec()));
        // A directory it makes is private too (not one that was there).
        let fresh = root.path().join("a").join("b");
        drop(RedbBackend::open(&fresh).expect("open a new directory"));
        assert_eq!(mode(&fresh), 0o700);
        assert_eq!(mode(&fresh.join(FILE_NAME)), 0o600);
        assert_eq!(mode(&dir), 0o777 & !umask());
    }

    /// Openers racing on one new directory take turns making the
    /// database: each either opens it or finds it in use, never a missing
    /// or half-made file, and what is left opens.
    #[test]
    fn openers_racing_on_a_new_directory_leave_one_database() {
        for _ in 0..20 {
            let root = tempfile::tempdir().expect("tempdir");
            let dir = root.path().join("data");
            let start = std::sync::Barrier::new(4);
            std::thread::scope(|scope| {
                for _ in 0..4 {
                    scope.spawn(|| {
                        start.wait();
                        match RedbBackend::open(&dir) {
                            Ok(backend) => drop(backend),
                            Err(e) => assert!(e.to_string().contains("in use"), "{e}"),
                        }
                    });
                }
            });
            assert!(!dir.join(super::NEW_FILE_NAME).exists());
            drop(RedbBackend::open(&dir).expect("the database made"));
        }
    }

    /// The process's file mode creation mask.
    fn umask() -> u32 {
        let probe = tempfile::tempdir().expect("tempdir");
        let made = probe.path().join("probe");
        std::fs::create_dir(&made).expect("probe");
        0o777
            & !(std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(&made).expect("metadata").permissions(),
            ) & 0o777)
    }

    /// Values that an update makes longer go through a normal insert, which
    /// splits full leaves: 64 small values (one leaf) grown to 32 KiB each
    /// end up in many leaves, not in one page that holds them all.
    #[test]
    fn growing_values_split_their_leaves() {
        use redb::{ReadableDatabase, ReadableTableMetadata};
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let backend = RedbBackend::open(dir.path()).expect("open");
            for grow in [1, 8 * 1024, 8 * 1024, 8 * 1024, 8 * 1024] {
                backend
                    .write(false, &mut |txn: &mut dyn RawWrite| {
                        for i in 0..64 {
                            txn.update(format!("k{i:02}").as_bytes(), &mut |old| {
                                let mut v = old.map(<[u8]>::to_vec).unwrap_or_default();
                                v.resize(v.len() + grow, b'x');
                                Some(v)
                            })?;
                        }
                        Ok(())
                    })
                    .expect("commit");
            }
            backend.sync().expect("sync");
        }
        let db = redb::Database::open(dir.path().join(FILE_NAME)).expect("reopen");
        let txn = db.begin_read().expect("read");
        let table = txn.open_table(super::TABLE).expect("table");
        let stats = table.stats().expect("stats");
        assert!(
            stats.leaf_pages() >= 32,
            "{} leaf pages",
            stats.leaf_pages()
        );
        assert_eq!(stats.stored_bytes(), 64 * (3 + 1 + 32 * 1024));
    }

    /// Updates (in place when a value shrinks, by insert when it grows, past
    /// its page too), mixed with inserts and deletes in durable and
    /// non-durable commits, leave a file that redb's integrity check passes
    /// and that holds exactly what was written.
    #[test]
    fn updates_in_place_keep_the_file_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        {
            let backend = RedbBackend::open(dir.path()).expect("open");
            // A cheap deterministic sequence (xorshift).
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            let mut next = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            for round in 0..60 {
                let mut ops = Vec::new();
                for _ in 0..40 {
                    let key = format!("k{:04}", next() % 800).into_bytes();
                    let grow = usize::try_from(next() % 700).expect("small");
                    let kind = next() % 10;
                    ops.push((key, grow, kind));
                }
                let mut changes = BTreeMap::new();
                backend
                    .write(round % 3 == 0, &mut |txn: &mut dyn RawWrite| {
                        changes.clone_from(&model);
                        for (key, grow, kind) in &ops {
                            match kind {
                                0 => {
                                    txn.delete(key)?;
                                    changes.remove(key);
                                }
                                1 => {
                                    // Shrinks.
                                    txn.update(key, &mut |old| {
                                        old.map(|v| v[..v.len() / 2].to_vec())
                                    })?;
                                    if let Some(v) = changes.get_mut(key) {
                                        v.truncate(v.len() / 2);
                                    }
                                }
                                _ => {
                                    let tail = vec![
                                        b'a' + u8::try_from(*grow % 26).expect("letter");
                                        *grow
                                    ];
                                    txn.update(key, &mut |old| {
                                        let mut v = old.map(<[u8]>::to_vec).unwrap_or_default();
                                        v.extend_from_slice(&tail);
                                        Some(v)
                                    })?;
                                    changes
                                        .entry(key.clone())
                                        .or_default()
                                        .extend_from_slice(&tail);
                                }
                            }
                        }
                        Ok(())
                    })
                    .expect("commit");
                model = changes;
            }
            backend.sync().expect("sync");
            assert_eq!(contents(&backend), model);
        }
        let mut db = redb::Database::open(dir.path().join(FILE_NAME)).expect("reopen");
        assert!(db.check_integrity().expect("check"), "no repair needed");
        drop(db);
        let backend = RedbBackend::open(dir.path()).expect("open again");
        assert_eq!(contents(&backend), model);
    }
}
