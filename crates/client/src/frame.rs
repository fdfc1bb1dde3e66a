//! MQTT packets cut out of the bytes a connection reads: each packet's
//! first byte and its body (exactly its remaining length), borrowed from
//! the read when the packet lies whole in it (the common case: a read of
//! 64 KiB holds hundreds), gathered in a buffer the framer keeps when it
//! spans reads. The codec's framer copies every body into a vector of its
//! own, and a PUBLISH's a second time into an `Arc`: two allocations per
//! packet (docs/performance.md, session 26). It takes and refuses exactly
//! what that framer does (a property test compares the two): a remaining
//! length whose fourth byte goes on is malformed, and a packet whose
//! whole size (fixed header included) exceeds the maximum is too large.

/// Why a stream cannot be cut into packets (the connection ends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// A remaining length longer than four bytes.
    Malformed,
    /// A packet larger than the maximum packet size.
    TooLarge,
}

/// A packet cut out of the stream.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Raw<'a> {
    first: u8,
    body: &'a [u8],
}

impl<'a> Raw<'a> {
    /// The control packet type (the first byte's high four bits).
    pub fn packet_type(&self) -> u8 {
        self.first >> 4
    }

    /// The first byte's low four bits.
    pub fn flags(&self) -> u8 {
        self.first & 0x0f
    }

    /// The body: everything after the fixed header.
    pub fn body(&self) -> &'a [u8] {
        self.body
    }
}

/// Cuts one connection's stream into packets.
#[derive(Debug, Default)]
pub(crate) struct Framer {
    /// The largest packet taken (whole, fixed header included).
    max: Option<u32>,
    /// The start of a packet an earlier read did not complete.
    partial: Vec<u8>,
}

impl Framer {
    /// A framer that refuses packets larger than `max` bytes.
    pub fn new(max: Option<u32>) -> Framer {
        Framer { max, partial: Vec::new() }
    }

    /// Hands every packet `data` completes to `each`, in order, until
    /// `each` returns false; what is left of an unfinished packet waits
    /// for the next read. An error ends the stream: what follows it is
    /// not looked at.
    pub fn feed(&mut self, data: &[u8], each: impl FnMut(Raw<'_>) -> bool) -> Result<(), FrameError> {
        let r = self.cut(data, each);
        if r.is_err() {
            // As the codec's framer: nothing of the broken packet is kept.
            self.partial.clear();
        }
        r
    }

    fn cut(&mut self, mut data: &[u8], mut each: impl FnMut(Raw<'_>) -> bool) -> Result<(), FrameError> {
        if !self.partial.is_empty() {
            // Complete the packet begun earlier: its header first, a
            // byte at a time, then as much of its body as it lacks.
            let (header, remaining) = loop {
                match header(&self.partial)? {
                    Some(h) => break h,
                    None => match data.split_first() {
                        Some((b, rest)) => {
                            self.partial.push(*b);
                            data = rest;
                        }
                        None => return Ok(()),
                    },
                }
            };
            let whole = self.check(header, remaining)?;
            let take = (whole - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() < whole {
                return Ok(());
            }
            let go_on = each(Raw { first: self.partial[0], body: &self.partial[header..] });
            self.partial.clear();
            if !go_on {
                return Ok(());
            }
        }
        while !data.is_empty() {
            let Some((header, remaining)) = header(data)? else {
                self.partial.extend_from_slice(data);
                return Ok(());
            };
            let whole = self.check(header, remaining)?;
            if data.len() < whole {
                self.partial.extend_from_slice(data);
                return Ok(());
            }
            if !each(Raw { first: data[0], body: &data[header..whole] }) {
                return Ok(());
            }
            data = &data[whole..];
        }
        Ok(())
    }

    /// The whole size of a packet, if it is not too large.
    fn check(&self, header: usize, remaining: usize) -> Result<usize, FrameError> {
        let whole = header + remaining;
        if self.max.is_some_and(|max| whole > max as usize) {
            return Err(FrameError::TooLarge);
        }
        Ok(whole)
    }
}

/// The fixed header at the start of `b`: its length in bytes and the
/// remaining length it gives; `None` when `b` ends before it does.
fn header(b: &[u8]) -> Result<Option<(usize, usize)>, FrameError> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&byte) = b.get(1 + i) else { return Ok(None) };
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((2 + i, remaining)));
        }
    }
    Err(FrameError::Malformed)
}

#[cfg(test)]
mod tests {
    use mqtt_protocol_core::mqtt::common::Cursor;
    use mqtt_protocol_core::mqtt::connection::{PacketBuildResult, PacketBuilder};
    use mqtt_protocol_core::mqtt::result_code::MqttError;
    use proptest::prelude::*;

    use super::{FrameError, Framer};
    use crate::link::put_varint;

    /// What a stream fed in pieces gives: each packet's first byte and
    /// body, then the error that ended it, if any.
    type Cut = (Vec<(u8, Vec<u8>)>, Option<FrameError>);

    fn ours(max: Option<u32>, pieces: &[&[u8]]) -> Cut {
        let mut framer = Framer::new(max);
        let mut packets = Vec::new();
        for piece in pieces {
            let r = framer.feed(piece, |raw| {
                packets.push((raw.first, raw.body().to_vec()));
                true
            });
            if let Err(e) = r {
                return (packets, Some(e));
            }
        }
        (packets, None)
    }

