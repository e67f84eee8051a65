-- Calls placed through the API (`POST /v1/calls`): who placed the call, the customer's own id for
-- it, per-call overrides of the number's webhooks, and the far end's final SIP code for every call.
-- `origin` is 'api' for calls placed through the API; the concurrency limit counts those still live.
ALTER TABLE calls ADD COLUMN origin TEXT COLLATE "C" NOT NULL DEFAULT 'sip'
    CHECK (origin IN ('sip', 'api'));
ALTER TABLE calls ADD COLUMN client_request_id TEXT COLLATE "C";
ALTER TABLE calls ADD COLUMN voice_callback_url TEXT COLLATE "C";
ALTER TABLE calls ADD COLUMN events_url TEXT COLLATE "C";
ALTER TABLE calls ADD COLUMN sip_status BIGINT;
CREATE INDEX calls_live_from_api ON calls (workspace_id)
    WHERE origin = 'api' AND status IN ('ringing', 'answered');
-- A call event goes to its call's `events_url` override when it has one, else to its number's.
ALTER TABLE events ADD COLUMN events_url TEXT COLLATE "C";
