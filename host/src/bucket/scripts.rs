//! Scripts as bucket data, so they survive restarts, belong to backups and go
//! when the bucket goes: `id(16) 's' name` holds the script's metadata (kind,
//! time, size, SHA-256 of the source), `id(16) 'c' name` its source (tagged
//! with the metadata's version). A run reads the small metadata and loads the source only when
//! its runtime has not compiled that version yet.
//!
//! Managing scripts needs the admin; loading one to run it needs nothing (the
//! run is then confined to the caller's scope by the runtime, through
//! [`Scoped`]). Validation of the source is the script runtime's business.

use std::collections::HashMap;
use std::fmt;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::Digest;

use super::{Bucket, BucketError, BucketId, Scoped, now_s};

const KIND_LUA: u8 = 0x20;
const KIND_WASM: u8 = 0x21;
const KIND_SOURCE: u8 = 0x22;

/// The longest script name (API.md).
pub const MAX_SCRIPT_NAME: usize = 64;

/// A script's name: 1–64 characters of `A-Z a-z 0-9 _ - .`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScriptName(String);

impl ScriptName {
    /// # Errors
    /// A name that breaks the rule above (400).
    pub fn new(s: &str) -> Result<Self, BucketError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_SCRIPT_NAME
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if ok && matches!(s, "." | "..") {
            Err(BucketError::Invalid(format!(
                "a script can't be named {s:?}: browsers and curl take it as a step in the path (the URL would name the bucket's listing, not the script)"
            )))
        } else if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(BucketError::Invalid(format!(
                "a script name is 1 to {MAX_SCRIPT_NAME} characters of A-Z a-z 0-9 _ - . ({s:?} is not)"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ScriptName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ScriptName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ScriptName({:?})", self.0)
    }
}

/// Which runtime runs a script.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScriptKind {
    Lua,
    Wasm,
}

impl ScriptKind {
    pub fn name(self) -> &'static str {
        match self {
            ScriptKind::Lua => "lua",
            ScriptKind::Wasm => "wasm",
        }
    }

    fn tag(self) -> u8 {
        match self {
            ScriptKind::Lua => KIND_LUA,
            ScriptKind::Wasm => KIND_WASM,
        }
    }

    fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            KIND_LUA => Some(ScriptKind::Lua),
            KIND_WASM => Some(ScriptKind::Wasm),
            _ => None,
        }
    }
}

/// A stored script's metadata (its source is loaded on demand).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredScript {
    pub bucket: BucketId,
    pub name: ScriptName,
    pub kind: ScriptKind,
    /// Bytes of source.
    pub size: u64,
    /// The store-wide version of the upload.
    pub version: u64,
    /// SHA-256 of the source: the key of compiled-code caches, so the same
    /// code uploaded twice (or to two buckets) is compiled once.
    pub digest: [u8; 32],
    /// Unix seconds.
    pub updated_at: u64,
}

impl StoredScript {
    /// The listing entry: name, kind, size, updated_at.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name.as_str(),
            "kind": self.kind.name(),
            "size": self.size,
            "updated_at": self.updated_at,
        })
    }
}

fn script_prefix(id: &BucketId) -> Vec<u8> {
    let mut k = id.to_bytes().to_vec();
    k.push(b's');
    k
}

fn script_key(id: &BucketId, name: &ScriptName) -> Vec<u8> {
    let mut k = script_prefix(id);
    k.extend_from_slice(name.as_str().as_bytes());
    k
}

fn source_key(id: &BucketId, name: &ScriptName) -> Vec<u8> {
    let mut k = id.to_bytes().to_vec();
    k.push(b'c');
    k.extend_from_slice(name.as_str().as_bytes());
    k
}

fn be_u64(b: &[u8]) -> Option<u64> {
    let mut a = [0u8; 8];
    a.copy_from_slice(b.get(..8)?);
    Some(u64::from_be_bytes(a))
}

fn decode(
    bucket: BucketId,
    name: ScriptName,
    entry: crate::storage::Entry,
) -> Option<StoredScript> {
    let kind = ScriptKind::from_tag(entry.kind)?;
    Some(StoredScript {
        bucket,
        name,
        kind,
        updated_at: be_u64(entry.value.get(..8)?)?,
        size: be_u64(entry.value.get(8..16)?)?,
        digest: entry.value.get(16..48)?.try_into().ok()?,
        version: entry.version,
    })
}

/// Buckets past which the script cache starts over.
const MAX_CACHED_BUCKETS: usize = 4096;

/// Script metadata as last read, so that a run does not read it from the
/// store each time. Every script upload or deletion (and bucket deletion)
/// bumps the generation, after its write committed; an entry is used only
/// if it was read in the current generation. A reader takes the generation
/// before it reads the store, so a stale read can never pass for current.
#[derive(Default)]
pub(super) struct ScriptCache {
    generation: AtomicU64,
    entries: RwLock<HashMap<BucketId, BucketScripts>>,
}

/// One bucket's cached scripts, each with the generation it was read in.
type BucketScripts = HashMap<ScriptName, (u64, StoredScript)>;

impl ScriptCache {
    /// After a committed change to any script.
    pub(super) fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn get(&self, bucket: BucketId, name: &ScriptName) -> Option<StoredScript> {
        let generation = self.generation.load(Ordering::Acquire);
        let entries = self
            .entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match entries.get(&bucket)?.get(name) {
            Some((read_in, script)) if *read_in == generation => Some(script.clone()),
            _ => None,
        }
    }

