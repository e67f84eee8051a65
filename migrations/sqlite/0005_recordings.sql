-- Recordings made by the `record` verb: one row per finished WAV file, written with its timeline
-- entries and `call.recording.ready` in one transaction. The file lives at `<data dir>/<path>`
-- (relative, no `..`). Ids are UUIDv7 text, so id order is creation order; timestamps are
-- fixed-width RFC 3339 UTC text (see 0001).

CREATE TABLE recordings (
    id TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    call_id TEXT NOT NULL REFERENCES calls(id),
    number_id TEXT NOT NULL REFERENCES tenant_numbers(id),
    path TEXT NOT NULL,
    duration_ms INTEGER NOT NULL CHECK (duration_ms >= 0),
    size_bytes INTEGER NOT NULL CHECK (size_bytes >= 0),
    created_at TEXT NOT NULL
);
-- GET /v1/calls/{id}/recording(s): a call's recordings, newest first.
CREATE INDEX recordings_by_call ON recordings (call_id, id);
-- A workspace's recordings, newest first (listing and retention).
CREATE INDEX recordings_by_workspace ON recordings (workspace_id, id);
