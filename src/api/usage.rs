//! `GET /v1/usage` and `GET /v1/calls/stats`: spend and call counts over time, from the ledger
//! and the call records ([`crate::usage`]).

use std::collections::BTreeMap;

use axum::Extension;
use axum::extract::State;
use chrono::{DateTime, Duration, NaiveDate, NaiveTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ErrorEnvelope};
use super::extract::ApiQuery;
use super::middleware::Workspace;
use crate::time::to_api;
use crate::usage::{Bucket, CallSum, LedgerSum, SpendKind};

/// The longest range one usage report covers.
const MAX_RANGE_DAYS: i64 = 366;

fn invalid_query(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("request.invalid_query", message)
}

/// `2027-02-01` (midnight UTC) or a full RFC 3339 time.
fn parse_time(raw: &str, name: &str) -> Result<DateTime<Utc>, ApiError> {
    if let Ok(t) = crate::time::from_db(raw) {
        return Ok(t);
    }
    NaiveDate::parse_from_str(raw, "%Y-%m-%d")
        .map(|d| Utc.from_utc_datetime(&d.and_time(NaiveTime::MIN)))
        .map_err(|_| {
            invalid_query(format!(
                "{name} must be a date (2027-02-01) or an RFC 3339 time"
            ))
        })
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Start, inclusive: a date (`2027-02-01`, midnight UTC) or an RFC 3339 time. Default: the
    /// start of the current month.
    pub from: Option<String>,
    /// End, exclusive, like `from`. Default: now. At most 366 days after `from`.
    pub to: Option<String>,
    /// `day` (default) or `month`.
    pub bucket: Option<String>,
}

/// Money spent, by kind, in the wallet's minor units.
#[derive(Debug, Default, Clone, Serialize, ToSchema)]
pub struct SpendView {
    pub number_rental: i64,
    pub inbound_calls: i64,
    pub outbound_calls: i64,
    /// Every debit of the period: the sum of the ledger's negative rows, as a positive amount.
    pub total: i64,
}

#[derive(Debug, Default, Clone, Serialize, ToSchema)]
pub struct CallCountsView {
    pub inbound: i64,
    pub outbound: i64,
    pub total: i64,
    pub answered: i64,
    pub failed: i64,
}

