//! Timestamps: stored as fixed-width RFC 3339 UTC text (so text order is time order on both
//! backends), shown in the API to the second, as the guide does.

use chrono::{DateTime, SecondsFormat, Utc};

pub fn to_db(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

pub fn from_db(s: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc))
}

pub fn to_api(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}
