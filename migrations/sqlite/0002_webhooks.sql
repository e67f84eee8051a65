-- Webhooks: workspace subscriptions, the durable event outbox, deliveries (one per event and
-- target) and every delivery attempt.

CREATE TABLE webhook_subscriptions (
    id TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    url TEXT NOT NULL,
    events TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'deleted')),
    created_at TEXT NOT NULL,
    deleted_at TEXT
);
CREATE INDEX webhook_subscriptions_by_workspace ON webhook_subscriptions (workspace_id, status, id);

-- An event is written in the same transaction as the change that causes it. `body` is the exact
-- JSON envelope every delivery of it sends, fixed at creation.
CREATE TABLE events (
    id TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    event_kind TEXT NOT NULL,
    number_id TEXT,
    call_id TEXT,
    occurred_at TEXT NOT NULL,
    body TEXT NOT NULL,
    -- 0 until the Events actor has turned the event into deliveries (one per subscriber or
    -- events_url). Fan-out happens there, in batches, not in the transaction that made the change.
    expanded INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX events_by_workspace ON events (workspace_id, id);
CREATE INDEX events_unexpanded ON events (id) WHERE expanded = 0;

-- Deliveries with the same ordering_key (target + subject) go out strictly in id order.
CREATE TABLE webhook_deliveries (
    id TEXT PRIMARY KEY,
    event_id TEXT NOT NULL REFERENCES events(id),
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    subscription_id TEXT,
    url TEXT NOT NULL,
    ordering_key TEXT NOT NULL,
    event_kind TEXT NOT NULL,
    number_id TEXT,
    call_id TEXT,
    status TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'dead_letter', 'canceled')),
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    next_attempt_at TEXT NOT NULL,
    lease_token TEXT,
    lease_until TEXT,
    last_status_code INTEGER,
    last_error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    delivered_at TEXT
);
-- The lease query walks pending deliveries in id order, and asks per candidate whether an earlier
-- delivery of its ordering key blocks it. Only a leased or already-attempted delivery can block
-- (a fresh one is always due), so that second index stays small whatever the backlog.
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (id) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_blockers ON webhook_deliveries (ordering_key, id)
    WHERE status = 'pending' AND (lease_token IS NOT NULL OR attempts > 0);
CREATE INDEX webhook_deliveries_by_workspace ON webhook_deliveries (workspace_id, id);

CREATE TABLE webhook_attempts (
    id TEXT PRIMARY KEY,
    delivery_id TEXT NOT NULL REFERENCES webhook_deliveries(id),
    attempt INTEGER NOT NULL,
    attempted_at TEXT NOT NULL,
    status_code INTEGER,
    latency_ms INTEGER NOT NULL,
    error TEXT
);
CREATE INDEX webhook_attempts_by_delivery ON webhook_attempts (delivery_id, attempt);

-- wallet.low_balance fires once per downward crossing; a credit back above the threshold re-arms it.
ALTER TABLE wallets ADD COLUMN low_balance_alerted INTEGER NOT NULL DEFAULT 0;
