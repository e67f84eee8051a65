//! Every money rule in one place (DESIGN §4): amounts are `i64` minor units with a currency code,
//! never floats; balances never go below zero; calls are rated per second and rounded up.

use chrono::{DateTime, Months, Utc};
use thiserror::Error;

/// Currencies a wallet or price may be held in. Minor units are the currency's smallest unit.
pub const SUPPORTED_CURRENCIES: &[&str] = &[
    "KES", "UGX", "TZS", "RWF", "NGN", "GHS", "ZAR", "USD", "EUR", "GBP",
];

/// The largest single credit or top-up we accept (KES 10,000,000.00). Larger amounts are almost
/// certainly a unit mistake (major vs minor) and are refused rather than silently applied.
pub const MAX_CREDIT_MINOR: i64 = 1_000_000_000;

/// The largest balance a wallet may hold. Far from `i64::MAX`, so sums never overflow.
pub const MAX_BALANCE_MINOR: i64 = 1_000_000_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MoneyError {
    #[error("amount_minor must be a positive whole number of minor units")]
    NotPositive,
    #[error("amount_minor must be at most {MAX_CREDIT_MINOR}")]
    TooLarge,
    #[error("currency {0:?} is not supported")]
    UnsupportedCurrency(String),
}

/// A validated ISO 4217 code from [`SUPPORTED_CURRENCIES`].
pub fn parse_currency(code: &str) -> Result<&'static str, MoneyError> {
    SUPPORTED_CURRENCIES
        .iter()
        .copied()
        .find(|c| *c == code)
        .ok_or_else(|| MoneyError::UnsupportedCurrency(code.to_owned()))
}

/// A credit or top-up amount: strictly positive and below [`MAX_CREDIT_MINOR`].
pub fn validate_credit(amount_minor: i64) -> Result<i64, MoneyError> {
    if amount_minor <= 0 {
        Err(MoneyError::NotPositive)
    } else if amount_minor > MAX_CREDIT_MINOR {
        Err(MoneyError::TooLarge)
    } else {
        Ok(amount_minor)
    }
}

/// `ceil(duration_seconds × rate_per_min_minor / 60)`: an answered call's cost.
pub fn call_cost_minor(duration_seconds: i64, rate_per_min_minor: i64) -> i64 {
    if duration_seconds <= 0 || rate_per_min_minor <= 0 {
        return 0;
    }
    let product = i128::from(duration_seconds) * i128::from(rate_per_min_minor);
    let cost = (product + 59) / 60;
    i64::try_from(cost).unwrap_or(i64::MAX)
}

/// The whole seconds of talk `balance_minor` pays for at `rate_per_min_minor` (the cost of that
/// many seconds, rounded up as billing rounds it, never exceeds the balance); `None` when the
/// rate is free. An outbound leg needs at least 60 of them to start (DESIGN §4).
pub fn paid_seconds(balance_minor: i64, rate_per_min_minor: i64) -> Option<i64> {
    if rate_per_min_minor <= 0 {
        return None;
    }
    let secs = i128::from(balance_minor.max(0)) * 60 / i128::from(rate_per_min_minor);
    Some(i64::try_from(secs).unwrap_or(i64::MAX))
}

/// A prepaid leg reserves its wallet's balance this many seconds of talk at a time; the first
/// slice is also what it needs to start (DESIGN §4: one minute).
pub const PREPAID_SLICE_SECONDS: i64 = 60;

/// A live leg asks for its next slice this long before its paid time runs out, so a slow
/// database never cuts a call that could pay.
pub const PREPAID_EXTEND_AHEAD_SECONDS: i64 = 10;

/// The cost of one slice at `rate_per_min_minor` (0 when the rate is free: nothing to reserve).
pub fn prepaid_slice_minor(rate_per_min_minor: i64) -> i64 {
    call_cost_minor(PREPAID_SLICE_SECONDS, rate_per_min_minor)
}

/// How much a reservation takes from what a wallet still has free (`available_minor`: balance
/// less every open reservation of the wallet): up to `want_minor`, and only if that is at least
/// `at_least_minor` (a whole slice to start, anything to extend). `None`: nothing is taken.
pub fn reservation_take(want_minor: i64, at_least_minor: i64, available_minor: i64) -> Option<i64> {
    let take = want_minor.min(available_minor.max(0));
    (take > 0 && take >= at_least_minor).then_some(take)
}

