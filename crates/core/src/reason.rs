//! The reason code of an MQTT 5 PUBACK or PUBREC: whether the broker took
//! the message, and, when it refused it, whether sending it again can ever
//! change the answer.

/// Whether `code` refuses the message (MQTT 5: 0x80 and above; below,
/// success and "no matching subscribers" both take it).
pub fn is_refusal(code: u8) -> bool {
    code >= 0x80
}

/// Whether a refusal with `code` is for good: the same message sent to the
/// same broker gets the same answer until someone changes the broker's
/// configuration (its ACL, its size limit) or the message. Such a message
/// is moved aside as poison, kept and listed with its code, instead of
/// being sent again for ever; the others (0x80 unspecified, 0x83
/// implementation specific, 0x91 packet identifier in use, 0x97 quota
/// exceeded, and codes MQTT 5 does not give a PUBACK) may pass, and the
/// message is sent again after a pause.
pub fn is_for_good(code: u8) -> bool {
    // 0x95 is not a PUBACK code in MQTT 5, but Mosquitto 2.0 answers a
    // PUBLISH over its `message_size_limit` with it.
    matches!(code, 0x87 | 0x90 | 0x95 | 0x99)
}

/// What a reason code from 0x80 on says, as MQTT 5 names it.
pub fn name(code: u8) -> &'static str {
    match code {
        0x80 => "unspecified error",
        0x83 => "implementation specific error",
        0x87 => "not authorized",
        0x90 => "topic name invalid",
        0x91 => "packet identifier in use",
        0x95 => "packet too large",
        0x97 => "quota exceeded",
        0x99 => "payload format invalid",
        _ => "an error",
    }
}

/// A refusal's reason code as logs and errors give it: `0x87, not
/// authorized`.
pub fn describe(code: u8) -> String {
    format!("0x{code:02x}, {}", name(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_codes_no_retry_changes_are_for_good() {
        for code in 0..=0x7f {
            assert!(!is_refusal(code) && !is_for_good(code), "0x{code:02x}");
        }
        let for_good: Vec<u8> = (0x80..=0xff).filter(|c| is_for_good(*c)).collect();
        assert_eq!(for_good, [0x87, 0x90, 0x95, 0x99]);
        assert_eq!(describe(0x87), "0x87, not authorized");
        assert_eq!(describe(0x97), "0x97, quota exceeded");
        assert_eq!(describe(0xa2), "0xa2, an error");
    }
}
