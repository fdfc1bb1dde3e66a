//! The one duration syntax of every flag and configuration key: a number,
//! decimals allowed, and a unit — `500ms`, `30s`, `1.5m`, `2h`, `1d` — or
//! a bare number of seconds. Parsed once, where the value enters.

use std::time::Duration;

/// Why a duration does not parse; each says the syntax that does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// No number where one must be.
    #[error("`{0}` is not a duration; use a number and a unit: 500ms, 30s, 1.5m, 2h, 1d")]
    NotANumber(String),
    /// A unit that is not one of ours.
    #[error("`{text}` has an unknown unit `{unit}`; use ms, s, m, h or d")]
    UnknownUnit {
        /// The duration as given.
        text: String,
        /// The unit found.
        unit: String,
    },
    /// Negative, not finite, or longer than a `Duration` holds.
    #[error("`{0}` is out of range")]
    OutOfRange(String),
}

/// Parses `500ms`, `30s`, `1.5m`, `2h`, `1d`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let text = s.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: f64 = num.parse().map_err(|_| DurationError::NotANumber(text.to_owned()))?;
    let seconds = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return Err(DurationError::UnknownUnit { text: text.to_owned(), unit: unit.to_owned() }),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| DurationError::OutOfRange(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_and_decimals_parse() {
        let ok = |s: &str, d: Duration| assert_eq!(parse_duration(s), Ok(d), "{s}");
        ok("500ms", Duration::from_millis(500));
        ok("10", Duration::from_secs(10));
        ok("30s", Duration::from_secs(30));
        ok("1.5m", Duration::from_secs(90));
        ok("2h", Duration::from_secs(7200));
        ok("1d", Duration::from_secs(86400));
        ok(" 0.25s ", Duration::from_millis(250));
    }

    #[test]
    fn what_does_not_parse_says_why() {
        assert_eq!(parse_duration("x"), Err(DurationError::NotANumber("x".into())));
        assert_eq!(parse_duration("ms"), Err(DurationError::NotANumber("ms".into())));
        let unit = parse_duration("5 parsecs").unwrap_err();
        assert!(unit.to_string().contains("unknown unit ` parsecs`"), "{unit}");
        assert_eq!(parse_duration("1w"), Err(DurationError::UnknownUnit { text: "1w".into(), unit: "w".into() }));
        assert!(matches!(parse_duration("99999999999999999999999s"), Err(DurationError::OutOfRange(_))));
        assert!(matches!(parse_duration("1.2.3s"), Err(DurationError::NotANumber(_))));
    }
}