/// What a call that held a reservation of `reserved_minor` is charged for a rated cost: never
/// more than it reserved, because it was promised exactly that much talk (a cut a few ms past
/// the paid time rounds up to one more second, which is not the customer's to pay).
pub fn reserved_charge_minor(rated_minor: i64, reserved_minor: Option<i64>) -> i64 {
    match reserved_minor {
        Some(r) => rated_minor.min(r.max(0)),
        None => rated_minor,
    }
}

/// Billable seconds of an answered call: whole seconds from answer to end, rounded up (a call
/// answered for 10.2 s bills 11 s). Never negative, whatever the clocks say.
pub fn billable_seconds(answered_at: DateTime<Utc>, ended_at: DateTime<Utc>) -> i64 {
    let micros = (ended_at - answered_at)
        .num_microseconds()
        .unwrap_or(i64::MAX);
    if micros <= 0 {
        return 0;
    }
    (micros + 999_999) / 1_000_000
}

/// What a debit of `cost_minor` can actually take from a wallet holding `balance_minor`: a
/// balance never goes below zero, so a call that outlived its balance is charged what is left
/// (the rest is recorded as uncollected, not owed).
pub fn collectable_minor(cost_minor: i64, balance_minor: i64) -> i64 {
    cost_minor.max(0).min(balance_minor.max(0))
}

