//! The backup stream format: written by [`Backup`](super::store::Backup), read by
//! [`Store::restore`](super::Store::restore). Documented in `docs/backup-format.md`.
//!
//! ```text
//! header  "KVDBBAK\x02" since:u64 version:u64 lineage:16 bytes base:16 bytes
//! record  'D' version:u64 deleted_at:u64 len:u32 key         a deleted key
//!         'R' version:u64 deleted_at:u64 len:u32 prefix      a deleted prefix (bucket)
//!         'P' len:u32 key kind:u8 expires_at:u64 version:u64 len:u32 value
//! footer  'E' records:u64 crc32:u32                          CRC of every byte before 'E'
//! ```
//! Integers are big-endian. A stream without its footer, or whose CRC does not
//! match, is refused: a truncated backup is never half-restored silently.

use std::io::{BufWriter, Read, Write};

use super::StorageError;
use super::store::Entry;

const MAGIC: &[u8; 8] = b"KVDBBAK\x02";
/// The first format: the same, without the lineage in the header.
const MAGIC_V1: &[u8; 8] = b"KVDBBAK\x01";

/// Which server's numbering a backup's versions are in: 16 random bytes a
/// data directory makes for itself when it is first opened. A directory
/// restored from a backup makes its own (it numbers its own writes from
/// there on), so an increment taken from it can't be mistaken for one of
/// the server it was restored from.
pub type Lineage = [u8; 16];

/// Largest key or value length accepted from a stream; far above any limit
/// the server enforces, so only corruption trips it.
const MAX_FIELD: u32 = 1 << 30;

/// The highest version a backup may name: a store would take centuries of
/// writes to count this far, and a restore takes its numbering on from the
/// backup's version, which must leave it room (found by a review: a version
/// near `u64::MAX` in a damaged or made-up header wrapped the numbering).
pub const MAX_VERSION: u64 = u64::MAX / 2;

/// The highest version a restore takes: half of [`MAX_VERSION`], so that the
/// store restored goes on numbering its writes for centuries before its own
/// backups could pass [`MAX_VERSION`].
pub const MAX_RESTORED_VERSION: u64 = MAX_VERSION / 2;

/// What a backup covers: changes after `since`, up to and including `version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupInfo {
    pub since: u64,
    pub version: u64,
    /// The server the backup was taken from (`None` in the first format).
    pub lineage: Option<Lineage>,
    /// The lineage of what the backup continues: the backups whose chain
    /// ends at `since`. The server's own, except for an increment of a
    /// restored server from the version its restore ended at, which
    /// continues the chain it was restored from. (`None` in the first
    /// format.)
    pub base: Option<Lineage>,
}

/// One change in a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Delete {
        key: Vec<u8>,
        version: u64,
        deleted_at: u64,
    },
    DeletePrefix {
        prefix: Vec<u8>,
        version: u64,
        deleted_at: u64,
    },
    Put {
        key: Vec<u8>,
        entry: Entry,
    },
}

impl Record {
    /// About how many bytes it holds (its key or prefix and its value).
    pub fn size(&self) -> usize {
        match self {
            Record::Delete { key, .. } => key.len(),
            Record::DeletePrefix { prefix, .. } => prefix.len(),
            Record::Put { key, entry } => key.len() + entry.value.len(),
        }
    }
}

fn io(e: std::io::Error) -> StorageError {
    StorageError::Backup(format!("writing the stream: {e}"))
}

struct Crc<W> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Crc<W> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        self.crc.update(bytes);
        self.inner.write_all(bytes).map_err(io)
    }
}

/// Writes a backup stream.
pub struct Writer<'a> {
    out: Crc<BufWriter<&'a mut dyn Write>>,
    count: u64,
}

fn len32(b: &[u8]) -> [u8; 4] {
    // Keys and values are bounded far below 4 GiB by the server's limits.
    u32::try_from(b.len()).unwrap_or(u32::MAX).to_be_bytes()
}

