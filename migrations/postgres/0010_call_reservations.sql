-- Prepaid reservations (DESIGN §4, §8): a live outbound leg holds part of its wallet's balance,
-- extended in slices while the balance allows. What a wallet can still reserve is its balance less
-- the sum of its open reservations, so concurrent calls of one wallet share the balance. A
-- reservation ends in the transaction that ends its call (the charge never exceeds it); after a
-- crash, closing the orphaned call settles it from the call row.

CREATE TABLE call_reservations (
    call_id TEXT COLLATE "C" PRIMARY KEY,
    workspace_id TEXT COLLATE "C" NOT NULL REFERENCES workspaces(id),
    amount_minor BIGINT NOT NULL CHECK (amount_minor >= 0),
    created_at TEXT COLLATE "C" NOT NULL,
    updated_at TEXT COLLATE "C" NOT NULL
);
CREATE INDEX call_reservations_by_workspace ON call_reservations (workspace_id);
