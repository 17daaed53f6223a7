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

impl RedbBackend {
    /// Opens (or creates) the database in `dir`.
    ///
    /// # Errors
    /// The directory can't be created, or the file can't be opened (another
    /// process holds it, or it is not a redb file).
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE_NAME);
        let db = Database::builder()
            .create(&path)
            .map_err(|e| StorageError::Engine(format!("opening {}: {e}", path.display())))?;
        let backend = Self { db };
        // Create the table so that read transactions can always open it.
        backend.write(true, &mut |_| Ok(()))?;
        Ok(backend)
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
        // insert would) and replaces the value in place when it fits.
        if let Some(mut current) = self.0.get_mut(key).map_err(engine)? {
            if let Some(new) = change(Some(current.value())) {
                current.insert(new.as_slice()).map_err(engine)?;
            }
        } else if let Some(new) = change(None) {
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
