-- A call with more than one party is one call per leg: a dialled party's leg (`dial`, calls from
-- the API ringing several numbers) is a call record of its own, billed on its own, whose
-- `parent_call_id` is the call that dialled it.
ALTER TABLE calls ADD COLUMN parent_call_id TEXT COLLATE "C" REFERENCES calls(id);
CREATE INDEX calls_by_parent ON calls (parent_call_id, id) WHERE parent_call_id IS NOT NULL;