    fn put(&self, generation: u64, script: &StoredScript) {
        let mut entries = self
            .entries
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if entries.len() >= MAX_CACHED_BUCKETS && !entries.contains_key(&script.bucket) {
            entries.clear();
        }
        entries
            .entry(script.bucket)
            .or_default()
            .insert(script.name.clone(), (generation, script.clone()));
    }
}

impl Bucket {
    /// Loads a script to run it. Running is open to anyone who knows the
    /// bucket: what the run may do is the caller's scope.
    ///
    /// # Errors
    /// A storage failure.
    pub fn load_script(&self, name: &ScriptName) -> Result<Option<StoredScript>, BucketError> {
        let cache = &self.buckets.scripts;
        if let Some(script) = cache.get(self.id, name) {
            return Ok(Some(script));
        }
        let generation = cache.generation.load(Ordering::Acquire);
        let entry = self
            .buckets
            .store
            .snapshot()?
            .get(&script_key(&self.id, name))?;
        let script = entry.and_then(|e| decode(self.id, name.clone(), e));
        if let Some(script) = &script {
            cache.put(generation, script);
        }
        Ok(script)
    }

    /// The source of `script`, as uploaded with that version.
    ///
    /// # Errors
    /// The script was replaced or deleted since its metadata was read
    /// ([`BucketError::ScriptNotFound`]), or a storage failure.
    pub fn script_source(&self, script: &StoredScript) -> Result<Vec<u8>, BucketError> {
        let entry = self
            .buckets
            .store
            .snapshot()?
            .get(&source_key(&self.id, &script.name))?;
        match entry {
            Some(e) if be_u64(&e.value) == Some(script.version) => Ok(e.value[8..].to_vec()),
            _ => Err(BucketError::ScriptNotFound(script.name.to_string())),
        }
    }
}

impl Scoped {
    /// Stores (or replaces) a script. The source must already be validated by
    /// its runtime.
    ///
    /// # Errors
    /// Not the admin, or a storage failure.
    pub async fn put_script(
        &self,
        name: &ScriptName,
        kind: ScriptKind,
        source: Vec<u8>,
    ) -> Result<StoredScript, BucketError> {
        let admin = self.admin_check()?;
        let id = self.bucket.id;
        let key = script_key(&id, name);
        let source_key = source_key(&id, name);
        let name = name.clone();
        let stored = self
            .store()
            .write_durable(move |ctx| -> Result<StoredScript, BucketError> {
                admin.check(ctx)?;
                let updated_at = now_s(ctx.now_ms());
                let size = source.len() as u64;
                let digest: [u8; 32] = sha2::Sha256::digest(&source).into();
                let mut meta = Vec::with_capacity(48);
                meta.extend_from_slice(&updated_at.to_be_bytes());
                meta.extend_from_slice(&size.to_be_bytes());
                meta.extend_from_slice(&digest);
                let version = ctx.put(&key, kind.tag(), &meta, 0)?;
                let mut tagged = Vec::with_capacity(8 + source.len());
                tagged.extend_from_slice(&version.to_be_bytes());
                tagged.extend_from_slice(&source);
                ctx.put(&source_key, KIND_SOURCE, &tagged, 0)?;
                Ok(StoredScript {
                    bucket: id,
                    name,
                    kind,
                    size,
                    version,
                    digest,
                    updated_at,
                })
            })
            .await?;
        self.bucket.buckets.scripts.changed();
        stored
    }

    /// A script's metadata, for the admin (the editor).
    ///
    /// # Errors
    /// Not the admin, or a storage failure.
    pub fn script(&self, name: &ScriptName) -> Result<Option<StoredScript>, BucketError> {
        self.require_admin()?;
        self.bucket.load_script(name)
    }

    /// Deletes a script.
    ///
    /// # Errors
    /// Not the admin, no such script, or a storage failure.
    pub async fn delete_script(&self, name: &ScriptName) -> Result<(), BucketError> {
        let admin = self.admin_check()?;
        let id = self.bucket.id;
        let key = script_key(&id, name);
        let source_key = source_key(&id, name);
        let shown = name.to_string();
        let deleted = self
            .store()
            .write_durable(move |ctx| -> Result<(), BucketError> {
                admin.check(ctx)?;
                if ctx.get(&key)?.is_none() {
                    return Err(BucketError::ScriptNotFound(shown));
                }
                ctx.delete(&key)?;
                ctx.delete(&source_key)?;
                Ok(())
            })
            .await?;
        self.bucket.buckets.scripts.changed();
        deleted
    }

    /// Every script of the bucket, by name.
    ///
    /// # Errors
    /// Not the admin, or a storage failure.
    pub fn list_scripts(&self) -> Result<Vec<StoredScript>, BucketError> {
        self.require_admin()?;
        let id = self.bucket.id;
        let prefix = script_prefix(&id);
        let end = crate::storage::prefix_end(&prefix);
        let mut out = Vec::new();
        self.store().snapshot()?.scan(
            std::ops::Bound::Included(&prefix),
            end.as_deref()
                .map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded),
            false,
            &mut |k, entry| {
                if let Some(name) = std::str::from_utf8(&k[prefix.len()..])
                    .ok()
                    .and_then(|n| ScriptName::new(n).ok())
                    && let Some(script) = decode(id, name, entry)
                {
                    out.push(script);
                }
                true
            },
        )?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_names_follow_the_rule() {
        for ok in [
            "a",
            "hello-world_1.lua",
            &"x".repeat(64),
            "...",
            ".a",
            "a..",
        ] {
            assert!(ScriptName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "a b", "ü", &"x".repeat(65), "edit?", ".", ".."] {
            assert!(ScriptName::new(bad).is_err(), "{bad}");
        }
    }
}
