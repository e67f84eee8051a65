-- SIP registrations (RFC 3261 §10): the devices that registered a number with one of its SIP
-- credentials. The address of record is the number; one row per contact URI of that number.
-- `source_addr`/`transport` are the flow the REGISTER came on (NAT: requests to the device go
-- there, not to a private Contact), `engine_id` the process holding that flow.

CREATE TABLE sip_registrations (
    id TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL REFERENCES workspaces(id),
    number_id TEXT NOT NULL REFERENCES tenant_numbers(id),
    credential_id TEXT NOT NULL REFERENCES sip_credentials(id),
    contact TEXT NOT NULL,
    source_addr TEXT NOT NULL,
    transport TEXT NOT NULL CHECK (transport IN ('udp', 'tcp')),
    user_agent TEXT,
    sip_call_id TEXT NOT NULL,
    cseq INTEGER NOT NULL,
    engine_id TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE UNIQUE INDEX sip_registrations_contact ON sip_registrations (number_id, contact);
CREATE INDEX sip_registrations_by_credential ON sip_registrations (credential_id);
CREATE INDEX sip_registrations_by_expiry ON sip_registrations (expires_at);

-- Server-side secrets shared by every engine on this database (the digest nonce MAC key), so a
-- restart or another engine accepts what one engine issued.
CREATE TABLE server_secrets (
    name TEXT PRIMARY KEY,
    secret TEXT NOT NULL,
    created_at TEXT NOT NULL
);
