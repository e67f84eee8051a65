-- PostgreSQL: text columns use the "C" collation (see 0001).
-- A delivery leased when it is written (the usual case on PostgreSQL) and recorded when it was
-- sent never needs to be found as a lease candidate or as a queued one: only unleased pending
-- deliveries are. These two indexes replace the ones over every pending delivery, so such a
-- delivery enters three indexes instead of five, and the lease no longer walks past the
-- deliveries in flight. Leases that lapsed (a crashed process) are cleared by the next lease,
-- which brings their deliveries back into these indexes.
CREATE INDEX webhook_deliveries_unleased ON webhook_deliveries (id)
    WHERE status = 'pending' AND lease_token IS NULL;
CREATE INDEX webhook_deliveries_unleased_by_key ON webhook_deliveries (ordering_key)
    WHERE status = 'pending' AND lease_token IS NULL;
DROP INDEX webhook_deliveries_pending;
DROP INDEX webhook_deliveries_pending_by_key;
-- Deliveries are written only by the outbox, from the event row it has just read in the same
-- transaction, and neither events nor workspaces are ever deleted. The foreign keys cost a
-- trigger per inserted delivery plus a share lock on its event row (half the time of the insert
-- at expansion); the references still hold by construction.
ALTER TABLE webhook_deliveries DROP CONSTRAINT webhook_deliveries_event_id_fkey;
ALTER TABLE webhook_deliveries DROP CONSTRAINT webhook_deliveries_workspace_id_fkey;
