//! A backup stream as `kvdb backup` receives it: copied to its output as it
//! comes, and checked on the way by the same [`Reader`] a restore uses
//! (header, every record, the footer's count and checksum), so that the
//! command can tell a whole backup from a cut-off one before it calls it
//! complete. An HTTP body that ends cleanly proves nothing: one delimited by
//! the connection's close (a proxy), or a server whose backup task died,
//! ends early without a transport error.

use std::io::{Read, Write};

use super::StorageError;
use super::backup::{BackupInfo, Reader};

/// A backup copied whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub info: BackupInfo,
    /// Bytes copied to the output.
    pub bytes: u64,
}

/// Why a backup stream was not copied whole.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// Reading the stream failed (the connection broke).
    #[error("the transfer broke off: {0}")]
    Transfer(#[source] std::io::Error),
    /// Writing the output failed (a full disk, a closed pipe).
    #[error("writing the backup failed: {0}")]
    Output(#[source] std::io::Error),
    /// The stream ended, or went wrong, before its footer: cut off, or not
    /// a backup at all.
    #[error("the stream is not a whole backup ({0})")]
    Incomplete(#[source] StorageError),
}

/// Copies the backup stream `input` to `output`, checking it as it goes,
/// and flushes `output`. The output holds every byte read even when this
/// fails: the caller decides what becomes of it.
///
/// # Errors
/// See [`ReceiveError`].
pub fn copy(input: &mut dyn Read, output: &mut dyn Write) -> Result<Received, ReceiveError> {
    let mut tee = Tee {
        input,
        output,
        bytes: 0,
        failure: None,
    };
    // Buffered above the tee: the reader asks for a few bytes at a time, the
    // tee passes on (and writes) whole buffers.
    let checked = {
        let mut buffered = std::io::BufReader::with_capacity(256 * 1024, &mut tee);
        read_whole(&mut buffered)
    };
    // A failure of either side is what went wrong, whatever the reader made
    // of the short read it caused.
    match tee.failure.take() {
        Some(Failure::Input(e)) => return Err(ReceiveError::Transfer(e)),
        Some(Failure::Output(e)) => return Err(ReceiveError::Output(e)),
        None => {}
    }
    let info = checked.map_err(ReceiveError::Incomplete)?;
    tee.output.flush().map_err(ReceiveError::Output)?;
    Ok(Received {
        info,
        bytes: tee.bytes,
    })
}

/// Reads a stream to its end through its footer. [`super::backup::verify`]
/// does the same; it is spelt out here so that the reading is over the
/// buffered tee, which owns the bytes.
fn read_whole(input: &mut dyn Read) -> Result<BackupInfo, StorageError> {
    let mut reader = Reader::new(input)?;
    while reader.next_record()?.is_some() {}
    Ok(reader.info())
}

enum Failure {
    Input(std::io::Error),
    Output(std::io::Error),
}

/// Writes to `output` everything read from `input`, and keeps the first
/// failure of either (the reader sees only "truncated").
struct Tee<'a> {
    input: &'a mut dyn Read,
    output: &'a mut dyn Write,
    bytes: u64,
    failure: Option<Failure>,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.failure.is_some() {
            return Err(std::io::Error::other("the copy failed already"));
        }
        let n = loop {
            match self.input.read(buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let said = std::io::Error::new(e.kind(), e.to_string());
                    self.failure = Some(Failure::Input(e));
                    return Err(said);
                }
            }
        };
        if let Err(e) = self.output.write_all(&buf[..n]) {
            let said = std::io::Error::new(e.kind(), e.to_string());
            self.failure = Some(Failure::Output(e));
            return Err(said);
        }
        self.bytes += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::backup::{Record, Writer};
    use crate::storage::store::Entry;

    fn sample() -> Vec<u8> {
        let mut out = Vec::new();
        let info = BackupInfo {
            since: 0,
            version: 9,
            lineage: Some([1; 16]),
            base: Some([1; 16]),
        };
        let mut w = Writer::new(&mut out, info).expect("header");
        for i in 0..100u32 {
            w.record(&Record::Put {
                key: format!("k{i}").into_bytes(),
                entry: Entry {
                    kind: 1,
                    expires_at: 0,
                    version: 9,
                    value: vec![7; 100],
                },
            })
            .expect("record");
        }
        w.finish().expect("footer");
        out
    }

    #[test]
    fn a_whole_stream_is_copied_byte_for_byte() {
        let bytes = sample();
        let mut out = Vec::new();
        let got = copy(&mut bytes.as_slice(), &mut out).expect("whole");
        assert_eq!(out, bytes);
        assert_eq!(got.bytes, bytes.len() as u64);
        assert_eq!(got.info.version, 9);
    }

    /// A stream that simply ends early (as a body delimited by the
    /// connection's close does) is refused, wherever it is cut.
    #[test]
    fn a_stream_cut_anywhere_is_incomplete() {
        let bytes = sample();
        for cut in [0, 5, 60, bytes.len() / 2, bytes.len() - 1] {
            let mut out = Vec::new();
            let err = copy(&mut &bytes[..cut], &mut out).expect_err("cut off");
            assert!(matches!(err, ReceiveError::Incomplete(_)), "{cut}: {err}");
            assert_eq!(out, &bytes[..cut], "what came is written");
        }
        let mut more = bytes.clone();
        more.extend(b"junk after the footer, longer than a version line");
        let err = copy(&mut more.as_slice(), &mut Vec::new()).expect_err("trailing");
        assert!(matches!(err, ReceiveError::Incomplete(_)), "{err}");
    }

    struct Breaks<'a>(&'a [u8]);

    impl Read for Breaks<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "Peer disconnected",
                ));
            }
            self.0.read(buf)
        }
    }

    struct Full;

    impl Write for Full {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "no space left",
            ))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_broken_transfer_or_output_is_named_as_such() {
        let bytes = sample();
        let err = copy(&mut Breaks(&bytes[..100]), &mut Vec::new()).expect_err("broken");
        assert!(
            matches!(&err, ReceiveError::Transfer(e) if e.to_string().contains("Peer disconnected")),
            "{err}"
        );
        let err = copy(&mut bytes.as_slice(), &mut Full).expect_err("full");
        assert!(matches!(err, ReceiveError::Output(_)), "{err}");
    }
}
