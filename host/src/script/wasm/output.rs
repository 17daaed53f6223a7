//! A guest's stdout or stderr: kept up to a cap for the log (and for a
//! panic's message), the rest dropped. Never an error to the guest: Rust's
//! `println!` panics on a failed write, so a pipe that refused past its cap
//! ended a run that printed 64 KiB with a 500 (found by a review).
//!
//! It must not hold more than its cap, whatever the guest writes.

use std::sync::{Arc, Mutex, PoisonError};

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// What has been written, up to the cap, and whether more was dropped.
#[derive(Default)]
struct Kept {
    bytes: Vec<u8>,
    dropped: bool,
}

/// A stdout or stderr for one run; clones share it.
#[derive(Clone)]
pub(super) struct CappedOutput {
    cap: usize,
    kept: Arc<Mutex<Kept>>,
}

impl CappedOutput {
    pub(super) fn new(cap: usize) -> Self {
        Self {
            cap,
            kept: Arc::default(),
        }
    }

    /// What was kept, and whether anything past it was dropped.
    pub(super) fn contents(&self) -> (Vec<u8>, bool) {
        let kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        (kept.bytes.clone(), kept.dropped)
    }

    fn keep(&self, bytes: &[u8]) {
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        let room = self.cap.saturating_sub(kept.bytes.len());
        kept.bytes
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
        if bytes.len() > room {
            kept.dropped = true;
        }
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for CappedOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        self.keep(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always ready for a write of this much, kept or not.
        Ok(self.cap.max(4096))
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CappedOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for CappedOutput {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.keep(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl IsTerminal for CappedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}
