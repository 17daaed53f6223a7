//! The visitors counter of API.md: adds one to `visitors:YYYY-MM-DD` (the
//! UTC date) and says the count.
//!
//! Contract (the same bytes as `visitors.lua`): `200`, `text/plain;
//! charset=utf-8`, the count and `\n`; if the increment fails, `500` and
//! `error incrementing: ERR\n`. Like the Lua original it reads the count
//! back after the increment, so a caller who may write but not read gets
//! `nil\n` (Lua's `tostring(nil)`).

use std::time::{SystemTime, UNIX_EPOCH};

use kvdb_guest::{Handler, Request, Response};

struct Visitors;

impl Handler for Visitors {
    fn handle(_: Request) -> Response {
        let key = format!("visitors:{}", utc_date(SystemTime::now()));
        if let Err(e) = kvdb_guest::incr(&key, 1) {
            return Response::text(format!("error incrementing: {e}\n")).with_status(500);
        }
        let value = match kvdb_guest::get(&key) {
            Ok(Some(v)) => v.to_string(),
            Ok(None) | Err(_) => "nil".to_owned(),
        };
        Response::text(format!("{value}\n"))
    }
}

kvdb_guest::export!(Visitors);

/// `YYYY-MM-DD` of `t` in UTC (the WASI wall clock has no time zone).
fn utc_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days(i64::try_from(secs / 86_400).unwrap_or(0));
    format!("{y:04}-{m:02}-{d:02}")
}

/// Year, month and day of the `days`th day after 1970-01-01 in the
/// proleptic Gregorian calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365], from March 1st
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::{civil_from_days, utc_date};
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn civil_dates_match_the_calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_818), (2026, 12, 31));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn the_date_changes_at_utc_midnight() {
        let midnight = UNIX_EPOCH + Duration::from_secs(19_782 * 86_400);
        assert_eq!(utc_date(midnight - Duration::from_secs(1)), "2024-02-28");
        assert_eq!(utc_date(midnight), "2024-02-29");
    }
}
