//! SIP registrations in the database: the registrar's store (`RegistrarStore`) and what the API
//! lists and deletes. A number's bindings change in one transaction that first locks the
//! credential (still active, still with the HA1 the request was verified with) and the number,
//! so a REGISTER racing a rotation, a revocation or a release never leaves a binding behind, on
//! one process or several.

use std::net::SocketAddr;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sautikit_actors::model::NumberStatus;
use sautikit_actors::registrar::{
    DeviceLogin, RegisterBindings, RegisterStoreError, RegistrarStore, Registration,
};
use sautikit_actors::store::StorageError;
use sautikit_sip::digest::Algorithm;
use sautikit_sip::registrar::{self, Change, ExistingBinding};
use sautikit_sip::transaction::Transport;
use sqlx::any::AnyRow;

use crate::store::{SqlStore, get, get_time, storage};
use crate::time::{new_id, to_db};

const NONCE_SECRET: &str = "sip_nonce_key";

macro_rules! registration_cols {
    () => {
        "id, workspace_id, number_id, credential_id, contact, source_addr, transport, \
         user_agent, sip_call_id, cseq, expires_at, created_at, updated_at"
    };
}

/// A registration as the API shows it.
#[derive(Debug, Clone)]
pub struct RegistrationRow {
    pub registration: Registration,
    pub credential_label: String,
    pub created_at: DateTime<Utc>,
}

fn transport_of(s: &str) -> Transport {
    if s == "tcp" {
        Transport::Tcp
    } else {
        Transport::Udp
    }
}

fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Udp => "udp",
        Transport::Tcp => "tcp",
    }
}

fn registration_from_row(row: &AnyRow) -> Result<Registration, StorageError> {
    let source: String = get(row, "source_addr")?;
    let transport: String = get(row, "transport")?;
    Ok(Registration {
        id: get(row, "id")?,
        workspace_id: get(row, "workspace_id")?,
        number_id: get(row, "number_id")?,
        credential_id: get(row, "credential_id")?,
        contact: get(row, "contact")?,
        source: source
            .parse()
            .map_err(|e| StorageError(format!("bad source_addr {source:?}: {e}")))?,
        transport: transport_of(&transport),
        user_agent: get(row, "user_agent")?,
        expires_at: get_time(row, "expires_at")?,
        updated_at: get_time(row, "updated_at")?,
    })
}

fn random_secret() -> Result<[u8; 32], StorageError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| StorageError(format!("no randomness: {e}")))?;
    Ok(b)
}

