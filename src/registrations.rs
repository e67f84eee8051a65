//! SIP registrations in the database: the registrar's store (`RegistrarStore`) and what the API
//! lists and deletes. A number's bindings change in one transaction that first locks the
//! credential (still active, still with the HA1 the request was verified with) and the number,
//! so a REGISTER racing a rotation, a revocation or a release never leaves a binding behind, on
//! one process or several.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use sautikit_actors::model::NumberStatus;
use sautikit_actors::registrar::{
    DeviceLogin, RegisterBindings, RegisterStoreError, RegistrarStore, Registration,
};
use sautikit_actors::store::StorageError;
use sautikit_sip::digest::Algorithm;
use sautikit_sip::registrar::{self, Change, ExistingBinding};
use sautikit_sip::transaction::Transport;
use sqlx::AnyConnection;
use sqlx::any::AnyRow;
use tokio::sync::{mpsc, oneshot};

use crate::calls_store::is_transient;
use crate::db::Backend;
use crate::group_commit;
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
        let login = row
            .map(|r| {
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
            .transpose()?;
        match &login {
            Some(l) => self.logins().put_login(l),
            None => self.logins().forget_username(username),
        }
        Ok(login)
    }

    async fn realm_pool(&self) -> Result<Arc<[String]>, StorageError> {
        if let Some(pool) = self.logins().realm_pool() {
            return Ok(pool);
        }
        // One read at a time: a scanner's burst of first contacts when the pool expires waits for
        // one query instead of each running its own.
        let _reading = self.logins().realm_pool_reading.lock().await;
        if let Some(pool) = self.logins().realm_pool() {
            return Ok(pool);
        }
        let rows = sqlx::query(
            "SELECT DISTINCT workspace_id FROM tenant_numbers WHERE status <> 'released' \
             ORDER BY workspace_id LIMIT $1",
        )
        .bind(REALM_POOL_MAX)
        .fetch_all(&self.db().read)
        .await
        .map_err(storage)?;
        let pool: Vec<String> = rows
            .iter()
            .map(|r| get(r, "workspace_id"))
            .collect::<Result<_, _>>()?;
        let pool: Arc<[String]> = Arc::from(pool);
        self.logins().put_realm_pool(pool.clone());
        Ok(pool)
    }

    async fn realm_for(&self, aor_user: &str) -> Result<Option<String>, StorageError> {
        let digits = aor_user.trim_start_matches('+');
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            // A username: the device answers this challenge next, so read its whole login now
            // (one query for a first contact, and the answer finds it cached).
            if let Some(login) = self.device_login(aor_user).await? {
                self.logins().put_realm(aor_user, &login.workspace_id);
                return Ok(Some(login.workspace_id));
            }
        }
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
        let realm: Option<String> = row.map(|r| get(&r, "workspace_id")).transpose()?;
        if let Some(realm) = &realm {
            self.logins().put_realm(aor_user, realm);
        }
        Ok(realm)
    }

    fn cached_login(&self, username: &str) -> Option<DeviceLogin> {
        self.logins().login(username)
    }

    fn cached_realm(&self, aor_user: &str) -> Option<String> {
        self.logins().realm(aor_user)
    }

    fn forget_login(&self, username: &str) {
        self.logins().forget_username(username);
    }

    async fn register(
        &self,
        cmd: RegisterBindings,
    ) -> Result<Vec<Registration>, RegisterStoreError> {
        self.register_writer().register(cmd).await
    }

    async fn adopt_silent_bindings(
        &self,
        engine_id: &str,
        since: DateTime<Utc>,
    ) -> Result<(), StorageError> {
        let since = to_db(since);
        let silent = "engine_id <> $1 AND NOT EXISTS (SELECT 1 FROM engines e \
                      WHERE e.id = sip_registrations.engine_id AND e.heartbeat_at > $2)";
        let mut tx = self.db().begin_write().await.map_err(storage)?;
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
        tx.commit().await.map_err(storage)
    }

    async fn udp_binding_count(
        &self,
        engine_id: &str,
        now: DateTime<Utc>,
    ) -> Result<u64, StorageError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM sip_registrations \
             WHERE engine_id = $1 AND transport = 'udp' AND expires_at > $2",
        )
        .bind(engine_id)
        .bind(to_db(now))
        .fetch_one(&self.db().read)
        .await
        .map_err(storage)?;
        let n: i64 = get(&row, "n")?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn udp_bindings(
        &self,
        engine_id: &str,
        after: &str,
        limit: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<Registration>, StorageError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            registration_cols!(),
            " FROM sip_registrations WHERE engine_id = $1 AND transport = 'udp' \
              AND expires_at > $2 AND id > $3 ORDER BY id LIMIT $4"
        ))
        .bind(engine_id)
        .bind(to_db(now))
        .bind(after)
        .bind(i64::from(limit))
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

    async fn credential_ids_by_label(
        &self,
        number_id: &str,
        label: &str,
    ) -> Result<Vec<String>, StorageError> {
        let rows = sqlx::query(
            "SELECT id FROM sip_credentials WHERE number_id = $1 AND label = $2 \
              AND status = 'active' ORDER BY id",
        )
        .bind(number_id)
        .bind(label)
        .fetch_all(&self.db().read)
        .await
        .map_err(storage)?;
        rows.iter().map(|r| get::<String>(r, "id")).collect()
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

/// How long a looked-up login or realm serves REGISTERs without the database. Nothing depends
/// on it for safety: `register` checks the credential's HA1 and the number's status under its
/// lock, a response that does not match the cached HA1 is checked against the database, and this
/// process drops entries itself on rotation, revocation and release. The limit only bounds how
/// long another engine's change takes to show in a first challenge's realm.
const LOGIN_TTL: std::time::Duration = std::time::Duration::from_secs(300);

/// Entries past which the cache starts over (a bound on memory, far above any engine's devices).
const LOGIN_CACHE_MAX: usize = 200_000;

/// Real realms that unknown users' challenges are drawn from, and how long one read serves.
const REALM_POOL_MAX: i64 = 10_000;
const REALM_POOL_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// The registrar's lookups by username (`device_login`) and by address-of-record user
/// (`realm_for`), as last read from the database.
#[derive(Default)]
pub struct LoginCache {
    logins: DashMap<String, (DeviceLogin, Instant)>,
    realms: DashMap<String, (String, Instant)>,
    realm_pool: std::sync::Mutex<Option<(Arc<[String]>, Instant)>>,
    realm_pool_reading: tokio::sync::Mutex<()>,
}

impl LoginCache {
    fn realm_pool(&self) -> Option<Arc<[String]>> {
        let held = self.realm_pool.lock().ok()?;
        let (pool, at) = held.as_ref()?;
        (at.elapsed() < REALM_POOL_TTL).then(|| pool.clone())
    }

    fn put_realm_pool(&self, pool: Arc<[String]>) {
        if let Ok(mut held) = self.realm_pool.lock() {
            *held = Some((pool, Instant::now()));
        }
    }

    fn login(&self, username: &str) -> Option<DeviceLogin> {
        let entry = self.logins.get(username)?;
        (entry.1.elapsed() < LOGIN_TTL).then(|| entry.0.clone())
    }

    fn put_login(&self, login: &DeviceLogin) {
        if self.logins.len() >= LOGIN_CACHE_MAX {
            self.logins.clear();
        }
        self.logins
            .insert(login.username.clone(), (login.clone(), Instant::now()));
    }

    fn forget_username(&self, username: &str) {
        self.logins.remove(username);
    }

    fn realm(&self, aor_user: &str) -> Option<String> {
        let entry = self.realms.get(aor_user)?;
        (entry.1.elapsed() < LOGIN_TTL).then(|| entry.0.clone())
    }

    fn put_realm(&self, aor_user: &str, realm: &str) {
        if self.realms.len() >= LOGIN_CACHE_MAX {
            self.realms.clear();
        }
        self.realms
            .insert(aor_user.to_owned(), (realm.to_owned(), Instant::now()));
    }

    /// A credential was rotated or revoked.
    pub(crate) fn forget_credential(&self, credential_id: &str) {
        self.logins
            .retain(|_, (l, _)| l.credential_id != credential_id);
        // A revoked username's realm turns into a decoy.
        self.realms.clear();
    }

    /// A number was released, with its credentials.
    pub(crate) fn forget_number(&self, number_id: &str) {
        self.logins.retain(|_, (l, _)| l.number_id != number_id);
        self.realms.clear();
    }

    /// [`Self::forget_number`] for many numbers in one pass.
    pub(crate) fn forget_numbers(&self, number_ids: &std::collections::HashSet<&str>) {
        if number_ids.is_empty() {
            return;
        }
        self.logins
            .retain(|_, (l, _)| !number_ids.contains(l.number_id.as_str()));
        self.realms.clear();
    }
}

/// Most REGISTERs committed together.
const REGISTER_GROUP_MAX: usize = 128;

type RegisterResult = Result<Vec<Registration>, RegisterStoreError>;
type PendingRegister = group_commit::Pending<RegisterBindings, RegisterResult>;

/// Group commit of REGISTERs ([`group_commit`]): those that queue while a transaction runs share
/// the next one. SQLite has one writer, so one lane; on PostgreSQL a few lanes run side by side,
/// each number always in the same lane (its REGISTERs keep their order and never wait on each
/// other's locks across lanes).
pub(crate) struct RegisterWriter {
    lanes: Vec<mpsc::UnboundedSender<PendingRegister>>,
}

/// PostgreSQL lanes: REGISTERs of different numbers commit in parallel.
const POSTGRES_REGISTER_LANES: usize = 4;

impl RegisterWriter {
    fn start(store: &SqlStore) -> RegisterWriter {
        let lanes = match store.db().backend {
            Backend::Sqlite => 1,
            Backend::Postgres => POSTGRES_REGISTER_LANES,
        };
        RegisterWriter {
            lanes: (0..lanes)
                .map(|_| {
                    group_commit::lane(
                        RegisterCommits(store.clone()),
                        std::time::Duration::ZERO,
                        REGISTER_GROUP_MAX,
                    )
                })
                .collect(),
        }
    }

    async fn register(&self, cmd: RegisterBindings) -> RegisterResult {
        // FNV-1a of the number id picks the lane.
        let hash = cmd
            .login
            .number_id
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        let lane = &self.lanes[(hash % self.lanes.len() as u64) as usize];
        let (reply, rx) = oneshot::channel();
        lane.send((cmd, reply))
            .map_err(|_| StorageError("the registration writer stopped".into()))?;
        rx.await
            .map_err(|_| StorageError("the registration writer dropped a REGISTER".into()))?
    }
}

struct RegisterCommits(SqlStore);

impl group_commit::Committer for RegisterCommits {
    type Write = RegisterBindings;
    type Output = RegisterResult;

    /// All in one transaction; a REGISTER refused (a changed credential, too many contacts)
    /// wrote nothing and gets its refusal. Should the transaction fail, each REGISTER runs
    /// again in its own, so one failure fails only itself.
    async fn commit(&self, batch: &mut Vec<PendingRegister>) {
        let store = &self.0;
        if batch.len() > 1 {
            match store.register_batch(batch).await {
                Ok(results) => {
                    for ((_, reply), r) in batch.drain(..).zip(results) {
                        let _ = reply.send(r);
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, registers = batch.len(),
                        "group commit of REGISTERs failed; writing one by one");
                }
            }
        }
        for (cmd, reply) in batch.drain(..) {
            let _ = reply.send(store.register_alone(&cmd).await);
        }
    }
}

/// The credential and number rows as `register` reads them under its lock.
struct Locked {
    credential_active: bool,
    ha1_md5: String,
    ha1_sha256: String,
    number_active: bool,
}

impl Locked {
    fn from_row(row: &AnyRow) -> Result<Locked, StorageError> {
        Ok(Locked {
            credential_active: get::<String>(row, "credential_status")? == "active",
            ha1_md5: get(row, "ha1_md5")?,
            ha1_sha256: get(row, "ha1_sha256")?,
            number_active: get::<String>(row, "number_status")? == "active",
        })
    }
}

/// A binding as read under the lock: what the answer lists, and what planning needs.
struct Read {
    registration: Registration,
    expires_at: String,
    call_id: String,
    cseq: u32,
}

fn read_binding(row: &AnyRow) -> Result<Read, StorageError> {
    let cseq: i64 = get(row, "cseq")?;
    Ok(Read {
        registration: registration_from_row(row)?,
        expires_at: get(row, "expires_at")?,
        call_id: get(row, "sip_call_id")?,
        cseq: u32::try_from(cseq).unwrap_or(u32::MAX),
    })
}

/// Apply one REGISTER inside a transaction. The common case is two statements on SQLite and
/// three on PostgreSQL: read the credential, the number and the number's bindings (on
/// PostgreSQL first locking the credential and number rows with `SELECT … FOR NO KEY UPDATE`,
/// the lock an `UPDATE` of them takes, so a rotation, revocation or release is wholly before or
/// after this; SQLite has one writer), then write the one binding. The answer's list is built
/// from what was read. Nothing is written before every check has passed, so a refusal leaves
/// the transaction as it found it (and a group commit goes on with the next REGISTER).
async fn register_in_tx(
    conn: &mut AnyConnection,
    backend: Backend,
    cmd: &RegisterBindings,
) -> RegisterResult {
    let login = &cmd.login;
    let (locked, read) = match backend {
        Backend::Sqlite => {
            let rows = sqlx::query(
                "SELECT c.status AS credential_status, c.ha1_md5, c.ha1_sha256, \
                 n.status AS number_status, r.id, r.workspace_id, r.number_id, r.credential_id, \
                 r.contact, r.source_addr, r.transport, r.user_agent, r.sip_call_id, r.cseq, \
                 r.expires_at, r.created_at, r.updated_at FROM sip_credentials c \
                 JOIN tenant_numbers n ON n.id = $2 \
                 LEFT JOIN sip_registrations r ON r.number_id = n.id WHERE c.id = $1",
            )
            .bind(&login.credential_id)
            .bind(&login.number_id)
            .fetch_all(&mut *conn)
            .await
            .map_err(storage)?;
            let Some(first) = rows.first() else {
                return Err(RegisterStoreError::CredentialChanged);
            };
            let locked = Locked::from_row(first)?;
            let mut read = Vec::with_capacity(rows.len());
            for row in &rows {
                if get::<Option<String>>(row, "id")?.is_some() {
                    read.push(read_binding(row)?);
                }
            }
            (locked, read)
        }
        Backend::Postgres => {
            let row = sqlx::query(
                "SELECT c.status AS credential_status, c.ha1_md5, c.ha1_sha256, \
                 n.status AS number_status FROM sip_credentials c \
                 JOIN tenant_numbers n ON n.id = $2 WHERE c.id = $1 FOR NO KEY UPDATE OF c, n",
            )
            .bind(&login.credential_id)
            .bind(&login.number_id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(storage)?;
            let Some(row) = row else {
                return Err(RegisterStoreError::CredentialChanged);
            };
            let locked = Locked::from_row(&row)?;
            // After the lock: this statement sees every REGISTER of the number committed before.
            let rows = sqlx::query(concat!(
                "SELECT ",
                registration_cols!(),
                " FROM sip_registrations WHERE number_id = $1"
            ))
            .bind(&login.number_id)
            .fetch_all(&mut *conn)
            .await
            .map_err(storage)?;
            let read = rows.iter().map(read_binding).collect::<Result<_, _>>()?;
            (locked, read)
        }
    };
    let ha1 = match cmd.verified_with {
        Algorithm::Md5 => &locked.ha1_md5,
        Algorithm::Sha256 => &locked.ha1_sha256,
    };
    if !locked.credential_active || ha1 != login.ha1(cmd.verified_with) {
        return Err(RegisterStoreError::CredentialChanged);
    }
    if !locked.number_active {
        return Err(RegisterStoreError::NumberNotActive);
    }
    let now = to_db(cmd.now);
    let mut any_expired = false;
    let mut live = Vec::with_capacity(read.len());
    let mut existing = Vec::with_capacity(read.len());
    for b in read {
        if b.expires_at <= now {
            any_expired = true;
            continue;
        }
        existing.push(ExistingBinding {
            contact: b.registration.contact.clone(),
            call_id: b.call_id,
            cseq: b.cseq,
        });
        live.push(b.registration);
    }
    let changes = registrar::plan(&existing, &cmd.request, &cmd.limits)?;
    if any_expired {
        sqlx::query("DELETE FROM sip_registrations WHERE number_id = $1 AND expires_at <= $2")
            .bind(&login.number_id)
            .bind(&now)
            .execute(&mut *conn)
            .await
            .map_err(storage)?;
    }
    let source = cmd.source.addr.to_string();
    let transport = transport_name(cmd.source.transport);
    for change in changes {
        match change {
            Change::Unbind { contact } => {
                sqlx::query("DELETE FROM sip_registrations WHERE number_id = $1 AND contact = $2")
                    .bind(&login.number_id)
                    .bind(&contact)
                    .execute(&mut *conn)
                    .await
                    .map_err(storage)?;
                live.retain(|r| r.contact != contact);
            }
            Change::Bind { contact, expires } => {
                let expires_at = cmd.now + chrono::Duration::seconds(i64::from(expires));
                let expires_db = to_db(expires_at);
                match live.iter_mut().find(|r| r.contact == contact) {
                    Some(known) => {
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
                        .bind(&expires_db)
                        .bind(&now)
                        .bind(&known.id)
                        .execute(&mut *conn)
                        .await
                        .map_err(storage)?;
                        known.credential_id.clone_from(&login.credential_id);
                        known.source = cmd.source.addr;
                        known.transport = cmd.source.transport;
                        known.user_agent.clone_from(&cmd.user_agent);
                        known.expires_at = expires_at;
                        known.updated_at = cmd.now;
                    }
                    None => {
                        let id = new_id();
                        sqlx::query(
                            "INSERT INTO sip_registrations (id, workspace_id, number_id, \
                             credential_id, contact, source_addr, transport, user_agent, \
                             sip_call_id, cseq, engine_id, expires_at, created_at, updated_at) \
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13)",
                        )
                        .bind(&id)
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
                        .bind(&expires_db)
                        .bind(&now)
                        .execute(&mut *conn)
                        .await
                        .map_err(storage)?;
                        live.push(Registration {
                            id,
                            workspace_id: login.workspace_id.clone(),
                            number_id: login.number_id.clone(),
                            credential_id: login.credential_id.clone(),
                            contact,
                            source: cmd.source.addr,
                            transport: cmd.source.transport,
                            user_agent: cmd.user_agent.clone(),
                            expires_at,
                            updated_at: cmd.now,
                        });
                    }
                }
            }
        }
    }
    live.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(live)
}

impl SqlStore {
    pub(crate) fn logins(&self) -> &LoginCache {
        &self.login_cache
    }

    fn register_writer(&self) -> &RegisterWriter {
        self.register_writer
            .get_or_init(|| RegisterWriter::start(self))
    }

    /// REGISTERs in one transaction, each answered in order. `Err`: the transaction failed
    /// (nothing of it committed).
    async fn register_batch(
        &self,
        batch: &[PendingRegister],
    ) -> Result<Vec<RegisterResult>, StorageError> {
        let backend = self.db().backend;
        let mut tx = self.db().begin_write().await.map_err(storage)?;
        let mut results = Vec::with_capacity(batch.len());
        for (cmd, _) in batch {
            match register_in_tx(&mut tx, backend, cmd).await {
                Err(RegisterStoreError::Storage(e)) => return Err(e),
                r => results.push(r),
            }
        }
        tx.commit().await.map_err(storage)?;
        Ok(results)
    }

    /// One REGISTER in its own transaction; a PostgreSQL deadlock victim (a release locking
    /// the number and its credentials the other way round) runs again.
    async fn register_alone(&self, cmd: &RegisterBindings) -> RegisterResult {
        let mut attempt = 1;
        loop {
            let r = async {
                let mut tx = self.db().begin_write().await.map_err(storage)?;
                let r = register_in_tx(&mut tx, self.db().backend, cmd).await;
                if r.is_ok() {
                    tx.commit().await.map_err(storage)?;
                } else {
                    tx.rollback().await.map_err(storage)?;
                }
                r
            }
            .await;
            match r {
                Err(RegisterStoreError::Storage(e))
                    if attempt < REGISTER_ATTEMPTS && is_transient(&e) =>
                {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(5 * attempt)).await;
                }
                other => return other,
            }
        }
    }
}

/// Attempts for a REGISTER that keeps losing deadlocks before it reports a storage failure.
const REGISTER_ATTEMPTS: u64 = 3;
