-- Prepaid reservations (DESIGN §4, §8): a live outbound leg holds part of its wallet's balance,
-- extended in slices while the balance allows. What a wallet can still reserve is its balance less
-- the sum of its open reservations, so concurrent calls of one wallet share the balance. A
-- reservation ends in the transaction that ends its call (the charge never exceeds it); after a
-- crash, closing the orphaned call settles it from the call row.

CREATE TABLE call_reservations (
    call_id TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    amount_minor INTEGER NOT NULL CHECK (amount_minor >= 0),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX call_reservations_by_workspace ON call_reservations (workspace_id);
