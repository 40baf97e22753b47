//! RFC 3339 timestamps in UTC with milliseconds (`2025-01-02T03:04:05.678Z`):
//! how the syncer's status API and CLI print times, and how tests and the
//! benchmark read them back. One copy of the calendar arithmetic (Howard
//! Hinnant's `civil_from_days` and `days_from_civil`) for both directions.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `2025-01-02T03:04:05.678Z` (UTC, milliseconds). A time before 1970 is
/// shown as the epoch.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Reads what [`rfc3339`] prints (exactly that shape: 24 bytes, UTC,
/// milliseconds); `None` for anything else.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 24 || b[23] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec, ms) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    // Howard Hinnant's days_from_civil.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms_total = ((days * 86_400 + h * 3600 + mi * 60 + sec) * 1000) + ms;
    u64::try_from(ms_total)
        .ok()
        .map(|m| UNIX_EPOCH + Duration::from_millis(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56.789Z");
    }

    #[test]
    fn what_is_printed_reads_back_to_the_same_millisecond() {
        let t = parse_rfc3339("2024-02-29T12:34:56.789Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_millis(),
            1_709_210_096_789
        );
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00.000Z"), Some(UNIX_EPOCH));
        assert_eq!(parse_rfc3339("2024-02-29 12:34:56"), None);
        // Month ends, leap days and century years, both ways.
        for ms in [
            0u64,
            951_782_400_000,     // 2000-02-29
            4_107_542_399_999,   // 2100-02-28T23:59:59.999
            1_735_689_599_123,   // 2024-12-31T23:59:59.123
            253_402_300_799_999, // 9999-12-31T23:59:59.999
        ] {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t), "{}", rfc3339(t));
        }
    }
}
