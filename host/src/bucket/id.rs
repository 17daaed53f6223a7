//! Bucket ids: random UUID v4s, written as 22 base62 characters.

use std::fmt;
use std::str::FromStr;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// 62^22 > 2^128, so every id fits in 22 digits; ids are zero-padded to it.
const LEN: usize = 22;

/// A bucket id. Its text form is fixed-width base62, so ids sort and compare
/// as strings and never contain characters a URL would need to escape.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketId(u128);

impl BucketId {
    /// A fresh random id (a UUID v4).
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4().as_u128())
    }

    /// The 16 bytes that prefix all of this bucket's storage keys.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }
}

impl fmt::Display for BucketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut digits = [b'0'; LEN];
        let mut n = self.0;
        for d in digits.iter_mut().rev() {
            *d = ALPHABET[(n % 62) as usize];
            n /= 62;
        }
        // The alphabet is ASCII, so the digits are valid UTF-8.
        f.write_str(std::str::from_utf8(&digits).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for BucketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BucketId({self})")
    }
}

/// The text is not a bucket id; callers answer it like an unknown bucket.
#[derive(Debug, thiserror::Error)]
#[error("not a bucket id")]
pub struct InvalidBucketId;

impl FromStr for BucketId {
    type Err = InvalidBucketId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != LEN {
            return Err(InvalidBucketId);
        }
        let mut n: u128 = 0;
        for c in s.bytes() {
            let d = match c {
                b'0'..=b'9' => c - b'0',
                b'A'..=b'Z' => c - b'A' + 10,
                b'a'..=b'z' => c - b'a' + 36,
                _ => return Err(InvalidBucketId),
            };
            n = n
                .checked_mul(62)
                .and_then(|n| n.checked_add(u128::from(d)))
                .ok_or(InvalidBucketId)?;
        }
        Ok(Self(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips_and_is_22_chars() {
        for _ in 0..100 {
            let id = BucketId::random();
            let s = id.to_string();
            assert_eq!(s.len(), 22);
            assert_eq!(s.parse::<BucketId>().expect("parses"), id);
        }
        assert_eq!(BucketId(0).to_string(), "0".repeat(22));
        assert_eq!(
            BucketId(u128::MAX)
                .to_string()
                .parse::<BucketId>()
                .expect("max"),
            BucketId(u128::MAX)
        );
    }

    #[test]
    fn other_text_is_not_an_id() {
        for s in [
            "",
            "abc",
            "zzzzzzzzzzzzzzzzzzzzzz",
            "_admin",
            "0000000000000000000000x",
            "000000000000000000000-",
        ] {
            assert!(s.parse::<BucketId>().is_err(), "{s}");
        }
    }
}
