//! The flag that fixes a library error. The library describes the problem
//! and names its setting in prose ("the client's user name and password");
//! `pub`, `sub` and `doctor` add the flag, matched on the error's variant.
//! (The bridge names its keys with the line instead, and for a broker's
//! answer the key of the route's side: [`route_key_hint`].)

use std::fmt;

use steadfast::{CloseReason, ConfigError, ConnectError, OpenError, Refusal};

use crate::Failure;

/// An error that a flag can fix.
pub trait FlagHint {
    /// What to add after the error's words: the flag to change, or "".
    fn flag_hint(&self) -> &'static str;
}

/// An error shown with the flag that fixes it; its causes are its own.
#[derive(Debug)]
pub struct WithFlag<E>(pub E);

impl<E: FlagHint + fmt::Display> fmt::Display for WithFlag<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.0, self.0.flag_hint())
    }
}

impl<E: FlagHint + std::error::Error> std::error::Error for WithFlag<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// `Client::open` or `Consumer::open` failed: a configuration mistake is
/// a usage error, shown with its flag; a store that another directory
/// would cure names `store_flag` (`--outbox`, `--inbox`).
pub fn open_failure(e: OpenError, store_flag: &str) -> Failure {
    match e {
        // Not a mistake in the command: another process holds the outbox.
        OpenError::Config(e @ ConfigError::JoinedOtherBrokers { .. }) => Failure::other(e),
        OpenError::Config(e) => Failure::usage(WithFlag(e)),
        OpenError::Store(e) => Failure::other(crate::paths::store_error(e, store_flag)),
        e => Failure::other(e),
    }
}

impl FlagHint for ConfigError {
    fn flag_hint(&self) -> &'static str {
        match self {
            ConfigError::UrlCredentials { .. } => " (-u and -P, or --pw-file)",
            ConfigError::AckQuorumWithoutFanout { .. } => " (--mode fanout, or drop --ack)",
            ConfigError::ClientId { .. } => " (-i)",
            ConfigError::AckTimeout(_) | ConfigError::AckTimeoutBounds { .. } => " (--ack-timeout)",
            ConfigError::MaxPacketSize(_) => " (--max-packet)",
            ConfigError::CaFile { .. } | ConfigError::CaCertificate { .. } | ConfigError::NoTrustedRoots { .. } => {
                " (--cafile)"
            }
            ConfigError::ClientCertificate { .. } | ConfigError::KeyMismatch { .. } => " (--cert and --key)",
            ConfigError::ClientKey { .. } => " (--key)",
            ConfigError::UnconfiguredRoute { .. } => " (--config FILE with a [routes.NAME] table)",
            ConfigError::NoTopic | ConfigError::TopicFilter { .. } => " (-t)",
            ConfigError::ZeroInbox { .. } => " (--inbox-max)",
            ConfigError::ZeroInflight => " (--max-inflight)",
            _ => "",
        }
    }
}

impl FlagHint for ConnectError {
    fn flag_hint(&self) -> &'static str {
        match self {
            ConnectError::Refused { refusal: Refusal::ProtocolVersion, .. } => {
                "; -V auto (the default) speaks 5 and falls back to 3.1.1, -V 311 or -V 5 force one"
            }
            ConnectError::Refused { refusal: Refusal::BadCredentials, .. } => "; check -u and -P",
            ConnectError::Refused { refusal: Refusal::ClientId, .. } => "; choose another with -i",
            ConnectError::Closed(CloseReason::BeforeConnack { mqtt5: true }) => "; try -V auto (the default) or -V 311",
            ConnectError::Timeout { packet: "CONNECT", mqtt5: true, .. } => {
                "; a broker that speaks only MQTT 3.1.1 can stall on an MQTT 5 CONNECT: if so, try -V 311"
            }
            ConnectError::Closed(CloseReason::Qos2InFlight(_)) => " (-q 1)",
            ConnectError::IncomingTooLarge { .. } => "; raise it with --max-packet",
            e => match e.tls_setting() {
                Some("ca_file") => "; give its CA with --cafile",
                Some("client_cert") => " (--cert and --key)",
                _ => "",
            },
        }
    }
}

/// What to add after a connection error of a bridge route's `side`
/// (`source` or `destination`): the key of that side that fixes it, or "".
pub fn route_key_hint(e: &ConnectError, side: &str) -> String {
    let key = match e {
        ConnectError::Refused { refusal: Refusal::ProtocolVersion, .. }
        | ConnectError::Closed(CloseReason::BeforeConnack { mqtt5: true }) => {
            "version = \"auto\" (the default) or \"311\" speaks 3.1.1 to a broker without MQTT 5"
        }
        ConnectError::Timeout { packet: "CONNECT", mqtt5: true, .. } => {
            "a broker that speaks only MQTT 3.1.1 can stall on an MQTT 5 CONNECT: version = \"auto\" (the default) or \"311\""
        }
        ConnectError::Refused { refusal: Refusal::BadCredentials | Refusal::NotAuthorized, .. } => {
            "check username and password (or password_file, password_env)"
        }
        ConnectError::Refused { refusal: Refusal::ClientId, .. } => "choose another client_id",
        _ => return String::new(),
    };
    format!("; in the route's {side}: {key}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_is_told_the_key_of_its_side() {
        let refused = ConnectError::Refused { broker: "mqtt://h:1883".into(), refusal: Refusal::ProtocolVersion };
        assert_eq!(
            route_key_hint(&refused, "source"),
            "; in the route's source: version = \"auto\" (the default) or \"311\" speaks 3.1.1 to a broker without MQTT 5"
        );
        let silent = ConnectError::Timeout {
            broker: "mqtt://h:1883".into(),
            packet: "CONNECT",
            timeout: std::time::Duration::from_secs(10),
            mqtt5: true,
        };
        assert!(route_key_hint(&silent, "destination")
            .starts_with("; in the route's destination: a broker that speaks only MQTT 3.1.1"));
        let unreachable = ConnectError::Unreachable { broker: "mqtt://h:1883".into(), reason: "refused".into() };
        assert_eq!(route_key_hint(&unreachable, "source"), "");
    }

    #[test]
    fn the_flag_follows_the_library_words() {
        let refused = ConnectError::Refused { broker: "mqtt://h:1883".into(), refusal: Refusal::ProtocolVersion };
        let shown = WithFlag(refused).to_string();
        assert!(shown.ends_with("does not accept this MQTT protocol version; -V auto (the default) speaks 5 and falls back to 3.1.1, -V 311 or -V 5 force one"), "{shown}");
        let url = "mqtt://u:p@h:1".parse::<steadfast::BrokerUrl>().unwrap_err();
        let shown = WithFlag(url).to_string();
        assert!(shown.ends_with("user name and password (-u and -P, or --pw-file)"), "{shown}");
        let closed = WithFlag(ConnectError::Closed(CloseReason::Eof)).to_string();
        assert_eq!(closed, "the broker closed the connection");
    }
}