impl<'a> Writer<'a> {
    /// # Errors
    /// The output fails.
    pub fn new(out: &'a mut dyn Write, info: BackupInfo) -> Result<Self, StorageError> {
        let mut out = Crc {
            inner: BufWriter::with_capacity(64 * 1024, out),
            crc: crc32fast::Hasher::new(),
        };
        out.put(MAGIC)?;
        out.put(&info.since.to_be_bytes())?;
        out.put(&info.version.to_be_bytes())?;
        out.put(&info.lineage.unwrap_or_default())?;
        out.put(&info.base.unwrap_or_default())?;
        Ok(Self { out, count: 0 })
    }

    /// # Errors
    /// The output fails.
    pub fn record(&mut self, record: &Record) -> Result<(), StorageError> {
        let o = &mut self.out;
        match record {
            Record::Delete {
                key,
                version,
                deleted_at,
            }
            | Record::DeletePrefix {
                prefix: key,
                version,
                deleted_at,
            } => {
                o.put(if matches!(record, Record::Delete { .. }) {
                    b"D"
                } else {
                    b"R"
                })?;
                o.put(&version.to_be_bytes())?;
                o.put(&deleted_at.to_be_bytes())?;
                o.put(&len32(key))?;
                o.put(key)?;
            }
            Record::Put { key, entry } => {
                o.put(b"P")?;
                o.put(&len32(key))?;
                o.put(key)?;
                o.put(&[entry.kind])?;
                o.put(&entry.expires_at.to_be_bytes())?;
                o.put(&entry.version.to_be_bytes())?;
                o.put(&len32(&entry.value))?;
                o.put(&entry.value)?;
            }
        }
        self.count += 1;
        Ok(())
    }

    /// Writes the footer and flushes; returns the number of records.
    ///
    /// # Errors
    /// The output fails.
    pub fn finish(mut self) -> Result<u64, StorageError> {
        let crc = self.out.crc.clone().finalize();
        self.out.inner.write_all(b"E").map_err(io)?;
        self.out
            .inner
            .write_all(&self.count.to_be_bytes())
            .map_err(io)?;
        self.out.inner.write_all(&crc.to_be_bytes()).map_err(io)?;
        self.out.inner.flush().map_err(io)?;
        Ok(self.count)
    }
}

/// Reads a backup stream record by record, checking its footer at the end.
pub struct Reader<'a> {
    input: &'a mut dyn Read,
    crc: crc32fast::Hasher,
    info: BackupInfo,
    count: u64,
    done: bool,
}

/// The longest `version N` line taken after a footer (see
/// `Reader::end_of_input`).
const MAX_TRAILER: usize = 32;

fn corrupt(what: &str) -> StorageError {
    StorageError::Restore(format!("the backup stream is corrupt or truncated: {what}"))
}

impl<'a> Reader<'a> {
    /// # Errors
    /// The stream is not a KVdb backup.
    pub fn new(input: &'a mut dyn Read) -> Result<Self, StorageError> {
        let mut r = Self {
            input,
            crc: crc32fast::Hasher::new(),
            info: BackupInfo {
                since: 0,
                version: 0,
                lineage: None,
                base: None,
            },
            count: 0,
            done: false,
        };
        let magic = r.bytes(8)?;
        if magic != MAGIC && magic != MAGIC_V1 {
            return Err(StorageError::Restore(
                "this is not a KVdb backup (bad magic)".into(),
            ));
        }
        let since = r.u64()?;
        let version = r.u64()?;
        if version > MAX_VERSION || since > version {
            return Err(corrupt(&format!(
                "the header says it holds the changes after version {since} up to version {version}"
            )));
        }
        let (lineage, base) = if magic == MAGIC {
            let mut lineage = || -> Result<Lineage, StorageError> {
                Lineage::try_from(r.bytes(16)?.as_slice()).map_err(|_| corrupt("lineage"))
            };
            (Some(lineage()?), Some(lineage()?))
        } else {
            (None, None)
        };
        r.info = BackupInfo {
            since,
            version,
            lineage,
            base,
        };
        Ok(r)
    }

