//! Keys: validated once at the edge, then trusted inside.

use std::fmt;

/// The longest key, in bytes of UTF-8: long enough for any path-like or
/// composite key, short enough to keep index pages dense.
pub const MAX_KEY_BYTES: usize = 1024;

/// A key inside a bucket: non-empty UTF-8, at most [`MAX_KEY_BYTES`] bytes,
/// no control characters (Unicode category Cc: C0, DEL, C1).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

/// Why a text is not a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidKey {
    #[error("a key must not be empty")]
    Empty,
    #[error("a key is at most {MAX_KEY_BYTES} bytes of UTF-8; this one has {0}")]
    TooLong(usize),
    #[error("a key must not contain control characters (found U+{0:04X})")]
    Control(u32),
    /// `.` or `..`, as the name of a key to write: browsers and HTTP
    /// clients (the kvdb.io one too) take them as path steps, so `DELETE
    /// /B/.` reaches `DELETE /B/`, which deletes the bucket (found by a
    /// review). No such key can be reached without percent-encoding it, so
    /// none is made; one made before can still be read and deleted.
    #[error(
        "a key can't be `.` or `..`: clients take them as steps in the URL's path (a DELETE of the key `.` is a DELETE of the bucket itself); choose another name"
    )]
    Dots,
}

impl Key {
    /// # Errors
    /// The text is empty, too long, or holds a control character.
    pub fn new(s: impl Into<String>) -> Result<Self, InvalidKey> {
        let s = s.into();
        check_key_text(&s)?;
        if s.is_empty() {
            return Err(InvalidKey::Empty);
        }
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// # Errors
    /// A name no key may be written under ([`InvalidKey::Dots`]).
    pub fn check_writable(&self) -> Result<(), InvalidKey> {
        if self.0 == "." || self.0 == ".." {
            return Err(InvalidKey::Dots);
        }
        Ok(())
    }
}

/// The rules of a key, less non-emptiness: what a key prefix must obey.
///
/// # Errors
/// The text is too long or holds a control character.
pub fn check_key_text(s: &str) -> Result<(), InvalidKey> {
    if s.len() > MAX_KEY_BYTES {
        return Err(InvalidKey::TooLong(s.len()));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(InvalidKey::Control(u32::from(c)));
    }
    Ok(())
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_rules() {
        assert!(Key::new("users:1:name").is_ok());
        assert!(Key::new("a/b c ü 😀").is_ok());
        assert_eq!(Key::new(""), Err(InvalidKey::Empty));
        assert_eq!(Key::new("a\nb"), Err(InvalidKey::Control(10)));
        assert_eq!(Key::new("a\u{7f}"), Err(InvalidKey::Control(0x7f)));
        assert_eq!(Key::new("a\u{85}"), Err(InvalidKey::Control(0x85)));
        assert!(Key::new("é".repeat(512)).is_ok(), "1024 bytes is fine");
        assert_eq!(Key::new("é".repeat(513)), Err(InvalidKey::TooLong(1026)));
        let writable = |s: &str| Key::new(s).expect("a key").check_writable();
        assert_eq!(writable("."), Err(InvalidKey::Dots));
        assert_eq!(writable(".."), Err(InvalidKey::Dots));
        assert!(writable("...").is_ok() && writable(".a").is_ok());
    }
}
