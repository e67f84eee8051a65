//! Usage reports read from the ledger and the call records (DESIGN §5): spend by kind, call counts
//! and minutes, per hour, day or month. Spend comes from the ledger only, so a report's totals are
//! the ledger's to the minor unit.
//!
//! Timestamps are stored as fixed-width RFC 3339 UTC text, so a bucket is a prefix of it
//! (`2027-02-28T10` an hour, `2027-02-28` a day, `2027-02` a month) and both backends group by
//! the same `substr`.

use chrono::{DateTime, Datelike, Duration, Months, NaiveTime, TimeZone, Timelike, Utc};
use sautikit_actors::store::StorageError;

use crate::store::{SqlStore, get, storage};
use crate::time::to_db;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    Hour,
    Day,
    Month,
}

impl Bucket {
    pub fn parse(s: &str) -> Option<Bucket> {
        match s {
            "hour" => Some(Bucket::Hour),
            "day" => Some(Bucket::Day),
            "month" => Some(Bucket::Month),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Bucket::Hour => "hour",
            Bucket::Day => "day",
            Bucket::Month => "month",
        }
    }

    /// Characters of a stored timestamp that name this bucket.
    fn prefix_len(self) -> usize {
        match self {
            Bucket::Hour => 13,
            Bucket::Day => 10,
            Bucket::Month => 7,
        }
    }

    /// The start of the bucket holding `t`.
    pub fn start_of(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let day = Utc.from_utc_datetime(&t.date_naive().and_time(NaiveTime::MIN));
        match self {
            Bucket::Hour => day + Duration::hours(i64::from(t.hour())),
            Bucket::Day => day,
            Bucket::Month => day - Duration::days(i64::from(t.day0())),
        }
    }

    pub fn next(self, start: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Bucket::Hour => start + Duration::hours(1),
            Bucket::Day => start + Duration::days(1),
            Bucket::Month => start
                .checked_add_months(Months::new(1))
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        }
    }

    /// The key a stored timestamp of this bucket starts with.
    pub fn key(self, start: DateTime<Utc>) -> String {
        let mut s = to_db(start);
        s.truncate(self.prefix_len());
        s
    }
}

/// What kind of spend a debit was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpendKind {
    NumberRental,
    InboundCalls,
    OutboundCalls,
    /// A debit of a kind this report does not break down (counted in the total only).
    Other,
}

/// Ledger sums for one bucket and kind.
#[derive(Debug, Clone)]
pub struct LedgerSum {
    pub bucket: String,
    pub spend: Option<SpendKind>,
    /// Debits as a positive amount; credits in `credited_minor`.
    pub debited_minor: i64,
    pub credited_minor: i64,
}

/// Call counts for one bucket and direction.
#[derive(Debug, Clone)]
pub struct CallSum {
    pub bucket: String,
    pub inbound: bool,
    pub calls: i64,
    pub answered: i64,
    pub failed: i64,
    pub duration_seconds: i64,
}

impl SqlStore {
    /// Runs `sql`, whose `$1`, `$2`, `$3` are a workspace id and a time range.
    async fn workspace_range(
        &self,
        sql: String,
        workspace_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<sqlx::any::AnyRow>, StorageError> {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(workspace_id)
            .bind(to_db(from))
            .bind(to_db(to))
            .fetch_all(&self.db().read)
            .await
            .map_err(storage)
    }

    /// Ledger rows of a workspace created in `[from, to)`, summed per bucket and kind.
    pub async fn ledger_sums(
        &self,
        workspace_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        bucket: Bucket,
    ) -> Result<Vec<LedgerSum>, StorageError> {
        let sql = format!(
            "SELECT substr(l.created_at, 1, {len}) AS b, l.kind, c.direction, \
               CAST(SUM(CASE WHEN l.amount_minor < 0 THEN -l.amount_minor ELSE 0 END) AS BIGINT) \
                 AS debited, \
               CAST(SUM(CASE WHEN l.amount_minor > 0 THEN l.amount_minor ELSE 0 END) AS BIGINT) \
                 AS credited \
             FROM ledger_entries l \
             LEFT JOIN calls c ON l.kind = 'call_charge' AND c.id = l.reference \
             WHERE l.workspace_id = $1 AND l.created_at >= $2 AND l.created_at < $3 \
             GROUP BY substr(l.created_at, 1, {len}), l.kind, c.direction",
            len = bucket.prefix_len()
        );
        self.workspace_range(sql, workspace_id, from, to)
            .await?
            .iter()
            .map(|r| {
                let kind: String = get(r, "kind")?;
                let direction: Option<String> = get(r, "direction")?;
                let spend = match (kind.as_str(), direction.as_deref()) {
                    ("number_rental", _) => Some(SpendKind::NumberRental),
                    ("call_charge", Some("inbound")) => Some(SpendKind::InboundCalls),
                    ("call_charge", Some("outbound")) => Some(SpendKind::OutboundCalls),
                    ("top_up" | "credit", _) => None,
                    _ => Some(SpendKind::Other),
                };
                Ok(LedgerSum {
                    bucket: get(r, "b")?,
                    spend,
                    debited_minor: get(r, "debited")?,
                    credited_minor: get(r, "credited")?,
                })
            })
            .collect()
    }

    /// Calls of a workspace started in `[from, to)`, counted per bucket and direction.
    pub async fn call_sums(
        &self,
        workspace_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        bucket: Bucket,
    ) -> Result<Vec<CallSum>, StorageError> {
        let sql = format!(
            "SELECT substr(started_at, 1, {len}) AS b, direction, \
               CAST(COUNT(*) AS BIGINT) AS calls, \
               CAST(SUM(CASE WHEN answered_at IS NOT NULL THEN 1 ELSE 0 END) AS BIGINT) \
                 AS answered, \
               CAST(SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) AS BIGINT) AS failed, \
               CAST(SUM(duration_seconds) AS BIGINT) AS secs \
             FROM calls WHERE workspace_id = $1 AND started_at >= $2 AND started_at < $3 \
             GROUP BY substr(started_at, 1, {len}), direction",
            len = bucket.prefix_len()
        );
        self.workspace_range(sql, workspace_id, from, to)
            .await?
            .iter()
            .map(|r| {
                let direction: String = get(r, "direction")?;
                Ok(CallSum {
                    bucket: get(r, "b")?,
                    inbound: direction == "inbound",
                    calls: get(r, "calls")?,
                    answered: get(r, "answered")?,
                    failed: get(r, "failed")?,
                    duration_seconds: get(r, "secs")?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_start_where_their_keys_do() {
        let t = Utc.with_ymd_and_hms(2027, 2, 28, 10, 42, 7).unwrap();
        assert_eq!(
            Bucket::Hour.start_of(t),
            Utc.with_ymd_and_hms(2027, 2, 28, 10, 0, 0).unwrap()
        );
        assert_eq!(Bucket::Day.key(Bucket::Day.start_of(t)), "2027-02-28");
        let m = Bucket::Month.start_of(t);
        assert_eq!(m, Utc.with_ymd_and_hms(2027, 2, 1, 0, 0, 0).unwrap());
        assert_eq!(Bucket::Month.key(m), "2027-02");
        assert_eq!(
            Bucket::Month.next(m),
            Utc.with_ymd_and_hms(2027, 3, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(Bucket::Hour.key(Bucket::Hour.start_of(t)), "2027-02-28T10");
        assert_eq!(Bucket::parse("week"), None);
    }
}
