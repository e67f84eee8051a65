//! Call recordings (DESIGN §5–§6): the `recordings` rows, the `call.recording.ready` payload and
//! download URL, and reading the WAV files back for `GET /v1/calls/{id}/recording`.
//!
//! A recording's file is written by the engine under the data directory; its row keeps the path
//! relative to that directory, so a data directory can be moved without rewriting rows. Paths are
//! checked to be relative and free of `..` both when stored and when served.
//!
//! `duration_seconds` (event and API) is `duration_ms` rounded to the nearest second, halves up,
//! but at least 1 for any recording that holds sound: a 400 ms recording is not "0 seconds long".

use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

use axum::body::Bytes;
use chrono::{DateTime, Utc};
use futures::Stream;
use sautikit_actors::call_store::RecordingReady;
use sautikit_actors::store::StorageError;
use serde_json::{Value, json};
use sqlx::AnyConnection;
use sqlx::any::AnyRow;
use thiserror::Error;
use tokio::io::AsyncReadExt;

use crate::calls_store::CallRecord;
use crate::store::{SqlStore, get, get_time, storage};
use crate::time::to_db;

/// Where recordings are served from, set once by `serve` when the HTTP address is known.
#[derive(Debug, Clone)]
pub struct RecordingsConfig {
    /// Base of download URLs, without a trailing `/` (`SAUTIKIT_PUBLIC_URL`, default
    /// `http://<bound HTTP address>`).
    pub public_url: String,
    /// The data directory recording paths are relative to.
    pub data_dir: PathBuf,
}

/// A recording as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordingRecord {
    pub id: String,
    pub workspace_id: String,
    pub call_id: String,
    pub number_id: String,
    /// Relative to the data directory.
    pub path: String,
    pub duration_ms: i64,
    pub size_bytes: i64,
    pub created_at: DateTime<Utc>,
}

const RECORDING_COLS: &str =
    "id, workspace_id, call_id, number_id, path, duration_ms, size_bytes, created_at";

fn recording_from_row(row: &AnyRow) -> Result<RecordingRecord, StorageError> {
    Ok(RecordingRecord {
        id: get(row, "id")?,
        workspace_id: get(row, "workspace_id")?,
        call_id: get(row, "call_id")?,
        number_id: get(row, "number_id")?,
        path: get(row, "path")?,
        duration_ms: get(row, "duration_ms")?,
        size_bytes: get(row, "size_bytes")?,
        created_at: get_time(row, "created_at")?,
    })
}

/// Nearest second (halves up), but never 0 for a recording that has any length.
pub fn duration_seconds(duration_ms: i64) -> i64 {
    if duration_ms <= 0 {
        return 0;
    }
    (duration_ms.saturating_add(500) / 1000).max(1)
}

/// `<public url>/v1/calls/<call_id>/recording?recording_id=<id>`. Both ids are UUIDs, so they
/// need no escaping.
pub fn download_url(public_url: &str, call_id: &str, recording_id: &str) -> String {
    format!(
        "{}/v1/calls/{call_id}/recording?recording_id={recording_id}",
        public_url.trim_end_matches('/')
    )
}

#[derive(Debug, Error)]
pub enum RecordingFileError {
    /// The stored path is absolute or climbs out of the data directory: never served.
    #[error("unsafe recording path {0:?}")]
    UnsafePath(String),
    #[error("recording file {0} is missing")]
    Missing(PathBuf),
    #[error("cannot read recording file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The stored path as a relative path of plain components: no root, no `..`, no `.`, not empty.
pub fn safe_relative_path(path: &str) -> Result<PathBuf, RecordingFileError> {
    let p = Path::new(path);
    let plain = p.components().all(|c| matches!(c, Component::Normal(_)));
    if path.is_empty() || !plain {
        return Err(RecordingFileError::UnsafePath(path.to_owned()));
    }
    Ok(p.to_path_buf())
}

/// An opened recording and its length on disk (the `Content-Length`).
pub struct RecordingFile {
    pub file: tokio::fs::File,
    pub len: u64,
}

/// Open `<data_dir>/<path>` after checking `path`.
pub async fn open_recording(
    data_dir: &Path,
    path: &str,
) -> Result<RecordingFile, RecordingFileError> {
    let full = data_dir.join(safe_relative_path(path)?);
    let io = |source: std::io::Error, path: &Path| {
        if source.kind() == ErrorKind::NotFound {
            RecordingFileError::Missing(path.to_path_buf())
        } else {
            RecordingFileError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    };
    let file = tokio::fs::File::open(&full)
        .await
        .map_err(|e| io(e, &full))?;
    let meta = file.metadata().await.map_err(|e| io(e, &full))?;
    if !meta.is_file() {
        return Err(RecordingFileError::Missing(full));
    }
    Ok(RecordingFile {
        file,
        len: meta.len(),
    })
}

/// Read size per chunk when streaming a file (4 s of 8 kHz 16-bit audio).
const STREAM_CHUNK: usize = 64 * 1024;

/// The file as a stream of chunks, so a response never holds a whole recording in memory.
pub fn file_stream(file: tokio::fs::File) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
    futures::stream::try_unfold(file, |mut file| async move {
        let mut buf = vec![0u8; STREAM_CHUNK];
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some((Bytes::from(buf), file)))
    })
}

