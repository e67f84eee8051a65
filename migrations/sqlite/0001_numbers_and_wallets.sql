-- Workspaces, API keys, wallets and the ledger, the number inventory, tenant numbers, SIP
-- credentials and stored idempotent responses. Ids are UUIDv7 text; timestamps are RFC 3339 UTC
-- text with fixed width, so text order is time order.

CREATE TABLE workspaces (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    webhook_secret TEXT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    key_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);

CREATE TABLE wallets (
    workspace_id TEXT PRIMARY KEY REFERENCES workspaces(id),
    currency TEXT NOT NULL,
    balance_minor INTEGER NOT NULL CHECK (balance_minor >= 0),
    low_balance_threshold_minor INTEGER NOT NULL DEFAULT 0 CHECK (low_balance_threshold_minor >= 0),
    updated_at TEXT NOT NULL
);

CREATE TABLE ledger_entries (
    id TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    kind TEXT NOT NULL,
    amount_minor INTEGER NOT NULL,
    balance_after_minor INTEGER NOT NULL CHECK (balance_after_minor >= 0),
    currency TEXT NOT NULL,
    reference TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX ledger_entries_by_workspace ON ledger_entries (workspace_id, id);

CREATE TABLE inventory_numbers (
    id TEXT PRIMARY KEY,
    number TEXT NOT NULL UNIQUE,
    country TEXT NOT NULL,
    capabilities TEXT NOT NULL,
    monthly_price_minor INTEGER NOT NULL CHECK (monthly_price_minor >= 0),
    inbound_per_min_minor INTEGER NOT NULL CHECK (inbound_per_min_minor >= 0),
    outbound_per_min_minor INTEGER NOT NULL CHECK (outbound_per_min_minor >= 0),
    currency TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('available', 'claimed')),
    created_at TEXT NOT NULL
);
CREATE INDEX inventory_numbers_browse ON inventory_numbers (status, country, currency, number);

CREATE TABLE tenant_numbers (
    id TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    inventory_id TEXT NOT NULL REFERENCES inventory_numbers(id),
    number TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'suspended', 'released')),
    capabilities TEXT NOT NULL,
    currency TEXT NOT NULL,
    monthly_price_minor INTEGER NOT NULL,
    inbound_per_min_minor INTEGER NOT NULL,
    outbound_per_min_minor INTEGER NOT NULL,
    voice_callback_url TEXT,
    events_url TEXT,
    next_renewal_at TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    released_at TEXT
);
-- At most one live owner per inventory number, whatever the application does.
CREATE UNIQUE INDEX tenant_numbers_one_owner ON tenant_numbers (inventory_id) WHERE status <> 'released';
CREATE INDEX tenant_numbers_by_workspace ON tenant_numbers (workspace_id, id);
CREATE INDEX tenant_numbers_by_number ON tenant_numbers (number) WHERE status <> 'released';

CREATE TABLE sip_credentials (
    id TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    number_id TEXT NOT NULL REFERENCES tenant_numbers(id),
    label TEXT NOT NULL,
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    ha1_md5 TEXT NOT NULL,
    ha1_sha256 TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE INDEX sip_credentials_by_number ON sip_credentials (number_id, id);

CREATE TABLE idempotency_keys (
    workspace_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    status_code INTEGER,
    response_body TEXT,
    created_at TEXT NOT NULL,
    PRIMARY KEY (workspace_id, idempotency_key)
);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
