//! Topic name rules (MQTT 5 section 4.7, same in 3.1.1).

/// Why a topic name cannot be published to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// The empty string is not a topic.
    #[error("topic is empty; give a topic such as `sensors/temperature`")]
    Empty,
    /// Wildcards belong in subscriptions only.
    #[error("topic `{0}` contains a wildcard (`+` or `#`); wildcards are only valid in subscription filters")]
    Wildcard(String),
    /// NUL is forbidden in MQTT strings.
    #[error("topic contains a NUL character, which MQTT forbids")]
    Nul,
    /// A control character: brokers reject it (Mosquitto closes the
    /// connection), so the message could never be delivered.
    #[error("topic `{topic}` contains the control character {ch} at byte {at}; brokers reject it (Mosquitto closes the connection), so it could never be delivered: remove it")]
    Control {
        /// The topic, with its control characters escaped.
        topic: String,
        /// The first one, as `U+XXXX`.
        ch: String,
        /// Its byte offset.
        at: usize,
    },
    /// MQTT strings carry a 16-bit length.
    #[error("topic is {0} bytes long; MQTT allows at most 65535")]
    TooLong(usize),
}

/// Why a subscription filter is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FilterError {
    /// The empty string matches nothing.
    #[error("the filter is empty; give one such as `sensors/#`")]
    Empty,
    /// `#` must be a whole last level, `+` a whole level.
    #[error("`{0}`: a wildcard must fill a whole level, and `#` must be the last level (e.g. `a/+/c`, `a/#`)")]
    Wildcard(String),
    /// NUL is forbidden in MQTT strings.
    #[error("the filter contains a NUL character, which MQTT forbids")]
    Nul,
    /// A control character: brokers refuse the subscription or close the
    /// connection.
    #[error("the filter `{filter}` contains the control character {ch} at byte {at}; brokers refuse it (Mosquitto closes the connection): remove it")]
    Control {
        /// The filter, with its control characters escaped.
        filter: String,
        /// The first one, as `U+XXXX`.
        ch: String,
        /// Its byte offset.
        at: usize,
    },
    /// MQTT strings carry a 16-bit length.
    #[error("the filter is {0} bytes long; MQTT allows at most 65535")]
    TooLong(usize),
    /// `$share/` not followed by a share name and a filter: brokers refuse
    /// the subscription or close the connection.
    #[error("`{0}`: a shared subscription is `$share/NAME/FILTER`, NAME not empty and without `/`, `+` or `#`, FILTER a topic filter (e.g. `$share/workers/jobs/#`)")]
    Shared(String),
}

/// The first control character in `s` that MQTT strings should not carry
/// and brokers reject (U+0001 to U+001F, U+007F to U+009F; NUL is its own
/// error): `(escaped s, "U+XXXX", byte offset)`.
fn control(s: &str) -> Option<(String, String, usize)> {
    let (at, c) = s.char_indices().find(|(_, c)| matches!(*c as u32, 0x01..=0x1f | 0x7f..=0x9f))?;
    Some((s.escape_debug().to_string(), format!("U+{:04X}", c as u32), at))
}

/// Checks that `filter` is a valid subscription filter.
pub fn validate_topic_filter(filter: &str) -> Result<(), FilterError> {
    if filter.is_empty() {
        return Err(FilterError::Empty);
    }
    if filter.len() > 65535 {
        return Err(FilterError::TooLong(filter.len()));
    }
    if filter.contains('\0') {
        return Err(FilterError::Nul);
    }
    if let Some((filter, ch, at)) = control(filter) {
        return Err(FilterError::Control { filter, ch, at });
    }
    // MQTT 5 section 4.8.2: `$share/{ShareName}/{filter}`.
    if let Some(rest) = filter.strip_prefix("$share/") {
        let shared = || FilterError::Shared(filter.to_owned());
        let (name, inner) = rest.split_once('/').ok_or_else(shared)?;
        if name.is_empty() || name.contains(['+', '#']) || inner.is_empty() {
            return Err(shared());
        }
        return validate_topic_filter(inner).map_err(|e| match e {
            FilterError::Wildcard(_) => FilterError::Wildcard(filter.to_owned()),
            e => e,
        });
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let bad_hash = level.contains('#') && (*level != "#" || i + 1 != levels.len());
        let bad_plus = level.contains('+') && *level != "+";
        if bad_hash || bad_plus {
            return Err(FilterError::Wildcard(filter.to_owned()));
        }
    }
    Ok(())
}

