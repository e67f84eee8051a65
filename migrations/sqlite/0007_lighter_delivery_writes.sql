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
