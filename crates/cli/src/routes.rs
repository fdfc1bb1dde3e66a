//! Broker sets from flags and from a `--config` file of named routes.
//!
//! ```toml
//! [routes.home]
//! brokers = ["mqtt://10.0.0.2:1883", "mqtt://10.0.0.3:1883"]
//! mode = "fanout"          # failover (default) | fanout | balance
//! ack = "all"              # fanout: "all" (default) | "any" | a count
//! failback_after = "30s"   # failover
//! catch_up_for = "1h"      # fanout
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use steadfast::{AckQuorum, BrokerSet, BrokerUrl, ConfigError, Mode};

/// The settings of one broker set, as written in flags or a file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetSpec {
    pub brokers: Vec<String>,
    pub mode: Option<String>,
    pub ack: Option<Ack>,
    #[serde(default, deserialize_with = "duration")]
    pub failback_after: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub catch_up_for: Option<Duration>,
}

/// A duration key, in the one syntax of every flag (`30s`, `1.5h`, `1d`).
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    steadfast_core::parse_duration(&text).map(Some).map_err(serde::de::Error::custom)
}

/// `ack = "all"` or `ack = 2`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Ack {
    Count(u32),
    Word(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    routes: BTreeMap<String, SetSpec>,
}

/// Which setting of a broker set is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKey {
    Brokers,
    Mode,
    Ack,
}

/// A broker set that cannot be built: which setting, whose set, and why.
#[derive(Debug)]
pub struct SetError {
    /// The setting at fault.
    pub key: SetKey,
    /// Whose set: `-b brokers`, a route, `destination`.
    what: String,
    why: SetWhy,
}

#[derive(Debug)]
enum SetWhy {
    /// The library refused a value (a broker URL, a mode, an ack quorum).
    Config(ConfigError),
    /// No broker listed.
    NoBroker,
    /// `ack = 0`.
    ZeroAck,
}

impl SetError {
    /// The library's refusal behind it, if it was one.
    pub fn config_error(&self) -> Option<&ConfigError> {
        match &self.why {
            SetWhy::Config(e) => Some(e),
            _ => None,
        }
    }
}

impl std::fmt::Display for SetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: ", self.what)?;
        match &self.why {
            SetWhy::Config(e) => write!(f, "{e}"),
            SetWhy::NoBroker => f.write_str("no broker given; list at least one mqtt://host:port"),
            SetWhy::ZeroAck => f.write_str("ack = 0 would wait for nobody; use 1 or more"),
        }
    }
}

impl std::error::Error for SetError {}

impl SetSpec {
    /// The broker set these settings describe; errors name the setting.
    pub fn build(&self, what: &str) -> Result<BrokerSet, SetError> {
        let bad = |key: SetKey, why: SetWhy| SetError { key, what: what.to_owned(), why };
        let refused = |key: SetKey| move |e: ConfigError| bad(key, SetWhy::Config(e));
        let brokers = self
            .brokers
            .iter()
            .map(|u| u.parse::<BrokerUrl>().map_err(refused(SetKey::Brokers)))
            .collect::<Result<Vec<_>, _>>()?;
        if brokers.is_empty() {
            return Err(bad(SetKey::Brokers, SetWhy::NoBroker));
        }
        let mut set = BrokerSet::new(brokers);
        if let Some(m) = &self.mode {
            set = set.mode(m.parse::<Mode>().map_err(refused(SetKey::Mode))?);
        }
        if let Some(a) = &self.ack {
            let quorum = match a {
                Ack::Count(0) => return Err(bad(SetKey::Ack, SetWhy::ZeroAck)),
                Ack::Count(n) => AckQuorum::Count(*n),
                Ack::Word(w) => w.parse::<AckQuorum>().map_err(refused(SetKey::Ack))?,
            };
            set = set.ack(quorum);
        }
        if let Some(d) = self.failback_after {
            set = set.failback_after(d);
        }
        if let Some(d) = self.catch_up_for {
            set = set.catch_up_for(d);
        }
        Ok(set)
    }
}

/// The named routes of a config file, each checked.
pub fn load(path: &Path) -> Result<Vec<(String, BrokerSet)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file: File = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if file.routes.is_empty() {
        return Err(format!("{}: no [routes.NAME] table; define at least one route", path.display()));
    }
    file.routes
        .iter()
        .map(|(name, spec)| {
            let set = spec.build(&format!("{}: route `{name}`", path.display())).map_err(|e| e.to_string())?;
            Ok((name.clone(), set))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> Result<Vec<(String, BrokerSet)>, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.toml");
        std::fs::write(&path, text).unwrap();
        load(&path)
    }

    #[test]
    fn routes_load_with_every_setting() {
        let routes = load_str(
            r#"
[routes.home]
brokers = ["mqtt://127.0.0.1:1", "mqtt://127.0.0.1:2"]
mode = "fanout"
ack = 2
catch_up_for = "1h"

[routes.office]
brokers = ["mqtt://127.0.0.1:3"]
failback_after = "5s"
"#,
        )
        .unwrap();
        assert_eq!(routes.len(), 2);
        let (name, home) = &routes[0];
        assert_eq!((name.as_str(), home.routing(), home.needed_acks()), ("home", Mode::Fanout, 2));
        assert_eq!(routes[1].1.routing(), Mode::Failover);
    }

    #[test]
    fn bad_route_files_name_the_route_and_the_fix() {
        let cases = [
            ("[routes.a]\nbrokers = []\n", "route `a`: no broker"),
            ("[routes.a]\nbrokers = [\"http://x\"]\n", "unknown scheme"),
            ("[routes.a]\nbrokers = [\"mqtt://h:1\"]\nmode = \"mirror\"\n", "unknown mode `mirror`"),
            ("[routes.a]\nbrokers = [\"mqtt://h:1\"]\nack = \"most\"\n", "unknown ack quorum `most`"),
            ("[routes.a]\nbrokers = [\"mqtt://h:1\"]\nack = 0\n", "ack = 0"),
            ("[routes.a]\nbrokers = [\"mqtt://h:1\"]\nfailback = \"1s\"\n", "unknown field `failback`"),
            ("[routes.a]\nbrokers = [\"mqtt://h:1\"]\nfailback_after = \"soon\"\n", "failback_after"),
            ("title = 1\n", "unknown field `title`"),
            ("", "no [routes.NAME] table"),
        ];
        for (text, want) in cases {
            let e = load_str(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