    pub fn info(&self) -> BackupInfo {
        self.info
    }

    /// Refuses anything after the footer: two backups in one file (`cat
    /// full inc > f`) would otherwise restore the first and drop the rest
    /// without a word (found by a review). One `version N` line is taken:
    /// `kvdb backup -o /dev/stdout` into a pipe used to print it after the
    /// backup.
    fn end_of_input(&mut self) -> Result<(), StorageError> {
        let mut rest = Vec::new();
        (&mut *self.input)
            .take(MAX_TRAILER as u64 + 1)
            .read_to_end(&mut rest)
            .map_err(|e| corrupt(&e.to_string()))?;
        let version_line = rest.len() <= MAX_TRAILER
            && rest
                .strip_prefix(b"version ")
                .and_then(|r| r.strip_suffix(b"\n"))
                .is_some_and(|n| !n.is_empty() && n.iter().all(u8::is_ascii_digit));
        if rest.is_empty() || version_line {
            return Ok(());
        }
        Err(StorageError::Restore(
            "there is more after the end of the backup: a file holds one backup (give each backup of a chain as a file of its own, in the order they were taken)".into(),
        ))
    }

    fn raw(&mut self, buf: &mut [u8]) -> Result<(), StorageError> {
        self.input
            .read_exact(buf)
            .map_err(|e| corrupt(&e.to_string()))
    }

    fn bytes(&mut self, n: usize) -> Result<Vec<u8>, StorageError> {
        let mut buf = vec![0; n];
        self.raw(&mut buf)?;
        self.crc.update(&buf);
        Ok(buf)
    }

    fn u64(&mut self) -> Result<u64, StorageError> {
        let mut b = [0; 8];
        self.raw(&mut b)?;
        self.crc.update(&b);
        Ok(u64::from_be_bytes(b))
    }

    /// A record's version, which is no later than the backup's own.
    fn record_version(&mut self) -> Result<u64, StorageError> {
        let version = self.u64()?;
        if version > self.info.version {
            return Err(corrupt(&format!(
                "a record of version {version} in a backup up to version {}",
                self.info.version
            )));
        }
        Ok(version)
    }

    fn field(&mut self) -> Result<Vec<u8>, StorageError> {
        let mut b = [0; 4];
        self.raw(&mut b)?;
        self.crc.update(&b);
        let n = u32::from_be_bytes(b);
        if n > MAX_FIELD {
            return Err(corrupt("field length out of range"));
        }
        self.bytes(n as usize)
    }

    /// The next record, or `None` after a valid footer.
    ///
    /// # Errors
    /// The stream is corrupt or truncated.
    pub fn next_record(&mut self) -> Result<Option<Record>, StorageError> {
        if self.done {
            return Ok(None);
        }
        let mut tag = [0u8; 1];
        self.raw(&mut tag)?;
        let record = match tag[0] {
            b'E' => {
                let expected = self.crc.clone().finalize();
                let mut b = [0; 8];
                self.raw(&mut b)?;
                let count = u64::from_be_bytes(b);
                let mut c = [0; 4];
                self.raw(&mut c)?;
                if u32::from_be_bytes(c) != expected || count != self.count {
                    return Err(corrupt("checksum mismatch"));
                }
                self.end_of_input()?;
                self.done = true;
                return Ok(None);
            }
            t @ (b'D' | b'R') => {
                self.crc.update(&tag);
                let version = self.record_version()?;
                let deleted_at = self.u64()?;
                let key = self.field()?;
                if t == b'D' {
                    Record::Delete {
                        key,
                        version,
                        deleted_at,
                    }
                } else {
                    Record::DeletePrefix {
                        prefix: key,
                        version,
                        deleted_at,
                    }
                }
            }
            b'P' => {
                self.crc.update(&tag);
                let key = self.field()?;
                let kind = self.bytes(1)?[0];
                let expires_at = self.u64()?;
                let version = self.record_version()?;
                let value = self.field()?;
                Record::Put {
                    key,
                    entry: Entry {
                        kind,
                        expires_at,
                        version,
                        value,
                    },
                }
            }
            _ => return Err(corrupt("unknown record tag")),
        };
        self.count += 1;
        Ok(Some(record))
    }
}