#[derive(Debug, Default, Clone, Serialize, ToSchema)]
pub struct UsageFigures {
    pub spend_minor: SpendView,
    /// Top-ups and credits.
    pub credits_minor: i64,
    /// Calls by their start time (B legs of `dial` are calls of their own).
    pub calls: CallCountsView,
    /// Billable seconds of answered calls.
    pub duration_seconds: i64,
    /// `duration_seconds / 60`, to two decimals.
    pub minutes: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageBucketView {
    pub start: String,
    pub end: String,
    #[serde(flatten)]
    pub figures: UsageFigures,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageView {
    pub from: String,
    pub to: String,
    #[schema(example = "day")]
    pub bucket: String,
    pub currency: String,
    /// The whole range: spend equals the ledger's sum for it, to the minor unit.
    pub totals: UsageFigures,
    /// Every bucket of the range, oldest first, also those with nothing in them.
    pub buckets: Vec<UsageBucketView>,
}

fn minutes(seconds: i64) -> f64 {
    (seconds as f64 / 60.0 * 100.0).round() / 100.0
}

impl UsageFigures {
    fn add_ledger(&mut self, s: &LedgerSum) {
        self.credits_minor += s.credited_minor;
        self.spend_minor.total += s.debited_minor;
        match s.spend {
            Some(SpendKind::NumberRental) => self.spend_minor.number_rental += s.debited_minor,
            Some(SpendKind::InboundCalls) => self.spend_minor.inbound_calls += s.debited_minor,
            Some(SpendKind::OutboundCalls) => self.spend_minor.outbound_calls += s.debited_minor,
            Some(SpendKind::Other) | None => {}
        }
    }

    fn add_calls(&mut self, c: &CallSum) {
        if c.inbound {
            self.calls.inbound += c.calls;
        } else {
            self.calls.outbound += c.calls;
        }
        self.calls.total += c.calls;
        self.calls.answered += c.answered;
        self.calls.failed += c.failed;
        self.duration_seconds += c.duration_seconds;
        self.minutes = minutes(self.duration_seconds);
    }
}

/// The buckets of `[from, to)`, each clipped to the range, keyed as the stored timestamps are.
fn bucket_range(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    bucket: Bucket,
) -> Vec<(String, DateTime<Utc>, DateTime<Utc>)> {
    let mut out = Vec::new();
    let mut start = bucket.start_of(from);
    while start < to {
        let next = bucket.next(start);
        let (a, b) = (start.max(from), next.min(to));
        if a < b {
            out.push((bucket.key(start), a, b));
        }
        start = next;
    }
    out
}

/// The range's figures in total and per bucket key.
async fn figures(
    state: &AppState,
    ws: &Workspace,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    bucket: Bucket,
) -> Result<(UsageFigures, BTreeMap<String, UsageFigures>), ApiError> {
    let ledger = state
        .store
        .ledger_sums(&ws.id, from, to, bucket)
        .await
        .map_err(ApiError::internal)?;
    let calls = state
        .store
        .call_sums(&ws.id, from, to, bucket)
        .await
        .map_err(ApiError::internal)?;
    let mut by_key: BTreeMap<String, UsageFigures> = BTreeMap::new();
    let mut totals = UsageFigures::default();
    for s in &ledger {
        totals.add_ledger(s);
        by_key.entry(s.bucket.clone()).or_default().add_ledger(s);
    }
    for c in &calls {
        totals.add_calls(c);
        by_key.entry(c.bucket.clone()).or_default().add_calls(c);
    }
    Ok((totals, by_key))
}

async fn wallet_currency(state: &AppState, ws: &Workspace) -> Result<String, ApiError> {
    Ok(state
        .store
        .get_wallet(&ws.id)
        .await
        .map_err(ApiError::internal)?
        .map(|w| w.currency)
        .unwrap_or_else(|| "KES".to_owned()))
}

/// Spend by kind, call counts and minutes per day or month. Spend is read from the ledger, so
/// the totals equal the ledger's sum over the range to the minor unit; calls count by their start.
#[utoipa::path(get, path = "/v1/usage", tag = "wallet", params(UsageQuery),
    responses(
        (status = 200, body = UsageView),
        (status = 400, body = ErrorEnvelope,
            description = "`request.invalid_query`: a bad time, `from` after `to`, a range over 366 days, or an unknown bucket"),
        (status = 401, body = ErrorEnvelope)))]
