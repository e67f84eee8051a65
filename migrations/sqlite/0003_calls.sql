-- Calls: one row per call with its rating snapshot, its timeline (SIP messages, callbacks,
-- actions), and the engine processes that hold live calls (for closing calls orphaned by a
-- process that died). Ids are UUIDv7 text; timestamps fixed-width RFC 3339 UTC text (see 0001).

CREATE TABLE calls (
    id TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    number_id TEXT NOT NULL REFERENCES tenant_numbers(id),
    direction TEXT NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    from_number TEXT NOT NULL,
    to_number TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN
        ('ringing', 'answered', 'completed', 'failed', 'busy', 'no_answer', 'canceled')),
    sip_call_id TEXT NOT NULL,
    engine_id TEXT NOT NULL,
    started_at TEXT NOT NULL,
    answered_at TEXT,
    ended_at TEXT,
    -- Whole seconds from answer to end, rounded up; 0 until ended and for unanswered calls.
    duration_seconds INTEGER NOT NULL DEFAULT 0 CHECK (duration_seconds >= 0),
    hangup_cause TEXT,
    failure_reason TEXT,
    -- What was actually debited (a wallet is never taken below zero, so this can be less than the
    -- rated cost); `uncollected_minor` is the difference.
    cost_minor INTEGER NOT NULL DEFAULT 0 CHECK (cost_minor >= 0),
    uncollected_minor INTEGER NOT NULL DEFAULT 0 CHECK (uncollected_minor >= 0),
    currency TEXT NOT NULL,
    -- The number's per-minute rate for this direction when the call started: a later price change
    -- never re-rates a call in progress.
    rate_per_min_minor INTEGER NOT NULL CHECK (rate_per_min_minor >= 0),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
-- GET /v1/calls: newest first per workspace, optionally by number or by status.
CREATE INDEX calls_by_workspace ON calls (workspace_id, id);
CREATE INDEX calls_by_number ON calls (number_id, id);
CREATE INDEX calls_by_status ON calls (workspace_id, status, id);
-- Orphan closing looks only at live calls: a small index whatever the call history.
CREATE INDEX calls_live ON calls (engine_id) WHERE status IN ('ringing', 'answered');

-- `detail` is kind-specific JSON text. UUIDv7 ids keep insertion order within a call.
CREATE TABLE call_timeline (
    id TEXT PRIMARY KEY,
    call_id TEXT NOT NULL REFERENCES calls(id),
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX call_timeline_by_call ON call_timeline (call_id, id);

-- One row per engine process that has held calls; heartbeat_at is refreshed every few seconds.
CREATE TABLE engines (
    id TEXT PRIMARY KEY,
    heartbeat_at TEXT NOT NULL
);
