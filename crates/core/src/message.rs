//! What a message is, independent of how it is stored or sent.

use std::fmt;

/// MQTT quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Qos {
    /// At most once: written to the socket and forgotten.
    AtMostOnce = 0,
    /// At least once: kept until PUBACK.
    AtLeastOnce = 1,
    /// Exactly once: kept until PUBCOMP, packet id bound durably.
    ExactlyOnce = 2,
}

impl Qos {
    /// The QoS for a wire value, if valid.
    pub fn from_u8(v: u8) -> Option<Qos> {
        match v {
            0 => Some(Qos::AtMostOnce),
            1 => Some(Qos::AtLeastOnce),
            2 => Some(Qos::ExactlyOnce),
            _ => None,
        }
    }
}

/// Who produced a message and where it sits in that producer's sequence (G5).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// Stable producer id, kept in the outbox so it survives restarts.
    pub producer: String,
    /// Per-producer sequence number, strictly increasing, never reused.
    pub seq: u64,
}

impl Identity {
    /// The MQTT 5 user property key that carries the identity.
    pub const USER_PROPERTY: &'static str = "steadfast-id";

    /// The user property value: `producer/seq`, seq in decimal.
    pub fn to_property_value(&self) -> String {
        Self::property_value(&self.producer, self.seq)
    }

    /// The user property value for `producer` and `seq`, without building
    /// an `Identity` first.
    pub fn property_value(producer: &str, seq: u64) -> String {
        let mut out = Vec::with_capacity(Self::property_value_len(producer, seq));
        Self::write_property_value(&mut out, producer, seq);
        // A `&str` and ASCII digits: always UTF-8, taken without a copy.
        String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    /// The length in bytes of [`Identity::property_value`].
    pub fn property_value_len(producer: &str, seq: u64) -> usize {
        producer.len() + 1 + seq.checked_ilog10().map_or(1, |d| d as usize + 1)
    }

    /// Appends [`Identity::property_value`] to `out`, with no string built
    /// on the way (the MQTT 5 send path writes one for every message: a
    /// `format!` was 1,000 instructions of it, docs/performance.md).
    pub fn write_property_value(out: &mut Vec<u8>, producer: &str, seq: u64) {
        out.extend_from_slice(producer.as_bytes());
        out.push(b'/');
        out.extend_from_slice(decimal(seq, &mut [0; 20]));
    }

    /// Whether `v` is this identity's user property value, byte for byte
    /// (as [`Identity::to_property_value`] writes it), with nothing built.
    pub fn is_property_value(&self, v: &str) -> bool {
        v.len() == Self::property_value_len(&self.producer, self.seq)
            && v.strip_prefix(self.producer.as_str()).and_then(|rest| rest.strip_prefix('/')).map(str::as_bytes)
                == Some(decimal(self.seq, &mut [0; 20]))
    }

    /// Parses a user property value written by [`Identity::to_property_value`].
    pub fn parse_property_value(v: &str) -> Option<Identity> {
        Self::property_value_parts(v).map(|(producer, seq)| Identity { producer: producer.to_owned(), seq })
    }

    /// [`Identity::parse_property_value`] borrowed: its producer and
    /// sequence number, with nothing built (the send path looks at every
    /// forwarded message's).
    pub fn property_value_parts(v: &str) -> Option<(&str, u64)> {
        let (producer, seq) = v.rsplit_once('/')?;
        if producer.is_empty() {
            return None;
        }
        Some((producer, seq.parse().ok()?))
    }
}

/// `n` in decimal ASCII digits, written at the end of `buf`.
pub fn decimal(n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    let mut n = n;
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[at..]
}

impl Identity {
    /// First bytes of a payload wrapped by [`Identity::wrap`] (format 1).
    pub const ENVELOPE_MAGIC: [u8; 4] = *b"SFE1";
    /// First bytes of an envelope that carries flags (format 2).
    pub const ENVELOPE_RECEIPT_MAGIC: [u8; 4] = *b"SFE2";
    /// Longest producer id an envelope can carry.
    pub const ENVELOPE_MAX_PRODUCER: usize = 255;