/// Checks that `topic` may be used as a PUBLISH topic name.
pub fn validate_topic_name(topic: &str) -> Result<(), TopicError> {
    // One pass over the bytes for the common topic, which has none of
    // what `checked_one_by_one` refuses: a wildcard, NUL or another control
    // character (U+0080 to U+009F start with the byte 0xC2, which also
    // starts other characters: those take the checks). Three passes
    // over characters cost a bridged message 370 instructions.
    let b = topic.as_bytes();
    if !b.is_empty() && b.len() <= 65535 && !b.iter().any(|&c| matches!(c, b'+' | b'#' | 0x00..=0x1f | 0x7f | 0xc2)) {
        return Ok(());
    }
    checked_one_by_one(topic)
}

/// The checks of [`validate_topic_name`] one by one, in the order their
/// errors are reported.
fn checked_one_by_one(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > 65535 {
        return Err(TopicError::TooLong(topic.len()));
    }
    if topic.contains(['+', '#']) {
        return Err(TopicError::Wildcard(topic.to_owned()));
    }
    if topic.contains('\0') {
        return Err(TopicError::Nul);
    }
    if let Some((topic, ch, at)) = control(topic) {
        return Err(TopicError::Control { topic, ch, at });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_topics_and_rejects_the_rest() {
        assert_eq!(validate_topic_name("a/b/c"), Ok(()));
        assert_eq!(validate_topic_name("/"), Ok(()));
        assert_eq!(validate_topic_name(""), Err(TopicError::Empty));
        assert!(matches!(validate_topic_name("a/+/b"), Err(TopicError::Wildcard(_))));
        assert!(matches!(validate_topic_name("a/#"), Err(TopicError::Wildcard(_))));
        assert_eq!(validate_topic_name("a\0b"), Err(TopicError::Nul));
        assert_eq!(validate_topic_name(&"x".repeat(70000)), Err(TopicError::TooLong(70000)));
    }

    /// The one-pass check answers as the checks one by one, on strings
    /// drawn from every range the checks look at.
    #[test]
    fn the_fast_path_answers_as_the_checks_one_by_one() {
        let chars: Vec<char> =
            "ab/+#~ \0\u{1}\n\u{1f}\u{7f}\u{80}\u{85}\u{9f}\u{a0}\u{a3}\u{e9}\u{100}\u{1F600}".chars().collect();
        let mut rng = fastrand::Rng::with_seed(18);
        for _ in 0..20_000 {
            let len = rng.usize(0..8);
            let topic: String = (0..len).map(|_| chars[rng.usize(0..chars.len())]).collect();
            assert_eq!(validate_topic_name(&topic), checked_one_by_one(&topic), "{topic:?}");
        }
        let long = "a".repeat(65_536);
        assert_eq!(validate_topic_name(&long), checked_one_by_one(&long));
        assert_eq!(validate_topic_name(&long[1..]), Ok(()));
    }

    #[test]
    fn control_characters_are_refused_where_brokers_refuse_them() {
        let e = validate_topic_name("a\u{1}b").unwrap_err();
        assert_eq!(e, TopicError::Control { topic: "a\\u{1}b".into(), ch: "U+0001".into(), at: 1 });
        assert!(e.to_string().contains("U+0001 at byte 1"), "{e}");
        for c in ['\u{1f}', '\u{7f}', '\u{85}', '\u{9f}', '\n', '\t'] {
            assert!(validate_topic_name(&format!("x/{c}")).is_err(), "{c:?}");
            assert!(validate_topic_filter(&format!("x/{c}")).is_err(), "{c:?}");
        }
        // What is not a control character stays allowed.
        for ok in ["caf\u{e9}/\u{a0}", "\u{20}", "\u{1F600}/x", "x/~"] {
            assert_eq!(validate_topic_name(ok), Ok(()), "{ok:?}");
            assert_eq!(validate_topic_filter(ok), Ok(()), "{ok:?}");
        }
        let e = validate_topic_filter("a/\u{7f}/#").unwrap_err();
        assert!(matches!(e, FilterError::Control { at: 2, .. }), "{e:?}");
    }

    /// `$share/NAME/FILTER` (MQTT 5 section 4.8.2): a share name and a
    /// filter, or the broker refuses the subscription or closes the link.
    #[test]
    fn a_shared_subscription_needs_a_name_and_a_filter() {
        for ok in ["$share/g/a", "$share/g/#", "$share/g/+/b", "$share/g//", "$sharex/a", "$SYS/#"] {
            assert_eq!(validate_topic_filter(ok), Ok(()), "{ok:?}");
        }
        for bad in ["$share/g", "$share/g/", "$share//a", "$share/", "$share/g+/a", "$share/#/a"] {
            assert_eq!(validate_topic_filter(bad), Err(FilterError::Shared(bad.into())), "{bad:?}");
        }
        assert_eq!(validate_topic_filter("$share/g/a#"), Err(FilterError::Wildcard("$share/g/a#".into())));
        let e = validate_topic_filter("$share/g").unwrap_err().to_string();
        assert!(e.contains("`$share/NAME/FILTER`"), "{e}");
    }
}
