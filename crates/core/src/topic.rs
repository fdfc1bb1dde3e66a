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
    /// MQTT strings carry a 16-bit length.
    #[error("the filter is {0} bytes long; MQTT allows at most 65535")]
    TooLong(usize),
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
