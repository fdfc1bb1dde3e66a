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
    /// MQTT strings carry a 16-bit length.
    #[error("topic is {0} bytes long; MQTT allows at most 65535")]
    TooLong(usize),
}

/// Checks that `topic` may be used as a PUBLISH topic name.
pub fn validate_topic_name(topic: &str) -> Result<(), TopicError> {
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
}
