//! Stored values and amounts, typed as API.md describes.

use std::borrow::Cow;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Error;
use crate::wit::kvdb::script::types as wit;

/// A stored value: raw bytes, a 64-bit integer, a 64-bit float or JSON.
///
/// `From` conversions make the common cases short, so [`set`](crate::set)
/// takes any of these as they are. Unlike a Lua string or an untyped HTTP
/// body, raw text is *not* coerced: `"42"` stays text; store `42` (or
/// [`Value::Integer`]) for a number.
///
/// | Rust | stored as |
/// | --- | --- |
/// | `&str`, `String`, `&String`, `Cow<str>` | [`Value::Raw`] (the text's bytes) |
/// | `&[u8]`, `&[u8; N]` (`b"..."`), `Vec<u8>`, `&Vec<u8>` | [`Value::Raw`] |
/// | `i8`, `i16`, `i32`, `i64`, `u8`, `u16`, `u32` | [`Value::Integer`] |
/// | `u64`, `usize`, `isize`, `i128`, `u128` | `TryFrom` only: [`Value::Integer`] if it fits an `i64`, else [`Error::InvalidInput`] (never wrapped or rounded) |
/// | `f32` (widened exactly), `f64` | [`Value::Float`] |
/// | `bool` | [`Value::Json`] `true` / `false` (as Lua's `kvdb.set` stores a boolean) |
/// | `serde_json::Value`, `&serde_json::Value` | [`Value::Json`], its compact text |
/// | any `Serialize` type | [`Value::json`] (or [`set_json`](crate::set_json)) |
///
/// `Display` writes the value as Lua's `tostring` (and so `kvdb.say`) does:
/// integers in decimal, floats as `%.14g` (with `.0` when they look whole),
/// raw bytes as (lossy) UTF-8, JSON as its text.
///
/// # Example
///
/// ```
/// use kvdb_guest::Value;
///
/// assert_eq!(Value::from(41 + 1).as_i64(), Some(42));
/// assert_eq!(Value::from("bob").as_str(), Some("bob"));
/// assert_eq!(Value::Float(0.1 + 0.2).to_string(), "0.3");
/// assert_eq!(Value::Float(3.0).to_string(), "3.0");
/// ```
///
/// Text and bytes, borrowed or owned:
///
/// ```
/// use std::borrow::Cow;
/// use kvdb_guest::Value;
///
/// let name = String::from("bob");
/// assert_eq!(Value::from(&name), Value::Raw(b"bob".to_vec()));
/// assert_eq!(Value::from(Cow::Borrowed("bob")), Value::from(name));
/// assert_eq!(Value::from(b"\x00\x01"), Value::Raw(vec![0, 1]));
/// assert_eq!(Value::from(&vec![7u8]), Value::Raw(vec![7]));
/// ```
///
/// Numbers: small integers and `f32` convert directly; `u64`, `usize`,
/// `isize`, `i128` and `u128` go through `TryFrom`, whose error is this
/// crate's [`Error`], so `?` works in a function answering it:
///
/// ```
/// use kvdb_guest::{Error, Value};
///
/// assert_eq!(Value::from(7u8), Value::Integer(7));
/// assert_eq!(Value::from(-7i16), Value::Integer(-7));
/// assert_eq!(Value::from(0.5f32), Value::Float(0.5));
///
/// let items = vec!["a", "b"];
/// assert_eq!(Value::try_from(items.len())?, Value::Integer(2));
/// assert!(matches!(Value::try_from(u64::MAX), Err(Error::InvalidInput(_))));
/// # Ok::<(), Error>(())
/// ```
///
/// Booleans and JSON:
///
/// ```
/// use kvdb_guest::Value;
///
/// assert_eq!(Value::from(true), Value::Json("true".into()));
/// let doc = serde_json::json!({"name": "bob", "tags": ["a"]});
/// assert_eq!(Value::from(&doc), Value::Json(r#"{"name":"bob","tags":["a"]}"#.into()));
/// ```
///
/// So with the data functions:
///
/// ```no_run
/// let name = String::from("bob");
/// kvdb_guest::set("users:1:name", &name)?;
/// kvdb_guest::set("users:1:admin", false)?;
/// kvdb_guest::set("users:1:tags", serde_json::json!(["a", "b"]))?;
/// kvdb_guest::set("users:count", kvdb_guest::Value::try_from(3usize)?)?;
/// # Ok::<(), kvdb_guest::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Raw bytes (text or binary).
    Raw(Vec<u8>),
    /// A 64-bit integer.
    Integer(i64),
    /// A 64-bit float.
    Float(f64),
    /// A JSON document, as text.
    Json(String),
}

