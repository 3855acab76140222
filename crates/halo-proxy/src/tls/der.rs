//! The two things halo reads from a certificate itself: the DNS names it
//! is for (subjectAltName) and when it expires (notAfter). A small DER
//! walk over RFC 5280's structure; anything unexpected is an error, never
//! a panic.

/// One DER element: tag, contents, and the rest after it.
fn element(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
/// subjectAltName, 2.5.29.17.
const SAN_OID: &[u8] = &[0x55, 0x1D, 0x11];

/// The fields of the to-be-signed certificate, in order.
fn tbs_fields(cert: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let (tag, cert, _) = element(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, mut tbs, _) = element(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut fields = Vec::new();
    while !tbs.is_empty() {
        let (tag, body, rest) = element(tbs)?;
        fields.push((tag, body));
        tbs = rest;
    }
    Some(fields)
}

/// notAfter as seconds since the Unix epoch.
pub fn not_after(cert: &[u8]) -> Option<i64> {
    let fields = tbs_fields(cert)?;
    // version [0] is optional; validity is the SEQUENCE after serial,
    // signature algorithm and issuer.
    let skip = usize::from(fields.first()?.0 == 0xA0);
    let (tag, validity) = *fields.get(skip + 3)?;
    if tag != SEQUENCE {
        return None;
    }
    let (_, _, rest) = element(validity)?;
    let (tag, time, _) = element(rest)?;
    parse_time(tag, time)
}

/// UTCTime (YYMMDDHHMMSSZ) or GeneralizedTime (YYYYMMDDHHMMSSZ).
fn parse_time(tag: u8, t: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(t).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 if s.len() == 12 => {
            let yy: i64 = s[..2].parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &s[2..])
        }
        0x18 if s.len() == 14 => (s[..4].parse().ok()?, &s[4..]),
        _ => return None,
    };
    let num = |i: usize| rest.get(i..i + 2)?.parse::<i64>().ok();
    let (month, day, h, m, sec) = (num(0)?, num(2)?, num(4)?, num(6)?, num(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The DNS names of the subjectAltName extension, lower-cased.
pub fn dns_names(cert: &[u8]) -> Option<Vec<String>> {
    let fields = tbs_fields(cert)?;
    let Some((_, exts)) = fields.iter().find(|(tag, _)| *tag == 0xA3) else { return Some(Vec::new()) };
    let (_, mut exts, _) = element(exts)?;
    while !exts.is_empty() {
        let (_, ext, rest) = element(exts)?;
        exts = rest;
        let (_, oid, mut after) = element(ext)?;
        if oid != SAN_OID {
            continue;
        }
        // critical BOOLEAN is optional.
        let (mut tag, mut value, rest) = element(after)?;
        if tag == 0x01 {
            after = rest;
            (tag, value, _) = element(after)?;
        }
        if tag != 0x04 {
            return None;
        }
        let (_, mut names, _) = element(value)?;
        let mut out = Vec::new();
        while !names.is_empty() {
            let (tag, name, rest) = element(names)?;
            names = rest;
            // dNSName [2] IMPLICIT IA5String
            if tag == 0x82 {
                out.push(std::str::from_utf8(name).ok()?.to_ascii_lowercase());
            }
        }
        return Some(out);
    }
    Some(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days_match_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(parse_time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(parse_time(0x18, b"20260101000000Z"), Some(1_767_225_600));
        assert_eq!(parse_time(0x17, b"bad"), None);
    }

    #[test]
    fn truncated_or_garbage_input_is_none() {
        for b in [&[][..], &[0x30], &[0x30, 0x85, 1, 1, 1, 1, 1], &[0x30, 0x05, 0x30, 0x01]] {
            assert_eq!(not_after(b), None);
            assert_eq!(dns_names(b), None);
        }
    }
}