/// What to do when a backup that continues from version `since` is to follow
/// data (the backup before it, or a data directory) that ends at `holds`.
pub fn chain_hint(since: u64, holds: u64) -> String {
    if since > holds {
        format!(
            "it continues from version {since}, but what comes before it ends at version {holds}: \
             a backup is missing between them (restore the full backup, then each increment \
             in the order they were taken)"
        )
    } else {
        format!(
            "it continues from version {since}, but what comes before it already ends at version \
             {holds}: it is the wrong file or out of order; an increment to follow version \
             {holds} is taken with `kvdb backup --since {holds}`"
        )
    }
}

/// Why an increment from another server does not continue a chain, and
/// what to do instead.
pub fn other_server_hint() -> &'static str {
    "a data directory restored from a backup is a server of its own, which numbers its own \
     writes, so its increments continue only its own full backups (restore a full backup of \
     the server the increment came from into a new directory, then that server's increments)"
}

/// Reads a whole stream and checks its footer, without applying anything.
///
/// # Errors
/// The stream is not a backup, or is corrupt or truncated.
pub fn verify(input: &mut dyn Read) -> Result<BackupInfo, StorageError> {
    let mut reader = Reader::new(input)?;
    while reader.next_record()?.is_some() {}
    Ok(reader.info())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = Writer::new(
            &mut out,
            BackupInfo {
                since: 3,
                version: 9,
                lineage: Some([5; 16]),
                base: Some([6; 16]),
            },
        )
        .expect("header");
        w.record(&Record::Delete {
            key: b"gone".to_vec(),
            version: 4,
            deleted_at: 7,
        })
        .expect("record");
        w.record(&Record::Put {
            key: b"k".to_vec(),
            entry: Entry {
                kind: 1,
                expires_at: 0,
                version: 9,
                value: b"42".to_vec(),
            },
        })
        .expect("record");
        assert_eq!(w.finish().expect("footer"), 2);
        out
    }

    #[test]
    fn round_trip_keeps_every_record() {
        let bytes = sample();
        let mut input = bytes.as_slice();
        let mut r = Reader::new(&mut input).expect("header");
        assert_eq!(
            r.info(),
            BackupInfo {
                since: 3,
                version: 9,
                lineage: Some([5; 16]),
                base: Some([6; 16]),
            }
        );
        assert!(matches!(
            r.next_record().expect("first"),
            Some(Record::Delete { version: 4, .. })
        ));
        assert!(matches!(
            r.next_record().expect("second"),
            Some(Record::Put { .. })
        ));
        assert_eq!(r.next_record().expect("footer"), None);
    }

    fn header_only(since: u64, version: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let info = BackupInfo {
            since,
            version,
            lineage: Some([5; 16]),
            base: Some([6; 16]),
        };
        Writer::new(&mut out, info)
            .expect("header")
            .finish()
            .expect("footer");
        out
    }

    /// A restore numbers its writes on from the backup's version, and takes
    /// its records' versions as they are: a header past [`MAX_VERSION`] or
    /// before its own `since`, or a record newer than its header, is
    /// corruption.
    #[test]
    fn versions_outside_the_headers_range_are_refused() {
        for (since, version) in [(0, MAX_VERSION + 1), (0, u64::MAX), (10, 9)] {
            let bytes = header_only(since, version);
            let refused = Reader::new(&mut bytes.as_slice()).err();
            assert!(
                refused.is_some_and(|e| e.to_string().contains("corrupt")),
                "{since}..{version}"
            );
        }
        let bytes = header_only(MAX_VERSION, MAX_VERSION);
        verify(&mut bytes.as_slice()).expect("the highest version is a backup's");
        for record in [
            Record::Put {
                key: b"k".to_vec(),
                entry: Entry {
                    kind: 1,
                    expires_at: 0,
                    version: 10,
                    value: b"v".to_vec(),
                },
            },
            Record::Delete {
                key: b"k".to_vec(),
                version: 10,
                deleted_at: 0,
            },
        ] {
            let mut out = Vec::new();
            let info = BackupInfo {
                since: 0,
                version: 9,
                lineage: None,
                base: None,
            };
            let mut w = Writer::new(&mut out, info).expect("header");
            w.record(&record).expect("record");
            w.finish().expect("footer");
            let refused = verify(&mut out.as_slice()).err();
            assert!(
                refused.is_some_and(|e| e.to_string().contains("a record of version 10")),
                "{record:?}"
            );
        }
    }

    #[test]
    fn truncated_or_flipped_streams_are_refused() {
        let bytes = sample();
        let mut short = &bytes[..bytes.len() - 3];
        let mut r = Reader::new(&mut short).expect("header");
        let mut saw_error = false;
        for _ in 0..4 {
            match r.next_record() {
                Err(_) => {
                    saw_error = true;
                    break;
                }
                Ok(None) => break,
                Ok(Some(_)) => {}
            }
        }
        assert!(saw_error, "a truncated stream must fail");

        let mut flipped = bytes.clone();
        let at = flipped.len() - 20;
        flipped[at] ^= 0x55;
        let mut input = flipped.as_slice();
        let mut r = Reader::new(&mut input).expect("header");
        let mut result = Ok(Some(Record::Delete {
            key: vec![],
            version: 0,
            deleted_at: 0,
        }));
        while let Ok(Some(_)) = result {
            result = r.next_record();
        }
        assert!(result.is_err(), "a corrupted stream must fail");
    }

    /// Two backups in one file (or anything after the footer) are refused,
    /// not restored as the first alone.
    #[test]
    fn anything_after_the_footer_is_refused() {
        let mut twice = sample();
        twice.extend(sample());
        let err = verify(&mut twice.as_slice()).expect_err("two backups");
        assert!(err.to_string().contains("a file holds one backup"), "{err}");
        let mut trailing = sample();
        trailing.extend(b"more");
        assert!(verify(&mut trailing.as_slice()).is_err());
        assert!(verify(&mut sample().as_slice()).is_ok());
        // What `kvdb backup -o /dev/stdout | ...` used to leave after it.
        let mut versioned = sample();
        versioned.extend(b"version 9\n");
        assert!(verify(&mut versioned.as_slice()).is_ok());
        versioned.extend(b"version 9\n");
        assert!(verify(&mut versioned.as_slice()).is_err());
    }

    /// Streams of the first format (no lineage in the header) are still
    /// read: backups taken before the lineage are restorable.
    #[test]
    fn a_first_format_stream_is_read_without_a_lineage() {
        let mut v1 = MAGIC_V1.to_vec();
        v1.extend_from_slice(&0u64.to_be_bytes());
        v1.extend_from_slice(&7u64.to_be_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&v1);
        v1.push(b'E');
        v1.extend_from_slice(&0u64.to_be_bytes());
        v1.extend_from_slice(&crc.finalize().to_be_bytes());
        let info = verify(&mut v1.as_slice()).expect("a first-format stream");
        assert_eq!(
            info,
            BackupInfo {
                since: 0,
                version: 7,
                lineage: None,
                base: None
            }
        );
    }

    #[test]
    fn other_files_are_not_backups() {
        let mut input: &[u8] = b"hello world, this is not a backup";
        assert!(Reader::new(&mut input).is_err());
    }
}