    /// The opt-in payload envelope for MQTT 3.1.1, which has no user
    /// properties: `"SFE1"`, one byte producer length, the producer id
    /// (UTF-8), the sequence number (8 bytes, big-endian), then the payload
    /// unchanged (docs/design.md, "Identity on the wire"). A producer id
    /// longer than 255 bytes is refused when the client is configured.
    pub fn wrap(producer: &str, seq: u64, payload: &[u8]) -> Vec<u8> {
        Self::wrap_asking(producer, seq, payload, false)
    }

    /// [`Identity::wrap`], asking for a receipt when `receipt` (format 2:
    /// `"SFE2"`, one byte of flags, bit 0 set, then as format 1; a
    /// consumer sends the receipt to the producer's receipts topic).
    pub fn wrap_asking(producer: &str, seq: u64, payload: &[u8], receipt: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::envelope_header_len(producer, receipt) + payload.len());
        Self::write_envelope_header(&mut out, producer, seq, receipt);
        out.extend_from_slice(payload);
        out
    }

    /// How many bytes [`Identity::wrap_asking`] puts before the payload.
    pub fn envelope_header_len(producer: &str, receipt: bool) -> usize {
        4 + usize::from(receipt) + 1 + producer.len().min(Self::ENVELOPE_MAX_PRODUCER) + 8
    }

    /// Writes what [`Identity::wrap_asking`] puts before the payload, so
    /// that an encoder can put the payload right after it without a copy
    /// of its own.
    pub fn write_envelope_header(out: &mut Vec<u8>, producer: &str, seq: u64, receipt: bool) {
        let p = &producer.as_bytes()[..producer.len().min(Self::ENVELOPE_MAX_PRODUCER)];
        if receipt {
            out.extend_from_slice(&Self::ENVELOPE_RECEIPT_MAGIC);
            out.push(1);
        } else {
            out.extend_from_slice(&Self::ENVELOPE_MAGIC);
        }
        out.push(p.len() as u8);
        out.extend_from_slice(p);
        out.extend_from_slice(&seq.to_be_bytes());
    }

    /// Splits an enveloped payload into its identity and the original
    /// payload; `None` when it is not an envelope.
    pub fn unwrap(payload: &[u8]) -> Option<(Identity, &[u8])> {
        Self::unwrap_asking(payload).map(|(id, _, p)| (id, p))
    }

    /// [`Identity::unwrap`], and whether the envelope asks for a receipt.
    pub fn unwrap_asking(payload: &[u8]) -> Option<(Identity, bool, &[u8])> {
        let (receipt, rest) = match payload.strip_prefix(&Self::ENVELOPE_MAGIC) {
            Some(rest) => (false, rest),
            None => {
                let rest = payload.strip_prefix(&Self::ENVELOPE_RECEIPT_MAGIC)?;
                let (&flags, rest) = rest.split_first()?;
                (flags & 1 == 1, rest)
            }
        };
        let (&len, rest) = rest.split_first()?;
        let len = len as usize;
        if len == 0 || rest.len() < len + 8 {
            return None;
        }
        let producer = std::str::from_utf8(&rest[..len]).ok()?.to_owned();
        let seq = u64::from_be_bytes(rest[len..len + 8].try_into().ok()?);
        Some((Identity { producer, seq }, receipt, &rest[len + 8..]))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.producer, self.seq)
    }
}

/// The highest message priority (0 is the default and the lowest).
pub const MAX_PRIORITY: u8 = 9;
/// How many priority levels there are.
pub const PRIORITIES: usize = MAX_PRIORITY as usize + 1;

