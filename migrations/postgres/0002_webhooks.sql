-- PostgreSQL: text columns use the "C" collation (see 0001).
-- Webhooks: workspace subscriptions, the durable event outbox, deliveries (one per event and
-- target) and every delivery attempt.

CREATE TABLE webhook_subscriptions (
    id TEXT COLLATE "C" PRIMARY KEY,
    workspace_id TEXT COLLATE "C" NOT NULL REFERENCES workspaces(id),
    url TEXT COLLATE "C" NOT NULL,
    events TEXT COLLATE "C" NOT NULL,
    status TEXT COLLATE "C" NOT NULL CHECK (status IN ('active', 'deleted')),
    created_at TEXT COLLATE "C" NOT NULL,
    deleted_at TEXT COLLATE "C"
);
CREATE INDEX webhook_subscriptions_by_workspace ON webhook_subscriptions (workspace_id, status, id);

-- An event is written in the same transaction as the change that causes it. `body` is the exact
-- JSON envelope every delivery of it sends, fixed at creation.
CREATE TABLE events (
    id TEXT COLLATE "C" PRIMARY KEY,
    workspace_id TEXT COLLATE "C" NOT NULL REFERENCES workspaces(id),
    event_kind TEXT COLLATE "C" NOT NULL,
    number_id TEXT COLLATE "C",
    call_id TEXT COLLATE "C",
    occurred_at TEXT COLLATE "C" NOT NULL,
    body TEXT COLLATE "C" NOT NULL,
    -- 0 until the Events actor has turned the event into deliveries (one per subscriber or
    -- events_url). Fan-out happens there, in batches, not in the transaction that made the change.
    expanded BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX events_by_workspace ON events (workspace_id, id);
CREATE INDEX events_unexpanded ON events (id) WHERE expanded = 0;

-- Deliveries with the same ordering_key (target + subject) go out strictly in id order.
CREATE TABLE webhook_deliveries (
    id TEXT COLLATE "C" PRIMARY KEY,
    event_id TEXT COLLATE "C" NOT NULL REFERENCES events(id),
    workspace_id TEXT COLLATE "C" NOT NULL REFERENCES workspaces(id),
    subscription_id TEXT COLLATE "C",
    url TEXT COLLATE "C" NOT NULL,
    ordering_key TEXT COLLATE "C" NOT NULL,
    event_kind TEXT COLLATE "C" NOT NULL,
    number_id TEXT COLLATE "C",
    call_id TEXT COLLATE "C",
    status TEXT COLLATE "C" NOT NULL CHECK (status IN ('pending', 'succeeded', 'dead_letter', 'canceled')),
    attempts BIGINT NOT NULL DEFAULT 0,
    max_attempts BIGINT NOT NULL,
    next_attempt_at TEXT COLLATE "C" NOT NULL,
    lease_token TEXT COLLATE "C",
    lease_until TEXT COLLATE "C",
    last_status_code BIGINT,
    last_error TEXT COLLATE "C",
    created_at TEXT COLLATE "C" NOT NULL,
    updated_at TEXT COLLATE "C" NOT NULL,
    delivered_at TEXT COLLATE "C"
);
-- The lease query walks pending deliveries in id order, and asks per candidate whether an earlier
-- delivery of its ordering key blocks it. Only a leased or already-attempted delivery can block
-- (a fresh one is always due), so that second index stays small whatever the backlog.
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (id) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_blockers ON webhook_deliveries (ordering_key, id)
    WHERE status = 'pending' AND (lease_token IS NOT NULL OR attempts > 0);
CREATE INDEX webhook_deliveries_by_workspace ON webhook_deliveries (workspace_id, id);

CREATE TABLE webhook_attempts (
    id TEXT COLLATE "C" PRIMARY KEY,
    delivery_id TEXT COLLATE "C" NOT NULL REFERENCES webhook_deliveries(id),
    attempt BIGINT NOT NULL,
    attempted_at TEXT COLLATE "C" NOT NULL,
    status_code BIGINT,
    latency_ms BIGINT NOT NULL,
    error TEXT COLLATE "C"
);
CREATE INDEX webhook_attempts_by_delivery ON webhook_attempts (delivery_id, attempt);

-- wallet.low_balance fires once per downward crossing; a credit back above the threshold re-arms it.
ALTER TABLE wallets ADD COLUMN low_balance_alerted BIGINT NOT NULL DEFAULT 0;
