-- PostgreSQL: text columns use the "C" collation (see 0001).
-- SIP registrations (RFC 3261 §10): the devices that registered a number with one of its SIP
-- credentials. The address of record is the number; one row per contact URI of that number.
-- `source_addr`/`transport` are the flow the REGISTER came on (NAT: requests to the device go
-- there, not to a private Contact), `engine_id` the process holding that flow.

CREATE TABLE sip_registrations (
    id TEXT COLLATE "C" PRIMARY KEY,
    workspace_id TEXT COLLATE "C" NOT NULL REFERENCES workspaces(id),
    number_id TEXT COLLATE "C" NOT NULL REFERENCES tenant_numbers(id),
    credential_id TEXT COLLATE "C" NOT NULL REFERENCES sip_credentials(id),
    contact TEXT COLLATE "C" NOT NULL,
    source_addr TEXT COLLATE "C" NOT NULL,
    transport TEXT COLLATE "C" NOT NULL CHECK (transport IN ('udp', 'tcp')),
    user_agent TEXT COLLATE "C",
    sip_call_id TEXT COLLATE "C" NOT NULL,
    cseq BIGINT NOT NULL,
    engine_id TEXT COLLATE "C" NOT NULL,
    expires_at TEXT COLLATE "C" NOT NULL,
    created_at TEXT COLLATE "C" NOT NULL,
    updated_at TEXT COLLATE "C" NOT NULL
);
CREATE UNIQUE INDEX sip_registrations_contact ON sip_registrations (number_id, contact);
CREATE INDEX sip_registrations_by_credential ON sip_registrations (credential_id);
CREATE INDEX sip_registrations_by_expiry ON sip_registrations (expires_at);

-- Server-side secrets shared by every engine on this database (the digest nonce MAC key), so a
-- restart or another engine accepts what one engine issued.
CREATE TABLE server_secrets (
    name TEXT COLLATE "C" PRIMARY KEY,
    secret TEXT COLLATE "C" NOT NULL,
    created_at TEXT COLLATE "C" NOT NULL
);