/// Why a message left the outbox without being delivered (G3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A bound was reached and the overflow policy chose it: `drop-oldest`
    /// made room for a newer message, or `drop-newest` refused this one.
    Overflow,
    /// Its deadline (time to live) passed, or it outlived the outbox's age
    /// bound, before any broker acknowledged it.
    Expired,
    /// It was sent as many times as its retry budget allows.
    Budget,
    /// Keep-latest: a newer value of the same topic replaced it.
    Superseded,
    /// Best-effort (or QoS 0): no broker was up to take it, or the link
    /// was lost before it was written; never retried.
    BestEffort,
    /// Larger than the broker's maximum packet size: it can never be sent.
    TooLarge,
    /// It cannot be encoded as an MQTT packet at all (it was accepted by an
    /// older version with weaker checks): it can never be sent.
    Invalid,
    /// Its stored record is damaged and cannot be read back.
    Corrupt,
    /// Poison: a broker ended the link each time it was sent, alone, so
    /// it was moved aside (counted when moved; kept on disk until
    /// `steadfast poison` requeues or deletes it) and blocks nothing.
    Poison,
}

impl DropReason {
    /// Every reason, for reports that list zero counts too.
    pub const ALL: [DropReason; 9] = [
        DropReason::Overflow,
        DropReason::Expired,
        DropReason::Budget,
        DropReason::Superseded,
        DropReason::BestEffort,
        DropReason::TooLarge,
        DropReason::Invalid,
        DropReason::Corrupt,
        DropReason::Poison,
    ];

    /// The stable name used in the store, metrics and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Overflow => "overflow",
            DropReason::Expired => "expired",
            DropReason::Budget => "budget",
            DropReason::Superseded => "superseded",
            DropReason::BestEffort => "best-effort",
            DropReason::TooLarge => "too-large",
            DropReason::Invalid => "invalid",
            DropReason::Corrupt => "corrupt",
            DropReason::Poison => "poison",
        }
    }

    /// The reason for a stored name.
    pub fn parse(s: &str) -> Option<DropReason> {
        DropReason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The MQTT 5 publish properties steadfast keeps with a message.
///
/// Ignored on MQTT 3.1.1 links, which have no properties.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    /// Content type (property 3).
    pub content_type: Option<String>,
    /// Response topic (property 8).
    pub response_topic: Option<String>,
    /// Correlation data (property 9).
    pub correlation_data: Option<Vec<u8>>,
    /// Payload format indicator: true for UTF-8 (property 1).
    pub payload_is_utf8: bool,
    /// User properties in order (property 38).
    pub user: Vec<(String, String)>,
}

/// Error decoding stored properties.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("stored MQTT 5 properties are malformed at byte {at}")]
pub struct PropertiesDecodeError {
    /// Offset where decoding failed.
    pub at: usize,
}