/// `call.recording.ready`: exactly `call_id, recording_id, duration_seconds, size_bytes,
/// download_url` (DESIGN §6).
pub(crate) fn ready_payload(
    r: &RecordingReady,
    duration_ms: i64,
    size_bytes: i64,
    download_url: &str,
) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("call_id".into(), json!(r.call_id));
    m.insert("recording_id".into(), json!(r.recording_id));
    m.insert(
        "duration_seconds".into(),
        json!(duration_seconds(duration_ms)),
    );
    m.insert("size_bytes".into(), json!(size_bytes));
    m.insert("download_url".into(), json!(download_url));
    m
}

/// A recording's numbers as the database stores them (BIGINT).
pub(crate) fn stored_sizes(r: &RecordingReady) -> Result<(i64, i64), StorageError> {
    let ms = i64::try_from(r.duration_ms)
        .map_err(|_| StorageError(format!("recording duration {} ms", r.duration_ms)))?;
    let size = i64::try_from(r.size_bytes)
        .map_err(|_| StorageError(format!("recording size {} bytes", r.size_bytes)))?;
    Ok((ms, size))
}

/// Insert the row in the caller's transaction, owned like its call. `Ok(false)`: this recording
/// was stored already (a retried write), nothing was written.
pub(crate) async fn insert_in_tx(
    conn: &mut AnyConnection,
    call: &CallRecord,
    r: &RecordingReady,
) -> Result<bool, StorageError> {
    safe_relative_path(&r.path).map_err(storage)?;
    let (ms, size) = stored_sizes(r)?;
    let inserted = sqlx::query(
        "INSERT INTO recordings (id, workspace_id, call_id, number_id, path, duration_ms, \
         size_bytes, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&r.recording_id)
    .bind(&call.workspace_id)
    .bind(&call.id)
    .bind(&call.number_id)
    .bind(&r.path)
    .bind(ms)
    .bind(size)
    .bind(to_db(r.created_at))
    .execute(&mut *conn)
    .await
    .map_err(storage)?
    .rows_affected();
    if inserted == 1 {
        return Ok(true);
    }
    // Only a repeat of the same recording is harmless; the same id on another call is a bug.
    let row = sqlx::query("SELECT call_id FROM recordings WHERE id = $1")
        .bind(&r.recording_id)
        .fetch_one(&mut *conn)
        .await
        .map_err(storage)?;
    let stored_call: String = get(&row, "call_id")?;
    if stored_call != call.id {
        return Err(StorageError(format!(
            "recording {} already belongs to call {stored_call}",
            r.recording_id
        )));
    }
    Ok(false)
}

impl SqlStore {
    /// Set where recordings are served from; the first call wins (one per process).
    pub fn set_recordings(&self, config: RecordingsConfig) {
        let config = RecordingsConfig {
            public_url: config.public_url.trim_end_matches('/').to_owned(),
            ..config
        };
        if self.recordings.set(config).is_err() {
            tracing::warn!("recordings were configured twice; keeping the first setting");
        }
    }

    pub fn recordings_config(&self) -> Option<&RecordingsConfig> {
        self.recordings.get()
    }

    /// The download URL of a recording. Before `serve` has set the public URL (only a store
    /// used as a bare library) it is a path relative to wherever the API is served.
    pub fn recording_download_url(&self, call_id: &str, recording_id: &str) -> String {
        let base = self
            .recordings_config()
            .map(|c| c.public_url.as_str())
            .unwrap_or("");
        download_url(base, call_id, recording_id)
    }

    /// A call's recordings, newest first, strictly older (by id) than `before_id`. The caller
    /// has checked that the call belongs to the workspace.
    pub async fn list_call_recordings(
        &self,
        call_id: &str,
        before_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<RecordingRecord>, StorageError> {
        let sql = format!(
            "SELECT {RECORDING_COLS} FROM recordings \
             WHERE call_id = $1 AND ($2 IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"
        );
        // Safe: a constant plus a constant; values are bound.
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(call_id)
            .bind(before_id)
            .bind(limit)
            .fetch_all(&self.db().read)
            .await
            .map_err(storage)?;
        rows.iter().map(recording_from_row).collect()
    }

    /// One recording of this call: the one named, or the most recent.
    pub async fn get_call_recording(
        &self,
        call_id: &str,
        recording_id: Option<&str>,
    ) -> Result<Option<RecordingRecord>, StorageError> {
        let sql = format!(
            "SELECT {RECORDING_COLS} FROM recordings \
             WHERE call_id = $1 AND ($2 IS NULL OR id = $2) ORDER BY id DESC LIMIT 1"
        );
        // Safe: a constant plus a constant; values are bound.
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(call_id)
            .bind(recording_id)
            .fetch_optional(&self.db().read)
            .await
            .map_err(storage)?;
        row.as_ref().map(recording_from_row).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding() {
        assert_eq!(duration_seconds(0), 0);
        assert_eq!(duration_seconds(1), 1);
        assert_eq!(duration_seconds(499), 1);
        assert_eq!(duration_seconds(1499), 1);
        assert_eq!(duration_seconds(1500), 2);
        assert_eq!(duration_seconds(62_400), 62);
        assert_eq!(duration_seconds(62_500), 63);
    }

    #[test]
    fn paths() {
        assert!(safe_relative_path("recordings/a/b.wav").is_ok());
        for bad in [
            "",
            "/etc/passwd",
            "../x.wav",
            "recordings/../../x.wav",
            "./x.wav",
        ] {
            assert!(safe_relative_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn url() {
        assert_eq!(
            download_url("https://api.example.com/", "c", "r"),
            "https://api.example.com/v1/calls/c/recording?recording_id=r"
        );
    }
}
