-- PostgreSQL: every text column uses the "C" collation. Ids, E.164 numbers and RFC 3339
-- timestamps are ASCII keys: byte order is the right order and far cheaper than a locale's.
-- Workspaces, API keys, wallets and the ledger, the number inventory, tenant numbers, SIP
-- credentials and stored idempotent responses. Ids are UUIDv7 text; timestamps are RFC 3339 UTC
-- text with fixed width, so text order is time order.

CREATE TABLE workspaces (
    id TEXT COLLATE "C" PRIMARY KEY,
    name TEXT COLLATE "C" NOT NULL,
    webhook_secret TEXT COLLATE "C" NOT NULL,
    created_at TEXT COLLATE "C" NOT NULL
);

CREATE TABLE api_keys (
    id TEXT COLLATE "C" PRIMARY KEY,
    workspace_id TEXT COLLATE "C" NOT NULL REFERENCES workspaces(id),
    key_hash TEXT COLLATE "C" NOT NULL UNIQUE,
    created_at TEXT COLLATE "C" NOT NULL,
    revoked_at TEXT COLLATE "C"
);

CREATE TABLE wallets (
    workspace_id TEXT COLLATE "C" PRIMARY KEY REFERENCES workspaces(id),
    currency TEXT COLLATE "C" NOT NULL,
    balance_minor BIGINT NOT NULL CHECK (balance_minor >= 0),
    low_balance_threshold_minor BIGINT NOT NULL DEFAULT 0 CHECK (low_balance_threshold_minor >= 0),
    updated_at TEXT COLLATE "C" NOT NULL
);

CREATE TABLE ledger_entries (
    id TEXT COLLATE "C" PRIMARY KEY,
    workspace_id TEXT COLLATE "C" NOT NULL REFERENCES workspaces(id),
    kind TEXT COLLATE "C" NOT NULL,
    amount_minor BIGINT NOT NULL,
    balance_after_minor BIGINT NOT NULL CHECK (balance_after_minor >= 0),
    currency TEXT COLLATE "C" NOT NULL,
    reference TEXT COLLATE "C",
    created_at TEXT COLLATE "C" NOT NULL
);
CREATE INDEX ledger_entries_by_workspace ON ledger_entries (workspace_id, id);

CREATE TABLE inventory_numbers (
    id TEXT COLLATE "C" PRIMARY KEY,
    number TEXT COLLATE "C" NOT NULL UNIQUE,
    country TEXT COLLATE "C" NOT NULL,
    capabilities TEXT COLLATE "C" NOT NULL,
    monthly_price_minor BIGINT NOT NULL CHECK (monthly_price_minor >= 0),
    inbound_per_min_minor BIGINT NOT NULL CHECK (inbound_per_min_minor >= 0),
    outbound_per_min_minor BIGINT NOT NULL CHECK (outbound_per_min_minor >= 0),
    currency TEXT COLLATE "C" NOT NULL,
    status TEXT COLLATE "C" NOT NULL CHECK (status IN ('available', 'claimed')),
    created_at TEXT COLLATE "C" NOT NULL
);
CREATE INDEX inventory_numbers_browse ON inventory_numbers (status, country, currency, number);

CREATE TABLE tenant_numbers (
    id TEXT COLLATE "C" PRIMARY KEY,
    workspace_id TEXT COLLATE "C" NOT NULL REFERENCES workspaces(id),
    inventory_id TEXT COLLATE "C" NOT NULL REFERENCES inventory_numbers(id),
    number TEXT COLLATE "C" NOT NULL,
    status TEXT COLLATE "C" NOT NULL CHECK (status IN ('active', 'suspended', 'released')),
    capabilities TEXT COLLATE "C" NOT NULL,
    currency TEXT COLLATE "C" NOT NULL,
    monthly_price_minor BIGINT NOT NULL,
    inbound_per_min_minor BIGINT NOT NULL,
    outbound_per_min_minor BIGINT NOT NULL,
    voice_callback_url TEXT COLLATE "C",
    events_url TEXT COLLATE "C",
    next_renewal_at TEXT COLLATE "C" NOT NULL,
    created_at TEXT COLLATE "C" NOT NULL,
    updated_at TEXT COLLATE "C" NOT NULL,
    released_at TEXT COLLATE "C"
);
-- At most one live owner per inventory number, whatever the application does.
CREATE UNIQUE INDEX tenant_numbers_one_owner ON tenant_numbers (inventory_id) WHERE status <> 'released';
CREATE INDEX tenant_numbers_by_workspace ON tenant_numbers (workspace_id, id);
CREATE INDEX tenant_numbers_by_number ON tenant_numbers (number) WHERE status <> 'released';

CREATE TABLE sip_credentials (
    id TEXT COLLATE "C" PRIMARY KEY,
    workspace_id TEXT COLLATE "C" NOT NULL REFERENCES workspaces(id),
    number_id TEXT COLLATE "C" NOT NULL REFERENCES tenant_numbers(id),
    label TEXT COLLATE "C" NOT NULL,
    username TEXT COLLATE "C" NOT NULL UNIQUE,
    password_hash TEXT COLLATE "C" NOT NULL,
    ha1_md5 TEXT COLLATE "C" NOT NULL,
    ha1_sha256 TEXT COLLATE "C" NOT NULL,
    status TEXT COLLATE "C" NOT NULL CHECK (status IN ('active', 'revoked')),
    created_at TEXT COLLATE "C" NOT NULL,
    updated_at TEXT COLLATE "C" NOT NULL,
    revoked_at TEXT COLLATE "C"
);
CREATE INDEX sip_credentials_by_number ON sip_credentials (number_id, id);

CREATE TABLE idempotency_keys (
    workspace_id TEXT COLLATE "C" NOT NULL,
    idempotency_key TEXT COLLATE "C" NOT NULL,
    request_hash TEXT COLLATE "C" NOT NULL,
    status_code BIGINT,
    response_body TEXT COLLATE "C",
    created_at TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (workspace_id, idempotency_key)
);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
