-- The timeline clustered by call: one B-tree keyed (call_id, id) instead of a rowid table with
-- two indexes (its text primary key and `call_timeline_by_call`, dropped with the old table). A
-- call writes about ten timeline lines, so each line cost three B-tree inserts, the most of any
-- row a call writes; now it costs one, and a call's lines sit together on disk, in the order the
-- timeline API reads them. The lines are small (two ids, a time, a kind and a short JSON detail
-- of well under 1 KiB), which is what WITHOUT ROWID suits. Nothing references call_timeline, so
-- the rebuild is a plain copy (it needs the table's size again in free disk while it runs).
CREATE TABLE call_timeline_new (
    call_id TEXT NOT NULL REFERENCES calls(id),
    id TEXT NOT NULL,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL,
    PRIMARY KEY (call_id, id)
) WITHOUT ROWID;
INSERT INTO call_timeline_new (call_id, id, at, kind, detail)
    SELECT call_id, id, at, kind, detail FROM call_timeline;
DROP TABLE call_timeline;
ALTER TABLE call_timeline_new RENAME TO call_timeline;