impl Properties {
    /// True when no property is set (stored as NULL).
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }

    /// Checks what MQTT can carry: every string and binary at most 65,535
    /// bytes, no NUL in strings.
    pub fn validate(&self) -> Result<(), PropertyError> {
        let fits = |what: &'static str, len: usize| {
            if len > u16::MAX as usize {
                Err(PropertyError::TooLong { what, len })
            } else {
                Ok(())
            }
        };
        let text = |what: &'static str, v: &str| {
            fits(what, v.len())?;
            if v.contains('\0') {
                return Err(PropertyError::Nul { what });
            }
            Ok(())
        };
        if let Some(v) = &self.content_type {
            text("content type", v)?;
        }
        if let Some(v) = &self.response_topic {
            text("response topic", v)?;
        }
        if let Some(v) = &self.correlation_data {
            fits("correlation data", v.len())?;
        }
        for (k, v) in &self.user {
            text("a user property name", k)?;
            text("a user property value", v)?;
        }
        Ok(())
    }

    /// The length of [`Properties::encode`]'s bytes, without encoding.
    pub fn encoded_len(&self) -> usize {
        let header = |v: usize| 5 + v;
        self.payload_is_utf8 as usize * header(1)
            + self.content_type.as_ref().map_or(0, |v| header(v.len()))
            + self.response_topic.as_ref().map_or(0, |v| header(v.len()))
            + self.correlation_data.as_ref().map_or(0, |v| header(v.len()))
            + self.user.iter().map(|(k, v)| header(4 + k.len() + v.len())).sum::<usize>()
    }

    /// Encodes in the outbox format (docs/design.md, "Properties blob"):
    /// a sequence of `tag u8, len u32 BE, bytes`; user properties as
    /// tag 38 with `klen u32 BE, key, value`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// [`Properties::encode`] appended to `out`: a writer that encodes
    /// row after row into one buffer allocates nothing for it.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        // Each field: a tag, a 4-byte length, the bytes. Sized first: a
        // bridge encodes this for every message it forwards, and growing
        // the buffer field by field cost it more than the encoding.
        let len = self.encoded_len();
        let start = out.len();
        out.reserve(len);
        let mut field = |tag: u8, parts: &[&[u8]]| {
            out.push(tag);
            let n: usize = parts.iter().map(|p| p.len()).sum();
            out.extend_from_slice(&(n as u32).to_be_bytes());
            for p in parts {
                out.extend_from_slice(p);
            }
        };
        if self.payload_is_utf8 {
            field(1, &[&[1]]);
        }
        if let Some(v) = &self.content_type {
            field(3, &[v.as_bytes()]);
        }
        if let Some(v) = &self.response_topic {
            field(8, &[v.as_bytes()]);
        }
        if let Some(v) = &self.correlation_data {
            field(9, &[v]);
        }
        for (k, v) in &self.user {
            field(38, &[&(k.len() as u32).to_be_bytes(), k.as_bytes(), v.as_bytes()]);
        }
        debug_assert_eq!(out.len() - start, len);
    }

    /// Decodes what [`Properties::encode`] wrote.
    pub fn decode(mut b: &[u8]) -> Result<Properties, PropertiesDecodeError> {
        let total = b.len();
        let mut p = Properties::default();
        while !b.is_empty() {
            let at = total - b.len();
            let err = PropertiesDecodeError { at };
            if b.len() < 5 {
                return Err(err);
            }
            let tag = b[0];
            let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
            let body = b.get(5..5 + len).ok_or(err.clone())?;
            let text = || String::from_utf8(body.to_vec()).map_err(|_| err.clone());
            match tag {
                1 => p.payload_is_utf8 = body == [1],
                3 => p.content_type = Some(text()?),
                8 => p.response_topic = Some(text()?),
                9 => p.correlation_data = Some(body.to_vec()),
                38 => {
                    let klen = body.get(..4).ok_or(err.clone())?;
                    let klen = u32::from_be_bytes([klen[0], klen[1], klen[2], klen[3]]) as usize;
                    let key = body.get(4..4 + klen).ok_or(err.clone())?;
                    let val = &body[4 + klen..];
                    let key = String::from_utf8(key.to_vec()).map_err(|_| err.clone())?;
                    let val = String::from_utf8(val.to_vec()).map_err(|_| err.clone())?;
                    p.user.push((key, val));
                }
                _ => return Err(err),
            }
            b = &b[5 + len..];
        }
        Ok(p)
    }
}

