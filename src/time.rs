//! Timestamps: stored as fixed-width RFC 3339 UTC text (so text order is time order on both
//! backends), shown in the API to the second, as the guide does.

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};

/// `2026-06-27T12:00:00.123456Z`. Written field by field: every call write stores several of
/// these, and parsing a strftime pattern each time showed in the profile of the calls benchmark.
pub fn to_db(t: DateTime<Utc>) -> String {
    use std::fmt::Write;
    if !(0..=9999).contains(&t.year()) {
        // Not a time this service makes; chrono knows how to write it (with a sign).
        return t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    }
    // chrono keeps a leap second as second 59 with 1_000_000_000 or more nanoseconds.
    let nanos = t.nanosecond();
    let (second, nanos) = if nanos >= 1_000_000_000 {
        (t.second() + 1, nanos - 1_000_000_000)
    } else {
        (t.second(), nanos)
    };
    let mut s = String::with_capacity(27);
    let _ = write!(
        s,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        second,
        nanos / 1_000
    );
    s
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    #[test]
    fn to_db_writes_what_the_strftime_pattern_wrote() {
        let at = |y, mo, d, h, mi, s, nanos| {
            NaiveDate::from_ymd_opt(y, mo, d)
                .and_then(|day| day.and_hms_nano_opt(h, mi, s, nanos))
                .map(|t| t.and_utc())
                .unwrap_or_else(|| panic!("bad test time"))
        };
        for t in [
            at(2026, 11, 29, 4, 5, 6, 7_891_234),
            at(2026, 1, 1, 0, 0, 0, 0),
            at(1999, 12, 31, 23, 59, 59, 999_999_999),
            at(2016, 12, 31, 23, 59, 59, 1_500_000_000),
            at(10, 2, 3, 4, 5, 6, 1_000),
            at(10_000, 1, 1, 0, 0, 0, 0),
            at(-1, 1, 1, 0, 0, 0, 0),
            Utc::now(),
        ] {
            assert_eq!(
                to_db(t),
                t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
                "{t:?}"
            );
        }
        let t = at(2026, 11, 29, 4, 5, 6, 7_891_234);
        assert_eq!(
            from_db(&to_db(t)).ok(),
            Some(at(2026, 11, 29, 4, 5, 6, 7_891_000))
        );
    }
}
