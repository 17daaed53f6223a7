//! The in-memory backend: fast, volatile, for development and tests.
//!
//! The map is a persistent (structurally shared) ordered map, so a snapshot is
//! an O(1) clone that later writes never disturb, and a write transaction works
//! on its own clone that replaces the current map only on commit.

use std::ops::Bound;
use std::sync::RwLock;

use bytes::Bytes;
use imbl::OrdMap;

use super::{Backend, RawChange, RawRead, RawWrite, StorageError};

type Map = OrdMap<Bytes, Bytes>;

/// A backend that keeps everything in memory and forgets it on exit.
#[derive(Default)]
pub struct MemoryBackend {
    current: RwLock<Map>,
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self::default()
    }

    fn current(&self) -> Map {
        // A poisoned lock only means a writer panicked before replacing the map,
        // which it does in one assignment: the map itself is always whole.
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

struct MemoryView(Map);

fn scan_map(
    map: &Map,
    lower: Bound<&[u8]>,
    upper: Bound<&[u8]>,
    reverse: bool,
    visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
) {
    if let (Bound::Included(l) | Bound::Excluded(l), Bound::Included(u) | Bound::Excluded(u)) =
        (lower, upper)
        && l > u
    {
        return;
    }
    let range = map.range::<_, [u8]>((lower, upper));
    if reverse {
        for (k, v) in range.rev() {
            if !visit(k, v) {
                break;
            }
        }
    } else {
        for (k, v) in range {
            if !visit(k, v) {
                break;
            }
        }
    }
}

impl RawRead for MemoryView {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.0.get(key).map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        reverse: bool,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        scan_map(&self.0, lower, upper, reverse, visit);
        Ok(())
    }
}

impl RawWrite for MemoryView {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        RawRead::get(self, key)
    }

    fn scan(
        &self,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        reverse: bool,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        RawRead::scan(self, lower, upper, reverse, visit)
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        self.0
            .insert(Bytes::copy_from_slice(key), Bytes::copy_from_slice(value));
        Ok(())
    }

    fn replace(
        &mut self,
        key: &[u8],
        value: &[u8],
        old: &mut dyn FnMut(&[u8]),
    ) -> Result<(), StorageError> {
        if let Some(previous) = self
            .0
            .insert(Bytes::copy_from_slice(key), Bytes::copy_from_slice(value))
        {
            old(&previous);
        }
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> Result<(), StorageError> {
        self.0.remove(key);
        Ok(())
    }

    fn take(&mut self, key: &[u8], old: &mut dyn FnMut(&[u8])) -> Result<(), StorageError> {
        if let Some(previous) = self.0.remove(key) {
            old(&previous);
        }
        Ok(())
    }

    fn update(&mut self, key: &[u8], change: &mut RawChange<'_>) -> Result<(), StorageError> {
        if let Some(current) = self.0.get_mut(key) {
            if let Some(new) = change(Some(current)) {
                *current = Bytes::from(new);
            }
        } else if let Some(new) = change(None) {
            self.0.insert(Bytes::copy_from_slice(key), Bytes::from(new));
        }
        Ok(())
    }
}

impl Backend for MemoryBackend {
    fn snapshot(&self) -> Result<Box<dyn RawRead>, StorageError> {
        Ok(Box::new(MemoryView(self.current())))
    }

    fn write(
        &self,
        _durable: bool,
        body: &mut dyn FnMut(&mut dyn RawWrite) -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        let mut txn = MemoryView(self.current());
        body(&mut txn)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = txn.0;
        Ok(())
    }

    fn sync(&self) -> Result<(), StorageError> {
        Ok(())
    }
}
