-- An Idempotency-Key's change, marked in the change's own transaction: once `applied_at` is set,
-- the request took effect whatever became of its response, and no retry under the key runs it
-- again (a key that is only pending may be run again once its request is known to be gone).
ALTER TABLE idempotency_keys ADD COLUMN applied_at TEXT COLLATE "C";
