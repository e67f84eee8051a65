-- PostgreSQL: text columns use the "C" collation (see 0001).
-- Events waiting to be turned into deliveries, in commit (`seq`) order. This narrow table
-- replaces `events.expanded` and its partial index on PostgreSQL: marking an event expanded
-- rewrote the whole event row and two of its indexes (a non-HOT update), and it happened on the
-- lease, so the same delivery was written twice more (inserted leased, updated when sent).
--
-- Now a lease claims queue rows (`lease_token`, `lease_until`; not indexed, and the table keeps
-- room on every page, so a claim is a HOT update of a small row), and a delivery of an event with
-- one receiver is written once, with its first attempt, in the transaction that deletes its queue
-- row. A claim by a process that crashed lapses at `lease_until`, and the event is claimed again:
-- at least once, as before. Events with several receivers, or queued behind a delivery that is
-- already in the table, are written at the lease as before and leave the queue then.
--
-- Upgrade with every process stopped: a process of the previous version would still read
-- `events.expanded` (never set now, so it would send every new event again) and would write
-- events without queue rows (which this version would never send).
CREATE TABLE event_queue (
    seq BIGINT PRIMARY KEY,
    event_id TEXT COLLATE "C" NOT NULL,
    lease_token TEXT COLLATE "C",
    lease_until TEXT COLLATE "C"
) WITH (
    fillfactor = 50,
    -- Every row is deleted soon after it is written: vacuum it by row count, not by table size,
    -- so the dead rows at the head of the queue, which every lease walks past, are reclaimed.
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 10000
);
INSERT INTO event_queue (seq, event_id) SELECT seq, id FROM events WHERE expanded = 0;
-- `events.expanded` is no longer read or written on PostgreSQL (SQLite still uses it).
DROP INDEX events_unexpanded_by_seq;