/// The start of rental period `period` of a number claimed at `anchor`: `period` calendar months
/// later, on the claim's day of the month, clamped to the month's end (claimed Jan 31: Feb 28 or
/// 29, then Mar 31). Always counted from the claim, never from the previous renewal, so a short
/// month does not move every later renewal. Period 0 is the month debited at claim.
pub fn rental_period_start(anchor: DateTime<Utc>, period: i64) -> DateTime<Utc> {
    let months = u32::try_from(period.max(0)).unwrap_or(u32::MAX);
    anchor
        .checked_add_months(Months::new(months))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The period that a number claimed at `anchor`, with periods up to `paid` paid, renews with
/// when it is paid at `now`: the next one, unless that has already ended (a suspended number
/// was not usable then, so it is not charged for it): then the one running at `now`.
pub fn period_to_pay(anchor: DateTime<Utc>, paid: i64, now: DateTime<Utc>) -> i64 {
    let mut period = paid.saturating_add(1);
    while rental_period_start(anchor, period.saturating_add(1)) <= now && period < paid + 1200 {
        period += 1;
    }
    period
}

/// What a rental that fell due, or a suspension, pays or owes: the price of one month.
pub fn can_pay(balance_minor: i64, price_minor: i64) -> bool {
    balance_minor >= price_minor.max(0)
}

/// `12345` → `"123.45"`, for messages meant for people.
pub fn format_minor(amount_minor: i64) -> String {
    let sign = if amount_minor < 0 { "-" } else { "" };
    let abs = amount_minor.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

#[cfg(test)]
mod tests {
    #[test]
    fn paid_time_never_costs_more_than_the_balance() {
        assert_eq!(super::paid_seconds(450, 300), Some(90));
        assert_eq!(super::paid_seconds(0, 300), Some(0));
        assert_eq!(super::paid_seconds(100, 0), None);
        for balance in 0..2_000 {
            for rate in [1, 7, 300, 499, 1_000] {
                let secs = super::paid_seconds(balance, rate).unwrap_or(0);
                assert!(super::call_cost_minor(secs, rate) <= balance);
                assert!(super::call_cost_minor(secs + 1, rate) > balance || rate == 0);
            }
        }
    }

    #[test]
    fn reservations_take_a_slice_or_what_is_left() {
        use super::{prepaid_slice_minor, reservation_take, reserved_charge_minor};
        assert_eq!(prepaid_slice_minor(300), 300);
        assert_eq!(prepaid_slice_minor(0), 0);
        // To start: a whole slice or nothing.
        assert_eq!(reservation_take(300, 300, 450), Some(300));
        assert_eq!(reservation_take(300, 300, 299), None);
        // To extend: a slice, or whatever is left, or nothing when nothing is.
        assert_eq!(reservation_take(300, 1, 150), Some(150));
        assert_eq!(reservation_take(300, 1, 0), None);
        assert_eq!(reservation_take(300, 1, -20), None);
        assert_eq!(reserved_charge_minor(455, Some(450)), 450);
        assert_eq!(reserved_charge_minor(100, Some(450)), 100);
        assert_eq!(reserved_charge_minor(455, None), 455);
    }

    use super::*;
    use chrono::TimeZone;

    #[test]
    fn call_cost_rounds_up_per_second() {
        assert_eq!(call_cost_minor(0, 300), 0);
        assert_eq!(call_cost_minor(1, 300), 5);
        assert_eq!(call_cost_minor(61, 300), 305);
        assert_eq!(call_cost_minor(1, 7), 1); // 7/60 rounds up to one minor unit
        assert_eq!(call_cost_minor(60, 7), 7);
        assert_eq!(call_cost_minor(10, 0), 0);
    }

    #[test]
    fn billable_seconds_round_up() {
        let t0 = Utc.with_ymd_and_hms(2026, 6, 27, 12, 0, 0).unwrap();
        assert_eq!(billable_seconds(t0, t0), 0);
        assert_eq!(
            billable_seconds(t0, t0 + chrono::Duration::milliseconds(1)),
            1
        );
        assert_eq!(billable_seconds(t0, t0 + chrono::Duration::seconds(61)), 61);
        assert_eq!(
            billable_seconds(t0, t0 + chrono::Duration::milliseconds(61_001)),
            62
        );
        assert_eq!(billable_seconds(t0 + chrono::Duration::seconds(5), t0), 0);
    }

    #[test]
    fn collectable_never_exceeds_the_balance() {
        assert_eq!(collectable_minor(305, 1_000), 305);
        assert_eq!(collectable_minor(305, 100), 100);
        assert_eq!(collectable_minor(305, 0), 0);
        assert_eq!(collectable_minor(0, 100), 0);
        assert_eq!(collectable_minor(-5, 100), 0);
    }

    #[test]
    fn credits_are_bounded() {
        assert_eq!(validate_credit(0), Err(MoneyError::NotPositive));
        assert_eq!(validate_credit(-5), Err(MoneyError::NotPositive));
        assert_eq!(
            validate_credit(MAX_CREDIT_MINOR + 1),
            Err(MoneyError::TooLarge)
        );
        assert_eq!(validate_credit(100), Ok(100));
    }

    #[test]
    fn currencies_are_checked() {
        assert_eq!(parse_currency("KES"), Ok("KES"));
        assert!(parse_currency("kes").is_err());
        assert!(parse_currency("XXX").is_err());
    }

    #[test]
    fn rental_periods_are_anchored_to_the_claim_day() {
        let at = |y, m, d| Utc.with_ymd_and_hms(y, m, d, 10, 0, 0).unwrap();
        let jan31 = at(2027, 1, 31);
        assert_eq!(rental_period_start(jan31, 0), jan31);
        assert_eq!(rental_period_start(jan31, 1), at(2027, 2, 28));
        assert_eq!(rental_period_start(jan31, 2), at(2027, 3, 31));
        assert_eq!(rental_period_start(jan31, 3), at(2027, 4, 30));
        // A leap year's February.
        assert_eq!(rental_period_start(at(2028, 1, 31), 1), at(2028, 2, 29));
        assert_eq!(rental_period_start(at(2026, 6, 27), 1), at(2026, 7, 27));
    }

    #[test]
    fn a_late_payment_pays_the_period_running_now() {
        let at = |y, m, d| Utc.with_ymd_and_hms(y, m, d, 10, 0, 0).unwrap();
        let jan31 = at(2027, 1, 31);
        // Due Feb 28, paid the same day: period 1.
        assert_eq!(period_to_pay(jan31, 0, at(2027, 2, 28)), 1);
        // Paid on Mar 20, still inside period 1 (Feb 28 .. Mar 31).
        assert_eq!(period_to_pay(jan31, 0, at(2027, 3, 20)), 1);
        // Paid on Apr 2: period 1 has ended unused; period 2 (Mar 31 .. Apr 30) is paid.
        assert_eq!(period_to_pay(jan31, 0, at(2027, 4, 2)), 2);
        assert!(can_pay(100, 100));
        assert!(!can_pay(99, 100));
    }

    #[test]
    fn formats_minor_units() {
        assert_eq!(format_minor(100000), "1000.00");
        assert_eq!(format_minor(5), "0.05");
        assert_eq!(format_minor(-250), "-2.50");
    }
}
