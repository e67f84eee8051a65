-- PostgreSQL: text columns use the "C" collation (see 0001).
-- A delivery's first attempt is kept on its own row (most deliveries succeed at once, and then
-- this is the only write they need); webhook_attempts holds attempt 2 onward. The delivery log
-- shows attempt 1 from these columns (rows written before this migration have it in
-- webhook_attempts, and these columns NULL).
ALTER TABLE webhook_deliveries ADD COLUMN first_attempted_at TEXT COLLATE "C";
ALTER TABLE webhook_deliveries ADD COLUMN first_status_code BIGINT;
ALTER TABLE webhook_deliveries ADD COLUMN first_latency_ms BIGINT;
ALTER TABLE webhook_deliveries ADD COLUMN first_error TEXT COLLATE "C";

-- Events are expanded in commit order. Event ids are UUIDv7 made by the writing process, so two
-- processes committing in the same millisecond can get ids in the opposite order; `seq` is taken
-- at insert, and two events of one ordering key are written under the same row lock (the wallet,
-- the number, the call), so for them insert order is commit order. Existing events keep id order.
CREATE SEQUENCE events_seq AS BIGINT;
ALTER TABLE events ADD COLUMN seq BIGINT;
UPDATE events SET seq = o.n
    FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM events) AS o
    WHERE events.id = o.id;
SELECT setval('events_seq', COALESCE((SELECT max(seq) FROM events), 0) + 1, false);
ALTER TABLE events ALTER COLUMN seq SET DEFAULT nextval('events_seq');
ALTER TABLE events ALTER COLUMN seq SET NOT NULL;
ALTER SEQUENCE events_seq OWNED BY events.seq;
CREATE INDEX events_unexpanded_by_seq ON events (seq) WHERE expanded = 0;
DROP INDEX events_unexpanded;