#[async_trait]
impl RegistrarStore for SqlStore {
    async fn nonce_secret(&self, now: DateTime<Utc>) -> Result<[u8; 32], StorageError> {
        // Whoever inserts first wins; every engine then reads the same key.
        sqlx::query(
            "INSERT INTO server_secrets (name, secret, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(NONCE_SECRET)
        .bind(hex::encode(random_secret()?))
        .bind(to_db(now))
        .execute(&self.db().write)
        .await
        .map_err(storage)?;
        let row = sqlx::query("SELECT secret FROM server_secrets WHERE name = $1")
            .bind(NONCE_SECRET)
            .fetch_one(&self.db().write)
            .await
            .map_err(storage)?;
        let text: String = get(&row, "secret")?;
        let bytes = hex::decode(&text).map_err(storage)?;
        <[u8; 32]>::try_from(bytes.as_slice())
            .map_err(|_| StorageError("the nonce key is not 32 bytes".into()))
    }

    async fn device_login(&self, username: &str) -> Result<Option<DeviceLogin>, StorageError> {
        let row = sqlx::query(
            "SELECT c.id, c.label, c.username, c.workspace_id, c.number_id, c.ha1_md5, \
             c.ha1_sha256, n.number, n.status FROM sip_credentials c \
             JOIN tenant_numbers n ON n.id = c.number_id \
             WHERE c.username = $1 AND c.status = 'active'",
        )
        .bind(username)
        .fetch_optional(&self.db().read)
        .await
        .map_err(storage)?;
        row.map(|r| {
            let status: String = get(&r, "status")?;
            Ok(DeviceLogin {
                credential_id: get(&r, "id")?,
                label: get(&r, "label")?,
                username: get(&r, "username")?,
                workspace_id: get(&r, "workspace_id")?,
                number_id: get(&r, "number_id")?,
                number: get(&r, "number")?,
                number_status: NumberStatus::parse(&status)
                    .ok_or_else(|| StorageError(format!("bad number status {status:?}")))?,
                ha1_md5: get(&r, "ha1_md5")?,
                ha1_sha256: get(&r, "ha1_sha256")?,
            })
        })
        .transpose()
    }

    async fn realm_for(&self, aor_user: &str) -> Result<Option<String>, StorageError> {
        let digits = aor_user.trim_start_matches('+');
        let row = sqlx::query(
            "SELECT workspace_id FROM sip_credentials WHERE username = $1 AND status = 'active' \
             UNION ALL SELECT workspace_id FROM tenant_numbers \
             WHERE number = $2 AND status <> 'released' LIMIT 1",
        )
        .bind(aor_user)
        .bind(format!("+{digits}"))
        .fetch_optional(&self.db().read)
        .await
        .map_err(storage)?;
        row.map(|r| get(&r, "workspace_id")).transpose()
    }

    async fn register(
        &self,
        cmd: RegisterBindings,
    ) -> Result<Vec<Registration>, RegisterStoreError> {
        let login = &cmd.login;
        let now = to_db(cmd.now);
        let mut tx = self.db().write.begin().await.map_err(storage)?;
        // Lock the credential as it was verified (PostgreSQL holds the row until commit; SQLite
        // has one writer): a rotation or revocation is wholly before or after this.
        let ha1_column = match cmd.verified_with {
            Algorithm::Md5 => "ha1_md5",
            Algorithm::Sha256 => "ha1_sha256",
        };
        let locked = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE sip_credentials SET updated_at = updated_at \
             WHERE id = $1 AND status = 'active' AND {ha1_column} = $2"
        )))
        .bind(&login.credential_id)
        .bind(login.ha1(cmd.verified_with))
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
        if locked.rows_affected() != 1 {
            tx.rollback().await.map_err(storage)?;
            return Err(RegisterStoreError::CredentialChanged);
        }
        // The number's row serializes REGISTERs of its devices (the 10-contact limit holds).
        let active = sqlx::query(
            "UPDATE tenant_numbers SET updated_at = updated_at WHERE id = $1 AND status = 'active'",
        )
        .bind(&login.number_id)
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
        if active.rows_affected() != 1 {
            tx.rollback().await.map_err(storage)?;
            return Err(RegisterStoreError::NumberNotActive);
        }
        sqlx::query("DELETE FROM sip_registrations WHERE number_id = $1 AND expires_at <= $2")
            .bind(&login.number_id)
            .bind(&now)
            .execute(&mut *tx)
            .await
            .map_err(storage)?;
        let rows = sqlx::query(
            "SELECT id, contact, sip_call_id, cseq FROM sip_registrations WHERE number_id = $1",
        )
        .bind(&login.number_id)
        .fetch_all(&mut *tx)
        .await
        .map_err(storage)?;
        let mut existing = Vec::with_capacity(rows.len());
        let mut ids = Vec::with_capacity(rows.len());
        for r in &rows {
            let cseq: i64 = get(r, "cseq")?;
            ids.push(get::<String>(r, "id")?);
            existing.push(ExistingBinding {
                contact: get(r, "contact")?,
                call_id: get(r, "sip_call_id")?,
                cseq: u32::try_from(cseq).unwrap_or(u32::MAX),
            });
        }
        let changes = match registrar::plan(&existing, &cmd.request, &cmd.limits) {
            Ok(c) => c,
            Err(e) => {
                tx.rollback().await.map_err(storage)?;
                return Err(e.into());
            }
        };
        let source = cmd.source.addr.to_string();
        let transport = transport_name(cmd.source.transport);
        for change in changes {
            match change {
                Change::Unbind { contact } => {
                    sqlx::query(
                        "DELETE FROM sip_registrations WHERE number_id = $1 AND contact = $2",
                    )
                    .bind(&login.number_id)
                    .bind(&contact)
                    .execute(&mut *tx)
                    .await
                    .map_err(storage)?;
                }
                Change::Bind { contact, expires } => {
                    let expires_at = to_db(cmd.now + chrono::Duration::seconds(i64::from(expires)));
                    let known = existing
                        .iter()
                        .zip(&ids)
                        .find(|(b, _)| b.contact == contact)
                        .map(|(_, id)| id.clone());
                    match known {
                        Some(id) => {
                            sqlx::query(
                                "UPDATE sip_registrations SET credential_id = $1, source_addr = $2, \
                                 transport = $3, user_agent = $4, sip_call_id = $5, cseq = $6, \
                                 engine_id = $7, expires_at = $8, updated_at = $9 WHERE id = $10",
                            )
                            .bind(&login.credential_id)
                            .bind(&source)
                            .bind(transport)
                            .bind(cmd.user_agent.as_deref())
                            .bind(&cmd.request.call_id)
                            .bind(i64::from(cmd.request.cseq))
                            .bind(&cmd.engine_id)
                            .bind(&expires_at)
                            .bind(&now)
                            .bind(&id)
                            .execute(&mut *tx)
                            .await
                            .map_err(storage)?;
                        }
                        None => {
                            sqlx::query(
                                "INSERT INTO sip_registrations (id, workspace_id, number_id, \
                                 credential_id, contact, source_addr, transport, user_agent, \
                                 sip_call_id, cseq, engine_id, expires_at, created_at, updated_at) \
                                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13)",
                            )
                            .bind(new_id())
                            .bind(&login.workspace_id)
                            .bind(&login.number_id)
                            .bind(&login.credential_id)
                            .bind(&contact)
                            .bind(&source)
                            .bind(transport)
                            .bind(cmd.user_agent.as_deref())
                            .bind(&cmd.request.call_id)
                            .bind(i64::from(cmd.request.cseq))
                            .bind(&cmd.engine_id)
                            .bind(&expires_at)
                            .bind(&now)
                            .execute(&mut *tx)
                            .await
                            .map_err(storage)?;
                        }
                    }
                }
            }
        }
        let rows = sqlx::query(concat!(
            "SELECT ",
            registration_cols!(),
            " FROM sip_registrations WHERE number_id = $1 ORDER BY id"
        ))
        .bind(&login.number_id)
        .fetch_all(&mut *tx)
        .await
        .map_err(storage)?;
        let after = rows
            .iter()
            .map(registration_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        tx.commit().await.map_err(storage)?;
        Ok(after)
    }

    async fn udp_bindings(
        &self,
        engine_id: &str,
        adopt_silent_since: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Registration>, StorageError> {
        let now = to_db(now);
        if let Some(since) = adopt_silent_since {
            let since = to_db(since);
            let silent = "engine_id <> $1 AND NOT EXISTS (SELECT 1 FROM engines e \
                          WHERE e.id = sip_registrations.engine_id AND e.heartbeat_at > $2)";
            let mut tx = self.db().write.begin().await.map_err(storage)?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM sip_registrations WHERE transport = 'tcp' AND {silent}"
            )))
            .bind(engine_id)
            .bind(&since)
            .execute(&mut *tx)
            .await
            .map_err(storage)?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE sip_registrations SET engine_id = $1 WHERE transport = 'udp' AND {silent}"
            )))
            .bind(engine_id)
            .bind(&since)
            .execute(&mut *tx)
            .await
            .map_err(storage)?;
            tx.commit().await.map_err(storage)?;
        }
        let rows = sqlx::query(concat!(
            "SELECT ",
            registration_cols!(),
            " FROM sip_registrations WHERE engine_id = $1 AND transport = 'udp' AND expires_at > $2"
        ))
        .bind(engine_id)
        .bind(&now)
        .fetch_all(&self.db().read)
        .await
        .map_err(storage)?;
        rows.iter().map(registration_from_row).collect()
    }

    async fn drop_silent_binding(
        &self,
        id: &str,
        since: DateTime<Utc>,
    ) -> Result<bool, StorageError> {
        let r = sqlx::query("DELETE FROM sip_registrations WHERE id = $1 AND updated_at <= $2")
            .bind(id)
            .bind(to_db(since))
            .execute(&self.db().write)
            .await
            .map_err(storage)?;
        Ok(r.rows_affected() > 0)
    }

    async fn drop_flow_bindings(
        &self,
        engine_id: &str,
        source: SocketAddr,
    ) -> Result<u64, StorageError> {
        let r = sqlx::query(
            "DELETE FROM sip_registrations WHERE engine_id = $1 AND transport = 'tcp' \
             AND source_addr = $2",
        )
        .bind(engine_id)
        .bind(source.to_string())
        .execute(&self.db().write)
        .await
        .map_err(storage)?;
        Ok(r.rows_affected())
    }

    async fn reachable_bindings(
        &self,
        number_id: &str,
        engine_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<Registration>, StorageError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            registration_cols!(),
            " FROM sip_registrations WHERE number_id = $1 AND expires_at > $2 \
              AND (transport = 'udp' OR engine_id = $3) ORDER BY id"
        ))
        .bind(number_id)
        .bind(to_db(now))
        .bind(engine_id)
        .fetch_all(&self.db().read)
        .await
        .map_err(storage)?;
        rows.iter().map(registration_from_row).collect()
    }

    async fn sweep_expired_bindings(&self, now: DateTime<Utc>) -> Result<u64, StorageError> {
        // Cheap when nothing is due: one index probe on the read pool before taking the writer.
        let now = to_db(now);
        let due = sqlx::query("SELECT id FROM sip_registrations WHERE expires_at <= $1 LIMIT 1")
            .bind(&now)
            .fetch_optional(&self.db().read)
            .await
            .map_err(storage)?;
        if due.is_none() {
            return Ok(0);
        }
        let r = sqlx::query("DELETE FROM sip_registrations WHERE expires_at <= $1")
            .bind(&now)
            .execute(&self.db().write)
            .await
            .map_err(storage)?;
        Ok(r.rows_affected())
    }
}