/// Why a message property cannot be carried by MQTT.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PropertyError {
    /// Longer than a two-byte length can say.
    #[error("{what} is {len} bytes; MQTT allows at most 65535")]
    TooLong {
        /// Which property.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// A NUL character in a string.
    #[error("{what} contains a NUL character, which MQTT forbids")]
    Nul {
        /// Which property.
        what: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_through_the_envelope() {
        let wrapped = Identity::wrap("gw-7", 513, b"21.5");
        assert_eq!(&wrapped[..6], b"SFE1\x04g");
        assert_eq!(&wrapped[9..17], &513u64.to_be_bytes());
        let (id, payload) = Identity::unwrap(&wrapped).unwrap();
        assert_eq!((id, payload), (Identity { producer: "gw-7".into(), seq: 513 }, &b"21.5"[..]));
        let empty = Identity::wrap("p", 1, b"");
        assert_eq!(Identity::unwrap(&empty).unwrap().1, b"");
        let asking = Identity::wrap_asking("gw-7", 513, b"21.5", true);
        assert_eq!(&asking[..6], b"SFE2\x01\x04");
        let (id, receipt, payload) = Identity::unwrap_asking(&asking).unwrap();
        assert_eq!((id.seq, receipt, payload), (513, true, &b"21.5"[..]));
        assert!(!Identity::unwrap_asking(&wrapped).unwrap().1);
        for bad in [&b"21.5"[..], b"SFE1", b"SFE1\x00", b"SFE1\x04gw-7\x00\x00", b"SFE1\x01\xff\0\0\0\0\0\0\0\0"] {
            assert_eq!(Identity::unwrap(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn identity_round_trips_through_the_user_property() {
        let id = Identity { producer: "gw/7:ab12".into(), seq: 42 };
        assert_eq!(Identity::parse_property_value(&id.to_property_value()), Some(id.clone()));
        assert_eq!(Identity::parse_property_value("noslash"), None);
        assert_eq!(Identity::parse_property_value("/5"), None);
        assert_eq!(Identity::parse_property_value("p/x"), None);
        assert!(id.is_property_value("gw/7:ab12/42"));
        for other in ["gw/7:ab12/042", "gw/7:ab12/43", "gw/7:ab1/42", "gw/7:ab12-42", "gw/7:ab12/4", ""] {
            assert!(!id.is_property_value(other), "{other}");
        }
        for n in [0, 7, 10, 99, 1_000_001, u64::MAX] {
            assert_eq!(decimal(n, &mut [0; 20]), n.to_string().as_bytes());
        }
    }

    /// The value written without `format!` is the decimal one, its length
    /// said beforehand, at every number of digits.
    #[test]
    fn the_property_value_is_producer_slash_decimal_sequence() {
        let mut seqs = vec![0, 1, 9, u64::MAX, u64::MAX - 1];
        for d in 1..20 {
            let p = 10u64.pow(d);
            seqs.extend([p - 1, p, p + 1]);
        }
        for seq in seqs {
            let v = Identity::property_value("gw-7", seq);
            assert_eq!(v, format!("gw-7/{seq}"));
            assert_eq!(Identity::property_value_len("gw-7", seq), v.len(), "{seq}");
        }
    }

    #[test]
    fn properties_round_trip_and_reject_garbage() {
        let p = Properties {
            content_type: Some("application/json".into()),
            response_topic: Some("r/t".into()),
            correlation_data: Some(vec![0, 1, 2]),
            payload_is_utf8: true,
            user: vec![("a".into(), "1".into()), ("".into(), "".into())],
        };
        assert_eq!(Properties::decode(&p.encode()).unwrap(), p);
        // The stored form (outbox rows hold it): byte for byte.
        let one = Properties { payload_is_utf8: true, user: vec![("k".into(), "vv".into())], ..Properties::default() };
        assert_eq!(one.encode(), [1, 0, 0, 0, 1, 1, 38, 0, 0, 0, 7, 0, 0, 0, 1, b'k', b'v', b'v']);
        assert_eq!(p.encoded_len(), p.encode().len());
        assert!(Properties::default().encode().is_empty());
        assert!(Properties::decode(&[3, 0, 0, 0, 9, b'x']).is_err());
        assert!(Properties::decode(&[77, 0, 0, 0, 0]).is_err());
        assert_eq!(p.validate(), Ok(()));
        let long = Properties { user: vec![("k".into(), "v".repeat(70_000))], ..Properties::default() };
        assert_eq!(long.validate(), Err(PropertyError::TooLong { what: "a user property value", len: 70_000 }));
        assert!(long.validate().unwrap_err().to_string().contains("65535"));
    }
}