    /// The codec's framer, the reference.
    fn codec(max: Option<u32>, pieces: &[&[u8]]) -> Cut {
        let mut framer = max.map_or_else(PacketBuilder::new, PacketBuilder::with_maximum_packet_size);
        let mut packets = Vec::new();
        for piece in pieces {
            let mut cursor = Cursor::new(*piece);
            while (cursor.position() as usize) < piece.len() {
                match framer.feed(&mut cursor) {
                    PacketBuildResult::Complete(raw) => {
                        packets.push(((raw.packet_type() << 4) | raw.flags(), raw.data_as_slice().to_vec()))
                    }
                    PacketBuildResult::Incomplete => {}
                    PacketBuildResult::Error(MqttError::PacketTooLarge) => {
                        return (packets, Some(FrameError::TooLarge))
                    }
                    PacketBuildResult::Error(_) => return (packets, Some(FrameError::Malformed)),
                }
            }
        }
        (packets, None)
    }

    /// A stream of packets (some of them with a body of 128 bytes or
    /// more, so a two-byte length), maybe a broken length among them.
    fn stream() -> impl Strategy<Value = Vec<u8>> {
        let packet = (any::<u8>(), prop::collection::vec(any::<u8>(), 0..300)).prop_map(|(first, body)| {
            let mut p = vec![first];
            put_varint(&mut p, body.len());
            p.extend(body);
            p
        });
        let broken = Just(vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01]);
        prop::collection::vec(prop_oneof![10 => packet, 1 => broken], 0..12).prop_map(|ps| ps.concat())
    }

    proptest! {
        /// However the stream is cut into reads, the same packets and the
        /// same error as the codec's framer.
        #[test]
        fn cuts_what_the_codecs_framer_cuts(
            bytes in stream(),
            cuts in prop::collection::vec(0.0..1.0f64, 0..8),
            max in prop::option::of(2u32..400),
        ) {
            let mut at: Vec<usize> = cuts.iter().map(|c| (c * bytes.len() as f64) as usize).collect();
            at.push(0);
            at.push(bytes.len());
            at.sort_unstable();
            let pieces: Vec<&[u8]> = at.windows(2).map(|w| &bytes[w[0]..w[1]]).collect();
            prop_assert_eq!(ours(max, &pieces), codec(max, &pieces));
        }
    }

    /// A packet cut in the middle of its fixed header and of its body
    /// comes out whole, once, and the framer keeps nothing after it.
    #[test]
    fn a_packet_spanning_three_reads_comes_out_whole() {
        let mut body = vec![7u8; 200];
        body[0] = 1;
        let mut stream = vec![0x32];
        put_varint(&mut stream, body.len());
        stream.extend(&body);
        stream.extend([0x40, 2, 0, 9]);
        let (packets, end) = ours(None, &[&stream[..2], &stream[2..100], &stream[100..]]);
        assert_eq!(end, None);
        assert_eq!(packets, vec![(0x32, body), (0x40, vec![0, 9])]);
    }

    /// A packet of exactly the maximum size is taken, one byte more is
    /// too large, as by the codec's framer, whether it comes whole or cut.
    #[test]
    fn the_maximum_packet_size_counts_the_whole_packet() {
        for len in [0usize, 1, 126, 127, 128, 300] {
            let mut packet = vec![0x30];
            put_varint(&mut packet, len);
            packet.extend(vec![5u8; len]);
            let whole = packet.len() as u32;
            for max in [whole - 1, whole, whole + 1] {
                for at in [1, packet.len() / 2, packet.len()] {
                    let pieces: [&[u8]; 2] = [&packet[..at], &packet[at..]];
                    let got = ours(Some(max), &pieces);
                    assert_eq!(got, codec(Some(max), &pieces), "len {len}, max {max}, cut at {at}");
                    assert_eq!(got.1.is_some(), max < whole, "len {len}, max {max}");
                }
            }
        }
    }

    /// After an error the framer keeps nothing of the broken packet: the
    /// next read is cut afresh, as by the codec's framer.
    #[test]
    fn after_an_error_the_next_read_starts_afresh() {
        let broken: &[u8] = &[0x30, 0xff, 0xff];
        let rest: &[u8] = &[0xff, 0xff, 0x01];
        let next: &[u8] = &[0x40, 2, 0, 7];
        let mut framer = Framer::new(None);
        assert_eq!(framer.feed(broken, |_| true), Ok(()));
        assert_eq!(framer.feed(rest, |_| true), Err(FrameError::Malformed));
        let mut got = Vec::new();
        assert_eq!(
            framer.feed(next, |raw| {
                got.push((raw.first, raw.body().to_vec()));
                true
            }),
            Ok(())
        );
        assert_eq!(got, vec![(0x40, vec![0, 7])]);
        let mut codec = PacketBuilder::new();
        for piece in [broken, rest] {
            let mut cursor = Cursor::new(piece);
            let _ = codec.feed(&mut cursor);
        }
        let mut cursor = Cursor::new(next);
        assert!(matches!(codec.feed(&mut cursor), PacketBuildResult::Complete(_)), "the codec starts afresh too");
    }

    /// `each` returning false stops at that packet: the rest of the read
    /// is not looked at.
    #[test]
    fn a_refused_packet_ends_the_read() {
        let mut framer = Framer::new(None);
        let mut seen = 0;
        framer
            .feed(&[0x40, 2, 0, 1, 0x40, 2, 0, 2], |_| {
                seen += 1;
                false
            })
            .unwrap();
        assert_eq!(seen, 1);
    }
}
