-- PostgreSQL: text columns use the "C" collation (see 0001).
-- Calls: one row per call with its rating snapshot, its timeline (SIP messages, callbacks,
-- actions), and the engine processes that hold live calls (for closing calls orphaned by a
-- process that died). Ids are UUIDv7 text; timestamps fixed-width RFC 3339 UTC text (see 0001).

CREATE TABLE calls (
    id TEXT COLLATE "C" PRIMARY KEY,
    workspace_id TEXT COLLATE "C" NOT NULL REFERENCES workspaces(id),
    number_id TEXT COLLATE "C" NOT NULL REFERENCES tenant_numbers(id),
    direction TEXT COLLATE "C" NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    from_number TEXT COLLATE "C" NOT NULL,
    to_number TEXT COLLATE "C" NOT NULL,
    status TEXT COLLATE "C" NOT NULL CHECK (status IN
        ('ringing', 'answered', 'completed', 'failed', 'busy', 'no_answer', 'canceled')),
    sip_call_id TEXT COLLATE "C" NOT NULL,
    engine_id TEXT COLLATE "C" NOT NULL,
    started_at TEXT COLLATE "C" NOT NULL,
    answered_at TEXT COLLATE "C",
    ended_at TEXT COLLATE "C",
    -- Whole seconds from answer to end, rounded up; 0 until ended and for unanswered calls.
    duration_seconds BIGINT NOT NULL DEFAULT 0 CHECK (duration_seconds >= 0),
    hangup_cause TEXT COLLATE "C",
    failure_reason TEXT COLLATE "C",
    -- What was actually debited (a wallet is never taken below zero, so this can be less than the
    -- rated cost); `uncollected_minor` is the difference.
    cost_minor BIGINT NOT NULL DEFAULT 0 CHECK (cost_minor >= 0),
    uncollected_minor BIGINT NOT NULL DEFAULT 0 CHECK (uncollected_minor >= 0),
    currency TEXT COLLATE "C" NOT NULL,
    -- The number's per-minute rate for this direction when the call started: a later price change
    -- never re-rates a call in progress.
    rate_per_min_minor BIGINT NOT NULL CHECK (rate_per_min_minor >= 0),
    created_at TEXT COLLATE "C" NOT NULL,
    updated_at TEXT COLLATE "C" NOT NULL
);
-- GET /v1/calls: newest first per workspace, optionally by number or by status.
CREATE INDEX calls_by_workspace ON calls (workspace_id, id);
CREATE INDEX calls_by_number ON calls (number_id, id);
CREATE INDEX calls_by_status ON calls (workspace_id, status, id);
-- Orphan closing looks only at live calls: a small index whatever the call history.
CREATE INDEX calls_live ON calls (engine_id) WHERE status IN ('ringing', 'answered');

-- `detail` is kind-specific JSON text. UUIDv7 ids keep insertion order within a call.
CREATE TABLE call_timeline (
    id TEXT COLLATE "C" PRIMARY KEY,
    call_id TEXT COLLATE "C" NOT NULL REFERENCES calls(id),
    at TEXT COLLATE "C" NOT NULL,
    kind TEXT COLLATE "C" NOT NULL,
    detail TEXT COLLATE "C" NOT NULL
);
CREATE INDEX call_timeline_by_call ON call_timeline (call_id, id);

-- One row per engine process that has held calls; heartbeat_at is refreshed every few seconds.
CREATE TABLE engines (
    id TEXT COLLATE "C" PRIMARY KEY,
    heartbeat_at TEXT COLLATE "C" NOT NULL
);
