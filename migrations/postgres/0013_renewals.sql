-- Rentals over a number's life (DESIGN §4): each claimed number pays month after month, anchored
-- to its claim's day of the month. `rental_period` is the index of the latest period paid (0 is
-- the month debited at claim); period k runs from `created_at` + k months to `created_at` +
-- (k + 1) months, clamped to the month's end. `suspended_at` is when a renewal could not be paid.
ALTER TABLE tenant_numbers ADD COLUMN rental_period BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tenant_numbers ADD COLUMN suspended_at TEXT COLLATE "C";
-- The scheduler's two queues: numbers due to renew, and suspended numbers waiting for money.
CREATE INDEX tenant_numbers_due ON tenant_numbers (next_renewal_at, id) WHERE status = 'active';
CREATE INDEX tenant_numbers_suspended ON tenant_numbers (suspended_at, id) WHERE status = 'suspended';

-- A rental ledger row names its number (`reference`) and the period it pays for. The schema, not
-- timing, makes each (number, period) paid at most once, whatever restarts or engines.
ALTER TABLE ledger_entries ADD COLUMN period_start TEXT COLLATE "C";
ALTER TABLE ledger_entries ADD COLUMN period_end TEXT COLLATE "C";
UPDATE ledger_entries SET
    period_start = (SELECT t.created_at FROM tenant_numbers t WHERE t.id = ledger_entries.reference),
    period_end = (SELECT t.next_renewal_at FROM tenant_numbers t WHERE t.id = ledger_entries.reference)
WHERE kind = 'number_rental';
CREATE UNIQUE INDEX ledger_entries_one_rental_per_period ON ledger_entries (reference, period_start)
    WHERE kind = 'number_rental';
-- Usage reports read a workspace's ledger by time.
CREATE INDEX ledger_entries_by_time ON ledger_entries (workspace_id, created_at);
CREATE INDEX calls_by_start ON calls (workspace_id, started_at);