impl Value {
    /// Serializes `value` as a JSON value.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] if `value` can't be written as JSON (a map
    /// with non-string keys, say).
    ///
    /// # Example
    ///
    /// ```
    /// let v = kvdb_guest::Value::json(&["a", "b"]).unwrap();
    /// assert_eq!(v, kvdb_guest::Value::Json(r#"["a","b"]"#.into()));
    /// ```
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Value, Error> {
        Ok(Value::Json(serde_json::to_string(value)?))
    }

    /// The integer, if this is one.
    ///
    /// # Example
    ///
    /// ```
    /// assert_eq!(kvdb_guest::Value::Integer(7).as_i64(), Some(7));
    /// assert_eq!(kvdb_guest::Value::Float(7.0).as_i64(), None);
    /// ```
    #[must_use]
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Integer(i) => Some(*i),
            _ => None,
        }
    }

    /// The number as a float, if this is an integer or a float.
    ///
    /// # Example
    ///
    /// ```
    /// assert_eq!(kvdb_guest::Value::Integer(2).as_f64(), Some(2.0));
    /// assert_eq!(kvdb_guest::Value::Float(2.5).as_f64(), Some(2.5));
    /// ```
    #[must_use]
    #[allow(clippy::cast_precision_loss)] // as Lua converts integers to floats
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Integer(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// The text of a raw value that is valid UTF-8, or of a JSON value.
    ///
    /// # Example
    ///
    /// ```
    /// use kvdb_guest::Value;
    ///
    /// assert_eq!(Value::from("hi").as_str(), Some("hi"));
    /// assert_eq!(Value::Json("[1]".into()).as_str(), Some("[1]"));
    /// assert_eq!(Value::Raw(vec![0xff]).as_str(), None);
    /// assert_eq!(Value::Integer(1).as_str(), None);
    /// ```
    #[must_use]
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Raw(bytes) => std::str::from_utf8(bytes).ok(),
            Value::Json(text) => Some(text),
            _ => None,
        }
    }

    /// The bytes of a raw value, or the text of a JSON value.
    ///
    /// # Example
    ///
    /// ```
    /// assert_eq!(kvdb_guest::Value::from(&b"\x00\x01"[..]).as_bytes(), Some(&b"\x00\x01"[..]));
    /// ```
    #[must_use]
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Raw(bytes) => Some(bytes),
            Value::Json(text) => Some(text.as_bytes()),
            _ => None,
        }
    }

    /// Whether this is a JSON value.
    ///
    /// # Example
    ///
    /// ```
    /// assert!(kvdb_guest::Value::Json("{}".into()).is_json());
    /// ```
    #[must_use]
    pub fn is_json(&self) -> bool {
        matches!(self, Value::Json(_))
    }

    /// Deserializes the value: JSON and raw text as JSON text, numbers as
    /// JSON numbers.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] if the value is not the JSON `T` expects.
    ///
    /// # Example
    ///
    /// ```
    /// use kvdb_guest::Value;
    ///
    /// let names: Vec<String> = Value::Json(r#"["ann","bob"]"#.into()).parse_json().unwrap();
    /// assert_eq!(names, ["ann", "bob"]);
    /// assert_eq!(Value::Integer(3).parse_json::<u8>().unwrap(), 3);
    /// ```
    pub fn parse_json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        Ok(match self {
            Value::Raw(bytes) => serde_json::from_slice(bytes)?,
            Value::Json(text) => serde_json::from_str(text)?,
            Value::Integer(i) => serde_json::from_value((*i).into())?,
            Value::Float(f) => serde_json::from_value((*f).into())?,
        })
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Raw(bytes) => f.write_str(&String::from_utf8_lossy(bytes)),
            Value::Integer(i) => write!(f, "{i}"),
            Value::Float(x) => f.write_str(&lua_float(*x)),
            Value::Json(text) => f.write_str(text),
        }
    }
}

