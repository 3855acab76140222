//! Byte layouts of the embedded store's records.
//!
//! A key's record: create revision, mod revision, version and lease (0 for
//! none) as little-endian i64s, then the value. A history entry (one
//! revision): per event a kind byte, the key's length (u32) and bytes, the
//! record's length (u32) and the record.

use crate::{Event, EventKind, KeyValue};

const HEAD: usize = 32;

pub fn encode_record(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEAD + kv.value.len());
    for n in [kv.create_revision, kv.mod_revision, kv.version, kv.lease.unwrap_or(0)] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(&kv.value);
    out
}

/// `None` when the bytes are not a record (a corrupt file): callers report
/// it rather than guess.
pub fn decode_record(key: &str, bytes: &[u8]) -> Option<KeyValue> {
    if bytes.len() < HEAD {
        return None;
    }
    let n = |i: usize| i64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Some(KeyValue {
        key: key.to_string(),
        value: bytes[HEAD..].to_vec(),
        create_revision: n(0),
        mod_revision: n(1),
        version: n(2),
        lease: Some(n(3)).filter(|l| *l != 0),
    })
}

pub fn encode_events(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        out.push(match e.kind {
            EventKind::Put => 1,
            EventKind::Delete => 2,
        });
        let record = encode_record(&e.kv);
        for part in [e.kv.key.as_bytes(), &record] {
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
            out.extend_from_slice(part);
        }
    }
    out
}

pub fn decode_events(mut bytes: &[u8]) -> Option<Vec<Event>> {
    let mut events = Vec::new();
    while let Some((&kind, rest)) = bytes.split_first() {
        let (key, rest) = take(rest)?;
        let (record, rest) = take(rest)?;
        let kind = match kind {
            1 => EventKind::Put,
            2 => EventKind::Delete,
            _ => return None,
        };
        let key = std::str::from_utf8(key).ok()?;
        events.push(Event { kind, kv: decode_record(key, record)? });
        bytes = rest;
    }
    Some(events)
}

fn take(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let rest = &bytes[4..];
    Some((rest.get(..len)?, &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_events_round_trip() {
        let kv = KeyValue {
            key: "/a/b".into(),
            value: b"hello".to_vec(),
            create_revision: 3,
            mod_revision: 9,
            version: 4,
            lease: Some(77),
        };
        assert_eq!(decode_record("/a/b", &encode_record(&kv)), Some(kv.clone()));
        let del =
            KeyValue { key: "/x".into(), value: vec![], create_revision: 0, mod_revision: 10, version: 0, lease: None };
        let events = vec![Event { kind: EventKind::Put, kv }, Event { kind: EventKind::Delete, kv: del }];
        assert_eq!(decode_events(&encode_events(&events)), Some(events));
        assert_eq!(decode_events(&[9, 0, 0]), None);
        assert_eq!(decode_record("/k", &[1, 2, 3]), None);
    }
}
