//! `/_admin/…`: operator routes, guarded by the server's `--admin-token`
//! (never by a bucket key). `_admin` can't be a bucket id, so these never
//! shadow a bucket.

use std::io::Write;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::{ApiError, AppState, query_pairs, query_param};

/// Response header naming the version a backup reaches: pass it as `since`
/// to the next incremental backup.
pub const VERSION_HEADER: &str = "x-kvdb-backup-version";
/// Response header naming the version a backup starts after.
pub const SINCE_HEADER: &str = "x-kvdb-backup-since";

fn check_operator(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    Ok(crate::auth::operator(
        state.admin_token.as_deref(),
        authorization,
    )?)
}

/// Forwards what the backup writes to the response body, a chunk at a time.
struct ChannelWriter(tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A response body of what `produce` writes, run on a blocking thread. It
/// ends cleanly only if `produce` returns `Ok`: an error, or a panic, ends
/// it with an error, which aborts the response (a chunked body without its
/// last chunk), so that the client sees a broken transfer and never a short
/// backup that ended like a whole one (found by a review: a panic dropped
/// the channel, and the body ended as if complete).
fn streamed<F>(produce: F) -> Body
where
    F: FnOnce(&mut dyn Write) -> Result<u64, crate::storage::StorageError> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::task::spawn_blocking(move || {
        let mut writer = ChannelWriter(tx.clone());
        let failure =
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| produce(&mut writer))) {
                Ok(Ok(_)) => return,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "the backup task panicked".to_owned(),
            };
        tracing::error!(error = %failure, "backup stream failed");
        let _ = tx.blocking_send(Err(std::io::Error::other(failure)));
    });
    Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// `GET /_admin/backup?since=N`: a consistent backup stream of everything
/// written after version `N` (0 or absent: everything).
pub async fn get_backup(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_operator(&state, &headers)?;
    let pairs = query_pairs(&uri)?;
    let since = query_param(&pairs, "since")?.map_or(Ok(0), |s| {
        crate::bucket::whole_number(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "since must be a version number (digits only), not {s:?}"
            ))
        })
    })?;
    // Taking the snapshot waits for a commit under way (an fsync): off the
    // async workers.
    let store = state.buckets.store().clone();
    let backup = tokio::task::spawn_blocking(move || store.backup(since))
        .await
        .map_err(|e| ApiError::Internal(format!("the backup task failed: {e}")))??;
    let info = backup.info();
    let body = streamed(move |out| backup.write_to(out));
    let mut response = (StatusCode::OK, body).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/vnd.kvdb.backup"),
    );
    h.insert(VERSION_HEADER, HeaderValue::from(info.version));
    h.insert(SINCE_HEADER, HeaderValue::from(info.since));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::streamed;
    use crate::storage::StorageError;

    /// What a client receives of the body: its bytes, or the error that
    /// ended it.
    async fn received(body: axum::body::Body) -> Result<Vec<u8>, String> {
        body.collect()
            .await
            .map(|c| c.to_bytes().to_vec())
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn a_backup_that_fails_or_panics_midway_ends_its_body_with_an_error() {
        let whole = streamed(|out| {
            out.write_all(b"all of it")?;
            Ok(1)
        });
        assert_eq!(received(whole).await.as_deref(), Ok(&b"all of it"[..]));
        let failed = streamed(|out| {
            out.write_all(b"half")?;
            Err(StorageError::Engine("the disk".into()))
        });
        assert!(received(failed).await.is_err(), "a failed backup");
        let panicked = streamed(|out| {
            out.write_all(b"half")?;
            panic!("a bug in the backup");
        });
        assert!(received(panicked).await.is_err(), "a panicked backup");
    }
}