/// A float as Lua 5.4's `tostring`: C's `%.14g`, plus `.0` when the result
/// looks like an integer.
fn lua_float(x: f64) -> String {
    if x.is_nan() {
        return if x.is_sign_negative() { "-nan" } else { "nan" }.into();
    }
    if x.is_infinite() {
        return if x < 0.0 { "-inf" } else { "inf" }.into();
    }
    // 14 significant digits; the exponent after rounding picks the style.
    let sci = format!("{x:.13e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let mut out = if (-4..14).contains(&exp) {
        let decimals = usize::try_from(13 - exp).unwrap_or(0);
        trim_zeros(&format!("{x:.decimals$}")).to_owned()
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim_zeros(mantissa), exp.unsigned_abs())
    };
    if out.bytes().all(|b| b == b'-' || b.is_ascii_digit()) {
        out.push_str(".0");
    }
    out
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

impl From<&str> for Value {
    /// Raw text.
    fn from(s: &str) -> Self {
        Value::Raw(s.as_bytes().to_vec())
    }
}

impl From<String> for Value {
    /// Raw text.
    fn from(s: String) -> Self {
        Value::Raw(s.into_bytes())
    }
}

impl From<&String> for Value {
    /// Raw text.
    fn from(s: &String) -> Self {
        Value::from(s.as_str())
    }
}

impl From<Cow<'_, str>> for Value {
    /// Raw text.
    fn from(s: Cow<'_, str>) -> Self {
        Value::from(s.into_owned())
    }
}

impl From<&[u8]> for Value {
    /// Raw bytes.
    fn from(b: &[u8]) -> Self {
        Value::Raw(b.to_vec())
    }
}

impl<const N: usize> From<&[u8; N]> for Value {
    /// Raw bytes (a byte string literal, `b"..."`).
    fn from(b: &[u8; N]) -> Self {
        Value::Raw(b.to_vec())
    }
}

impl From<Vec<u8>> for Value {
    /// Raw bytes.
    fn from(b: Vec<u8>) -> Self {
        Value::Raw(b)
    }
}

impl From<&Vec<u8>> for Value {
    /// Raw bytes.
    fn from(b: &Vec<u8>) -> Self {
        Value::Raw(b.clone())
    }
}

/// Integer types that always fit an `i64`: `From` for [`Value`] and
/// [`Number`].
macro_rules! from_integer {
    ($($t:ty),*) => {$(
        impl From<$t> for Value {
            /// An integer.
            fn from(i: $t) -> Self {
                Value::Integer(i.into())
            }
        }

        impl From<$t> for Number {
            /// An integer.
            fn from(i: $t) -> Self {
                Number::Integer(i.into())
            }
        }
    )*};
}

from_integer!(i8, i16, i32, i64, u8, u16, u32);

/// Integer types that may not fit an `i64`: `TryFrom` for [`Value`] and
/// [`Number`], failing with [`Error::InvalidInput`] rather than wrapping or
/// rounding.
macro_rules! try_from_integer {
    ($($t:ty),*) => {$(
        impl TryFrom<$t> for Value {
            type Error = Error;

            /// An integer, if it fits an `i64`.
            fn try_from(i: $t) -> Result<Self, Error> {
                Ok(Value::Integer(fit(i)?))
            }
        }

        impl TryFrom<$t> for Number {
            type Error = Error;

            /// An integer, if it fits an `i64`.
            fn try_from(i: $t) -> Result<Self, Error> {
                Ok(Number::Integer(fit(i)?))
            }
        }
    )*};
}

try_from_integer!(u64, usize, isize, i128, u128);

/// `i` as an `i64`, or why not.
fn fit<T: TryInto<i64> + Copy + std::fmt::Display>(i: T) -> Result<i64, Error> {
    i.try_into().map_err(|_| {
        Error::InvalidInput(format!(
            "{i} does not fit a 64-bit signed integer (at most {})",
            i64::MAX
        ))
    })
}

impl From<f64> for Value {
    /// A float.
    fn from(f: f64) -> Self {
        Value::Float(f)
    }
}

