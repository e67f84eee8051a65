//! Health, metrics and the OpenAPI document.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorEnvelope};

#[derive(Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: String,
    pub version: String,
}

/// Liveness and database reachability.
#[utoipa::path(get, path = "/healthz", tag = "ops", security(()),
    responses((status = 200, body = Health), (status = 503, body = Health)))]
pub async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let db = state.store.db();
    let ok = !db.health.is_down() && sqlx::query("SELECT 1").execute(&db.read).await.is_ok();
    let body = axum::Json(Health {
        status: if ok { "ok" } else { "database_unreachable" }.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "ops", security(()),
    responses((status = 200, content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    memory_gauges();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// Where the process's memory goes, read when scraped: its resident set, and the part SQLite's
/// own allocator holds (page caches, prepared statements), which lives outside Rust's heap.
fn memory_gauges() {
    if let Some(status) = crate::loadtest::procfs::Status::read(std::process::id()) {
        if let Some(kib) = status.kib("VmRSS") {
            metrics::gauge!("sautikit_process_resident_memory_bytes").set(kib as f64 * 1024.0);
        }
        if let Some(kib) = status.kib("RssAnon") {
            metrics::gauge!("sautikit_process_anonymous_memory_bytes").set(kib as f64 * 1024.0);
        }
    }
    // SAFETY: sqlite3_memory_used reads SQLite's allocation counter; it takes no arguments and
    // is safe to call from any thread at any time, before or after SQLite is initialised.
    let sqlite = unsafe { libsqlite3_sys::sqlite3_memory_used() };
    metrics::gauge!("sautikit_sqlite_memory_bytes").set(sqlite as f64);
    allocator_gauges();
}

/// The two heaps behind the anonymous memory: Rust's (mimalloc, the binary's global allocator:
/// what it has committed) and C's (glibc's malloc, which SQLite and the other C libraries use:
/// what it holds from the system, and how much of that is in use). A heap that holds more and
/// more while its use stays flat is fragmentation, not a leak.
fn allocator_gauges() {
    let mut committed = 0usize;
    // SAFETY: mi_process_info only writes the counters it is given; null pointers are allowed
    // for the ones not wanted, and the one given points at a live local.
    unsafe {
        libmimalloc_sys::mi_process_info(
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut committed,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
    }
    metrics::gauge!("sautikit_rust_heap_committed_bytes").set(committed as f64);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no arguments and returns its counters by value.
        let info = unsafe { nix::libc::mallinfo2() };
        metrics::gauge!("sautikit_c_heap_held_bytes").set((info.arena + info.hblkhd) as f64);
        metrics::gauge!("sautikit_c_heap_used_bytes").set((info.uordblks + info.hblkhd) as f64);
    }
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "ops", security(()),
    responses((status = 200, content_type = "application/json", body = Object),
        (status = 500, body = ErrorEnvelope, description = "`internal.error`")))]
pub async fn openapi(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let doc = state
        .openapi
        .get()
        .ok_or_else(|| ApiError::internal("OpenAPI document not built"))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], doc.clone()))
}
