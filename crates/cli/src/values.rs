//! Flag and key values other than durations: sizes and bounds, QoS,
//! MQTT version, keep-alive, and sizes in words.

use std::time::Duration;

/// A repeatable `COUNT|SIZE` bound (`10000`, `100MB`): the count and the
/// bytes given, the last of each winning; 0 is refused.
pub fn parse_bounds(flag: &str, values: &[String]) -> Result<(Option<u64>, Option<u64>), String> {
    let (mut count, mut bytes) = (None, None);
    for v in values {
        if v.chars().all(|c| c.is_ascii_digit()) {
            count = Some(v.parse::<u64>().map_err(|_| format!("{flag} {v} is too large"))?);
        } else {
            bytes = Some(parse_size(v).map_err(|e| format!("{flag}: {e}"))?);
        }
    }
    if count == Some(0) || bytes == Some(0) {
        return Err(format!("{flag}: a bound of 0 would hold nothing; give a bound of at least 1, or none"));
    }
    Ok((count, bytes))
}

/// `-q`.
pub fn parse_qos(q: u8) -> Result<steadfast::Qos, String> {
    match q {
        0 => Ok(steadfast::Qos::AtMostOnce),
        1 => Ok(steadfast::Qos::AtLeastOnce),
        2 => Ok(steadfast::Qos::ExactlyOnce),
        q => Err(format!("QoS {q} does not exist: use 0, 1 or 2")),
    }
}

/// `-V`: a version to speak, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    /// The version spoken first.
    pub version: steadfast::ProtocolVersion,
    /// MQTT 5, and 3.1.1 for a broker that refuses 5 (remembered).
    pub auto: bool,
}

impl Version {
    /// MQTT 5, and 3.1.1 for a broker that does not take 5 (`auto`).
    pub const AUTO: Version = Version { version: steadfast::ProtocolVersion::V5, auto: true };

    /// `client` speaking this version.
    pub fn apply(self, client: steadfast::ClientConfig) -> steadfast::ClientConfig {
        client.version(self.version).auto_version(self.auto)
    }

    /// True when only MQTT 5 will be spoken.
    pub fn only_5(self) -> bool {
        self.version == steadfast::ProtocolVersion::V5 && !self.auto
    }

    /// Warns once when several brokers are spoken to in MQTT 3.1.1 without
    /// the identity envelope: the copies of a message through different
    /// brokers cannot be told apart (an `auto` fallback says so itself).
    pub fn warn_without_envelope(self, brokers: usize, envelope: bool) {
        if self.version == steadfast::ProtocolVersion::V311 && !self.auto && !envelope && brokers > 1 {
            eprintln!("steadfast: warning: {brokers} brokers in MQTT 3.1.1 without --envelope: messages carry no identity, so the copies that come through different brokers cannot be de-duplicated; add --envelope on both pub and sub");
        }
    }
}

/// `-V`.
pub fn parse_version(v: &str) -> Result<Version, String> {
    let forced = |version| Ok(Version { version, auto: false });
    match v {
        "auto" => Ok(Version::AUTO),
        "5" | "mqttv5" | "50" => forced(steadfast::ProtocolVersion::V5),
        "311" | "mqttv311" | "3.1.1" => forced(steadfast::ProtocolVersion::V311),
        v => Err(format!("protocol version `{v}` is not supported; use -V auto, -V 311 or -V 5")),
    }
}

/// `-k`.
pub fn parse_keepalive(k: u64) -> Result<Duration, String> {
    if k == 0 || k > 65535 {
        return Err(format!("keep-alive {k} s is out of range; use 1 to 65535"));
    }
    Ok(Duration::from_secs(k))
}

/// Parses `1024`, `64KB`, `100MB`, `2GB` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_uppercase();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size; use e.g. 1048576, 64KB, 100MB, 2GB"))?;
    let mult = match unit.trim_end_matches("IB").trim_end_matches('B') {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return Err(format!("`{s}` has an unknown unit; use KB, MB or GB")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("`{s}` is too large"))
}

/// `1.5 KiB` style.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64KB"), Ok(65536));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("7"), Ok(7));
        assert!(parse_size("3XB").is_err());
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
