-- A delivery's first attempt is kept on its own row (most deliveries succeed at once, and then
-- this is the only write they need); webhook_attempts holds attempt 2 onward. The delivery log
-- shows attempt 1 from these columns (rows written before this migration have it in
-- webhook_attempts, and these columns NULL).
ALTER TABLE webhook_deliveries ADD COLUMN first_attempted_at TEXT;
ALTER TABLE webhook_deliveries ADD COLUMN first_status_code INTEGER;
ALTER TABLE webhook_deliveries ADD COLUMN first_latency_ms INTEGER;
ALTER TABLE webhook_deliveries ADD COLUMN first_error TEXT;