pub async fn usage(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> Result<axum::Json<UsageView>, ApiError> {
    let now = state.clock.now();
    let bucket = match q.bucket.as_deref() {
        None => Bucket::Day,
        Some(b) => match Bucket::parse(b) {
            Some(b @ (Bucket::Day | Bucket::Month)) => b,
            _ => return Err(invalid_query("bucket must be day or month")),
        },
    };
    let from = match &q.from {
        Some(f) => parse_time(f, "from")?,
        None => Bucket::Month.start_of(now),
    };
    let to = match &q.to {
        Some(t) => parse_time(t, "to")?,
        None => now,
    };
    if from > to {
        return Err(invalid_query("from must not be after to"));
    }
    if to - from > Duration::days(MAX_RANGE_DAYS) {
        return Err(invalid_query(format!(
            "the range may cover at most {MAX_RANGE_DAYS} days"
        )));
    }
    let (totals, mut by_key) = figures(&state, &ws, from, to, bucket).await?;
    let buckets = bucket_range(from, to, bucket)
        .into_iter()
        .map(|(key, start, end)| UsageBucketView {
            start: to_api(start),
            end: to_api(end),
            figures: by_key.remove(&key).unwrap_or_default(),
        })
        .collect();
    Ok(axum::Json(UsageView {
        from: to_api(from),
        to: to_api(to),
        bucket: bucket.as_str().to_owned(),
        currency: wallet_currency(&state, &ws).await?,
        totals,
        buckets,
    }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatsQuery {
    /// `today` (default: since midnight UTC), `7d` (the last 7 days) or `month` (since the 1st).
    pub since: Option<String>,
    /// `hour` or `day`; default `hour` for `today`, `day` otherwise.
    pub bucket: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StatsPoint {
    pub start: String,
    pub total: i64,
    pub answered: i64,
    pub failed: i64,
    pub minutes: f64,
    /// What the calls of this bucket were charged (by charge time).
    pub spend_minor: i64,
}

/// Call statistics in the dashboard SDK's shape.
#[derive(Debug, Serialize, ToSchema)]
pub struct CallStatsView {
    pub since: String,
    #[schema(example = "hour")]
    pub bucket: String,
    pub total: i64,
    pub answered: i64,
    pub failed: i64,
    pub minutes_total: f64,
    /// Call charges (inbound and outbound) from the ledger.
    pub spend_minor: i64,
    pub currency: String,
    pub series: Vec<StatsPoint>,
}

/// Calls since today, the last 7 days or this month: counts, minutes, spend, and a series.
#[utoipa::path(get, path = "/v1/calls/stats", tag = "calls", params(StatsQuery),
    responses(
        (status = 200, body = CallStatsView),
        (status = 400, body = ErrorEnvelope,
            description = "`request.invalid_query`: an unknown `since` or `bucket`"),
        (status = 401, body = ErrorEnvelope)))]
pub async fn call_stats(
    State(state): State<AppState>,
    Extension(ws): Extension<Workspace>,
    ApiQuery(q): ApiQuery<StatsQuery>,
) -> Result<axum::Json<CallStatsView>, ApiError> {
    let now = state.clock.now();
    let (from, default_bucket) = match q.since.as_deref().unwrap_or("today") {
        "today" => (Bucket::Day.start_of(now), Bucket::Hour),
        "7d" => (now - Duration::days(7), Bucket::Day),
        "month" => (Bucket::Month.start_of(now), Bucket::Day),
        _ => return Err(invalid_query("since must be today, 7d or month")),
    };
    let bucket = match q.bucket.as_deref() {
        None => default_bucket,
        Some(b) => match Bucket::parse(b) {
            Some(b @ (Bucket::Hour | Bucket::Day)) => b,
            _ => return Err(invalid_query("bucket must be hour or day")),
        },
    };
    let (totals, mut by_key) = figures(&state, &ws, from, now, bucket).await?;
    let call_spend = |f: &UsageFigures| f.spend_minor.inbound_calls + f.spend_minor.outbound_calls;
    let series: Vec<StatsPoint> = bucket_range(from, now, bucket)
        .into_iter()
        .map(|(key, start, _)| {
            let f = by_key.remove(&key).unwrap_or_default();
            StatsPoint {
                start: to_api(start),
                total: f.calls.total,
                answered: f.calls.answered,
                failed: f.calls.failed,
                minutes: f.minutes,
                spend_minor: call_spend(&f),
            }
        })
        .collect();
    Ok(axum::Json(CallStatsView {
        since: to_api(from),
        bucket: bucket.as_str().to_owned(),
        total: totals.calls.total,
        answered: totals.calls.answered,
        failed: totals.calls.failed,
        minutes_total: totals.minutes,
        spend_minor: call_spend(&totals),
        currency: wallet_currency(&state, &ws).await?,
        series,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_cut_into_clipped_buckets() {
        let from = Utc.with_ymd_and_hms(2027, 1, 30, 12, 0, 0).unwrap();
        let to = Utc.with_ymd_and_hms(2027, 2, 1, 6, 0, 0).unwrap();
        let days = bucket_range(from, to, Bucket::Day);
        let keys: Vec<&str> = days.iter().map(|(k, _, _)| k.as_str()).collect();
        assert_eq!(keys, ["2027-01-30", "2027-01-31", "2027-02-01"]);
        assert_eq!(days[0].1, from);
        assert_eq!(days[2].2, to);
        let months = bucket_range(from, to, Bucket::Month);
        assert_eq!(months.len(), 2);
        assert!(bucket_range(from, from, Bucket::Day).is_empty());
        assert_eq!(minutes(90), 1.5);
    }
}