impl SqlStore {
    /// The number's live registrations, newest first (`before_id` pages on).
    pub async fn list_registrations(
        &self,
        workspace_id: &str,
        number_id: &str,
        before_id: Option<&str>,
        limit: i64,
        now: DateTime<Utc>,
    ) -> Result<Option<Vec<RegistrationRow>>, StorageError> {
        if self.get_number(workspace_id, number_id).await?.is_none() {
            return Ok(None);
        }
        let rows = sqlx::query(
            "SELECT r.id, r.workspace_id, r.number_id, r.credential_id, r.contact, r.source_addr, \
             r.transport, r.user_agent, r.sip_call_id, r.cseq, r.expires_at, r.created_at, \
             r.updated_at, c.label FROM sip_registrations r \
             JOIN sip_credentials c ON c.id = r.credential_id \
             WHERE r.number_id = $1 AND r.workspace_id = $2 AND r.expires_at > $3 \
             AND ($4 IS NULL OR r.id < $4) ORDER BY r.id DESC LIMIT $5",
        )
        .bind(number_id)
        .bind(workspace_id)
        .bind(to_db(now))
        .bind(before_id)
        .bind(limit)
        .fetch_all(&self.db().read)
        .await
        .map_err(storage)?;
        rows.iter()
            .map(|r| {
                Ok(RegistrationRow {
                    registration: registration_from_row(r)?,
                    credential_label: get(r, "label")?,
                    created_at: get_time(r, "created_at")?,
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Remove one registration of a workspace's number. `Ok(false)`: no such registration.
    pub async fn delete_registration(
        &self,
        workspace_id: &str,
        number_id: &str,
        registration_id: &str,
    ) -> Result<bool, StorageError> {
        let r = sqlx::query(
            "DELETE FROM sip_registrations WHERE id = $1 AND number_id = $2 AND workspace_id = $3",
        )
        .bind(registration_id)
        .bind(number_id)
        .bind(workspace_id)
        .execute(&self.db().write)
        .await
        .map_err(storage)?;
        Ok(r.rows_affected() > 0)
    }
}