impl From<f32> for Value {
    /// A float, widened exactly to an `f64`.
    fn from(f: f32) -> Self {
        Value::Float(f.into())
    }
}

impl From<bool> for Value {
    /// JSON `true` or `false`, as Lua's `kvdb.set` stores a boolean.
    fn from(b: bool) -> Self {
        Value::Json(b.to_string())
    }
}

impl From<serde_json::Value> for Value {
    /// A JSON value, as its compact text.
    fn from(v: serde_json::Value) -> Self {
        Value::Json(v.to_string())
    }
}

impl From<&serde_json::Value> for Value {
    /// A JSON value, as its compact text.
    fn from(v: &serde_json::Value) -> Self {
        Value::Json(v.to_string())
    }
}

impl Value {
    /// The SDK's value of one the bindings answered.
    pub(crate) fn from_wit(v: wit::Value) -> Self {
        match v {
            wit::Value::Raw(b) => Value::Raw(b),
            wit::Value::Integer(i) => Value::Integer(i),
            wit::Value::Float(f) => Value::Float(f),
            wit::Value::Json(t) => Value::Json(t),
        }
    }
}

impl From<Value> for wit::Value {
    fn from(v: Value) -> Self {
        match v {
            Value::Raw(b) => wit::Value::Raw(b),
            Value::Integer(i) => wit::Value::Integer(i),
            Value::Float(f) => wit::Value::Float(f),
            Value::Json(t) => wit::Value::Json(t),
        }
    }
}

/// An amount to add with [`incr`](crate::incr): an integer or a float.
///
/// Integer literals convert directly, so `incr(key, 1)` adds the integer 1.
/// As for [`Value`]: `i8` to `i64`, `u8` to `u32`, `f32` and `f64` convert
/// with `From`; `u64`, `usize`, `isize`, `i128` and `u128` with `TryFrom`,
/// failing with [`Error::InvalidInput`] beyond an `i64` (never wrapped or
/// rounded).
///
/// # Example
///
/// ```
/// use kvdb_guest::Number;
///
/// assert_eq!(Number::from(1), Number::Integer(1));
/// assert_eq!(Number::from(0.5), Number::Float(0.5));
/// assert_eq!(Number::from(3u8), Number::Integer(3));
/// assert_eq!(Number::from(0.25f32), Number::Float(0.25));
/// assert_eq!(Number::try_from(5usize)?, Number::Integer(5));
/// assert!(Number::try_from(u64::MAX).is_err());
/// # Ok::<(), kvdb_guest::Error>(())
/// ```
///
/// ```no_run
/// let added: usize = 3;
/// kvdb_guest::incr("items", kvdb_guest::Number::try_from(added)?)?;
/// # Ok::<(), kvdb_guest::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    /// A 64-bit integer.
    Integer(i64),
    /// A 64-bit float.
    Float(f64),
}

impl From<f64> for Number {
    /// A float.
    fn from(f: f64) -> Self {
        Number::Float(f)
    }
}

impl From<f32> for Number {
    /// A float, widened exactly to an `f64`.
    fn from(f: f32) -> Self {
        Number::Float(f.into())
    }
}

impl From<Number> for wit::Number {
    fn from(n: Number) -> Self {
        match n {
            Number::Integer(i) => wit::Number::Integer(i),
            Number::Float(f) => wit::Number::Float(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Value, lua_float};

    #[test]
    fn floats_print_as_lua_tostring() {
        for (x, lua) in [
            (0.1 + 0.2, "0.3"),
            (3.0, "3.0"),
            (-2.5, "-2.5"),
            (1e15, "1e+15"),
            (1e14, "1e+14"),
            (123_456_789_012.0, "123456789012.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.0 / 3.0, "0.33333333333333"),
            (f64::INFINITY, "inf"),
            (-0.0, "-0.0"),
        ] {
            assert_eq!(lua_float(x), lua, "{x}");
        }
    }

    #[test]
    fn integers_and_text_print_plainly() {
        assert_eq!(Value::Integer(-12).to_string(), "-12");
        assert_eq!(Value::from("a\u{e9}").to_string(), "a\u{e9}");
        assert_eq!(Value::Json(r#"{"a":1}"#.into()).to_string(), r#"{"a":1}"#);
    }
}
