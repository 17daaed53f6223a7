//! Typed values: how bytes from a client become a typed value, how a value is
//! stored (a kind tag and bytes), shown and changed by atomic operations.
//!
//! Pure logic: no storage, no HTTP.

use serde_json::Value as Json;

const KIND_RAW: u8 = 0;
const KIND_INT: u8 = 1;
const KIND_FLOAT: u8 = 2;
const KIND_JSON: u8 = 3;
/// Raw bytes with the media type they were sent with: `[len:u8][type][bytes]`.
const KIND_RAW_TYPED: u8 = 4;

/// Longest media type kept with a raw value (RFC 6838 caps the parts at 127
/// characters each).
const MAX_MEDIA_TYPE: usize = 255;

/// How a float is written (a `GET`, the stored text): the shortest digits
/// that read back as the same float, in exponent form outside
/// `1e-6 <= |f| < 1e21` as JavaScript writes numbers (`1e-300`, not 302
/// characters of `0.000…1`; found by a review).
fn float_text(f: f64) -> String {
    let magnitude = f.abs();
    if magnitude == 0.0 || (1e-6..1e21).contains(&magnitude) {
        f.to_string()
    } else {
        format!("{f:e}")
    }
}

/// How many characters `i` takes in decimal (counted, not written out: a
/// `PATCH +1` checks its result's size).
fn decimal_len(i: i64) -> usize {
    let mut rest = i.unsigned_abs();
    let mut len = usize::from(i < 0) + 1;
    while rest >= 10 {
        rest /= 10;
        len += 1;
    }
    len
}

/// A stored value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Bytes, with the media type they were sent with, if they came with one.
    Raw {
        bytes: Vec<u8>,
        media_type: Option<String>,
    },
    Int(i64),
    Float(f64),
    /// A number sent as text that is not its canonical form (`007`, `1.0`,
    /// `42\n`, an integer beyond 64 bits): it counts as the number, and reads
    /// back byte for byte until an operation replaces it.
    Number {
        number: Number,
        text: String,
    },
    /// Valid JSON text, kept as sent.
    Json(Vec<u8>),
}

/// A number in an atomic operation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    Int(i64),
    Float(f64),
}

/// How a write's body is to be typed, from its `Content-Type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Typing {
    /// No type given (or text/plain, or a form type): coerce.
    Coerce,
    /// `application/json`: must be valid JSON.
    Json,
    /// Any other media type: raw bytes that keep it.
    Raw(String),
}

/// A media type's essence (`type/subtype`, RFC 9110): what comes before
/// its parameters, trimmed and lower-cased. `Text/Plain; charset=utf-8`
/// is `text/plain`.
pub fn media_essence(media_type: &str) -> String {
    media_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

impl Typing {
    /// The typing a `Content-Type` header asks for. Parameters such as
    /// `charset` do not change it.
    ///
    /// # Errors
    /// A media type to keep whose essence is not `type/subtype`, or one
    /// longer than the 255 characters kept with a value.
    pub fn from_content_type(content_type: Option<&str>) -> Result<Self, BadMediaType> {
        let Some(ct) = content_type else {
            return Ok(Self::Coerce);
        };
        let essence = media_essence(ct);
        Ok(match essence.as_str() {
            // A form as `curl -d` sends it; `multipart/form-data` (`curl -F`)
            // is raw bytes like any other type, kept with its boundary,
            // without which the parts can't be told apart.
            "" | "text/plain" | "application/x-www-form-urlencoded" => Self::Coerce,
            "application/json" => Self::Json,
            _ => {
                let media_type = ct.trim();
                if media_type.len() > MAX_MEDIA_TYPE {
                    return Err(BadMediaType::TooLong(media_type.len()));
                }
                // Kept and served back with the value: `garbage` would be
                // answered as a Content-Type no client can read.
                // The essence by mime, the parameters by RFC 9110's grammar:
                // mime reads them more strictly (no space before `;`, no
                // `""`), and they are kept as sent (found by a review).
                let (essence, parameters) =
                    media_type.split_at(media_type.find(';').unwrap_or(media_type.len()));
                let why = match essence.trim().parse::<mime::Mime>() {
                    Err(e) => Some(e.to_string()),
                    // mime reads `image/` as a type with an empty subtype.
                    Ok(m) if m.subtype().as_str().is_empty() => Some("no subtype".into()),
                    Ok(m) if m.type_() == mime::STAR || m.subtype() == mime::STAR => {
                        Some("a value has one media type, not a pattern with `*`".into())
                    }
                    Ok(_) => check_parameters(parameters).err(),
                };
                if let Some(why) = why {
                    return Err(BadMediaType::Malformed {
                        given: media_type.to_owned(),
                        why,
                    });
                }
                Self::Raw(media_type.to_owned())
            }
        })
    }
}

/// Whether `text` is a media type's parameters as RFC 9110 writes them:
/// `*( OWS ";" OWS [ token "=" ( token / quoted-string ) ] )`. An unclosed
/// quote or a parameter without a name was kept and served back (found by a
/// review: `a/b; charset="`).
fn check_parameters(text: &str) -> Result<(), String> {
    let is_tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    fn ows(s: &str) -> &str {
        s.trim_start_matches([' ', '\t'])
    }
    let mut rest = ows(text);
    while !rest.is_empty() {
        let Some(after) = rest.strip_prefix(';') else {
            return Err(format!("expected `;` before {rest:?}"));
        };
        rest = ows(after);
        if rest.is_empty() || rest.starts_with(';') {
            continue;
        }
        let name_end = rest.find(|c| !is_tchar(c)).unwrap_or(rest.len());
        let name = &rest[..name_end];
        if name.is_empty() {
            return Err(format!("a parameter has no name before {rest:?}"));
        }
        let Some(value) = rest[name_end..].strip_prefix('=') else {
            return Err(format!("the parameter {name:?} has no `=value`"));
        };
        let value_end = if let Some(quoted) = value.strip_prefix('"') {
            // A quoted-string: up to the first unescaped quote.
            let mut escaped = false;
            let close = quoted.char_indices().find(|&(_, c)| {
                let closes = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                closes
            });
            match close {
                Some((i, _)) => 1 + i + 1,
                None => return Err(format!("the quoted value of {name:?} is not closed")),
            }
        } else {
            let end = value.find(|c| !is_tchar(c)).unwrap_or(value.len());
            if end == 0 {
                return Err(format!("the parameter {name:?} has an empty value"));
            }
            end
        };
        rest = ows(&value[value_end..]);
    }
    Ok(())
}

/// A value that can't be stored as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("the body is not valid JSON: {0}")]
    InvalidJson(String),
}

/// A `Content-Type` that can't be kept with a raw value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadMediaType {
    /// Longer than a value keeps (its length).
    #[error(
        "the Content-Type is {0} bytes long; a value keeps a media type of at most 255 (RFC 6838 allows 127 for each of its two names)"
    )]
    TooLong(usize),
    /// Not a media type.
    #[error(
        "the Content-Type {given:?} is not a media type ({why}): send type/subtype with optional `; name=value` parameters, e.g. `application/octet-stream` or `text/csv; charset=utf-8`, or none at all to have the value typed from its text"
    )]
    Malformed { given: String, why: String },
}

/// An operand (a step, a bound) that can't be used as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OperandError {
    #[error("the operand must be a number")]
    NotANumber,
    /// Read as a float it would silently turn an integer counter into a
    /// float instead of overflowing it, so it is refused with the fix.
    #[error(
        "{0} is a whole number outside the 64-bit integer range (-9223372036854775808 to 9223372036854775807): to use it as a float, write it with an exponent (e.g. 1e20)"
    )]
    OutOfRange(String),
}

/// An atomic operation that does not apply to the current value (409).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpConflict {
    #[error("the current value is {0}, not a number")]
    NotANumber(&'static str),
    #[error("the result overflows a 64-bit integer")]
    Overflow,
    #[error("the result is not a finite number")]
    NotFinite,
    #[error("the current value is {0}, not JSON")]
    NotJson(&'static str),
    #[error("the current value is {0}; only raw values can be appended to")]
    NotRaw(&'static str),
    #[error("the JSON patch does not apply: {0}")]
    Patch(String),
    /// Any of the others, as a caller who may not read the value learns it:
    /// what is wrong would describe the value.
    #[error(
        "the operation does not apply to the current value (this credential may not read the value, so the error says no more)"
    )]
    Withheld,
}

/// JSON text that every reader of a JSON value takes (`serde_json::Value`:
/// the listing, merge and JSON patch), checked without building it.
/// `serde::de::IgnoredAny` skips numbers and escapes unchecked, so that a
/// number out of range (`[1e400]`) or a lone surrogate (`["\ud800"]`) was
/// stored as JSON that no reader could read (found by a review).
struct ReadableJson;

impl<'de> serde::Deserialize<'de> for ReadableJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ReadableJson)
    }
}

impl<'de> serde::de::Visitor<'de> for ReadableJson {
    type Value = Self;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<Self>()?.is_some() {}
        Ok(self)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        while map.next_entry::<Self, Self>()?.is_some() {}
        Ok(self)
    }
}

fn parse_number(text: &str) -> Option<Number> {
    let t = text.trim();
    if let Ok(i) = t.parse::<i64>() {
        return Some(Number::Int(i));
    }
    // Only decimal notation: Rust would also accept "inf", "NaN", "infinity".
    let numeric = !t.is_empty()
        && t.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
        && t.bytes().any(|b| b.is_ascii_digit());
    if numeric
        && let Ok(f) = t.parse::<f64>()
        && f.is_finite()
    {
        return Some(Number::Float(f));
    }
    None
}

impl Number {
    /// Parses an operand of an atomic operation (a step, a bound) such as
    /// `+1`, `-2.5`, `10`, as a number's text is read, but a whole number written without a fraction or
    /// exponent must fit in 64 bits.
    ///
    /// # Errors
    /// Text that is not a number, or a whole number outside the `i64` range.
    pub fn parse_operand(text: &str) -> Result<Self, OperandError> {
        let t = text.trim();
        let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
        if !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && t.parse::<i64>().is_err()
        {
            return Err(OperandError::OutOfRange(t.to_owned()));
        }
        parse_number(t).ok_or(OperandError::NotANumber)
    }

    /// Whether the number is larger than `bound` in magnitude.
    pub fn exceeds(self, bound: i64) -> bool {
        match self {
            Number::Int(i) => i.unsigned_abs() > bound.unsigned_abs(),
            #[allow(clippy::cast_precision_loss)]
            Number::Float(f) => f.abs() > bound.unsigned_abs() as f64,
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            // A mixed int/float sum is a float, as in any JSON client.
            #[allow(clippy::cast_precision_loss)]
            Number::Int(i) => i as f64,
            Number::Float(f) => f,
        }
    }

    /// The exact order of two numbers: integers are compared as integers
    /// (not through `f64`, which can't tell 2^53 + 1 from 2^53), and an
    /// integer and a float by value.
    fn cmp_exact(self, other: Self) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        // `i as f64` rounds monotonically, so a strict inequality between
        // the rounded integer and a float holds for the integer itself; only
        // equality needs a second look, and then the float is integral and
        // within the i64 range.
        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
        fn int_vs_float(i: i64, f: f64) -> Ordering {
            match (i as f64).partial_cmp(&f) {
                Some(Ordering::Equal) => i128::from(i).cmp(&(f as i128)),
                Some(order) => order,
                None => Ordering::Equal,
            }
        }
        match (self, other) {
            (Number::Int(a), Number::Int(b)) => a.cmp(&b),
            (Number::Float(a), Number::Float(b)) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
            (Number::Int(a), Number::Float(b)) => int_vs_float(a, b),
            (Number::Float(a), Number::Int(b)) => int_vs_float(b, a).reverse(),
        }
    }

    fn into_value(self) -> Value {
        match self {
            Number::Int(i) => Value::Int(i),
            Number::Float(f) => Value::Float(f),
        }
    }

    /// The number as sent in `text`: canonical text becomes a plain number,
    /// anything else keeps its text.
    fn with_text(self, text: &str) -> Value {
        let canonical = match self {
            Number::Int(i) => i.to_string(),
            Number::Float(f) => float_text(f),
        };
        if canonical == text {
            self.into_value()
        } else {
            Value::Number {
                number: self,
                text: text.to_owned(),
            }
        }
    }

    fn to_json(self) -> Json {
        match self {
            Number::Int(i) => Json::from(i),
            Number::Float(f) => Json::from(f),
        }
    }
}

impl Value {
    /// Types a write's body as API.md says: an explicit type is obeyed;
    /// otherwise an integer, else a float, else a JSON object or array, else raw.
    ///
    /// # Errors
    /// `application/json` with a body that is not JSON.
    pub fn from_body(body: &[u8], typing: &Typing) -> Result<Self, ValueError> {
        match typing {
            Typing::Raw(media_type) => Ok(Self::Raw {
                bytes: body.to_vec(),
                media_type: Some(media_type.clone()),
            }),
            Typing::Json => {
                // Checked without building the document: a whole
                // `serde_json::Value` takes up to 16 times the text (found
                // by a review: a PUT of 12 MB of `[0,0,…]` grew the server
                // by 425 MB).
                serde_json::from_slice::<ReadableJson>(body)
                    .map_err(|e| ValueError::InvalidJson(e.to_string()))?;
                // A JSON number is a number: it can be counted with PATCH.
                let Ok(n) = serde_json::from_slice::<serde_json::Number>(body) else {
                    return Ok(Self::Json(body.to_vec()));
                };
                let text = String::from_utf8_lossy(body);
                Ok(match n.as_i64() {
                    Some(i) => Number::Int(i).with_text(&text),
                    None => n.as_f64().map_or_else(
                        || Self::Json(body.to_vec()),
                        |f| Number::Float(f).with_text(&text),
                    ),
                })
            }
            Typing::Coerce => Ok(Self::coerce(body)),
        }
    }

    fn coerce(body: &[u8]) -> Self {
        if let Ok(text) = std::str::from_utf8(body) {
            if let Some(n) = parse_number(text) {
                return n.with_text(text);
            }
            let t = text.trim_start();
            if (t.starts_with('{') || t.starts_with('['))
                && serde_json::from_str::<ReadableJson>(text).is_ok()
            {
                return Self::Json(body.to_vec());
            }
        }
        Self::Raw {
            bytes: body.to_vec(),
            media_type: None,
        }
    }

    /// A JSON document as a value.
    pub fn from_json(json: &Json) -> Self {
        match json {
            Json::Number(n) => match n.as_i64() {
                Some(i) => Self::Int(i),
                None => n
                    .as_f64()
                    .map_or_else(|| Self::Json(json.to_string().into_bytes()), Self::Float),
            },
            _ => Self::Json(json.to_string().into_bytes()),
        }
    }

    /// The storage form: a kind tag and bytes.
    pub fn encode(&self) -> (u8, Vec<u8>) {
        match self {
            Value::Raw {
                bytes,
                media_type: None,
            } => (KIND_RAW, bytes.clone()),
            Value::Raw {
                bytes,
                media_type: Some(mt),
            } => {
                let mt = &mt.as_bytes()[..mt.len().min(MAX_MEDIA_TYPE)];
                let mut out = Vec::with_capacity(1 + mt.len() + bytes.len());
                // MAX_MEDIA_TYPE fits in a byte.
                out.push(u8::try_from(mt.len()).unwrap_or(u8::MAX));
                out.extend_from_slice(mt);
                out.extend_from_slice(bytes);
                (KIND_RAW_TYPED, out)
            }
            Value::Int(i) => (KIND_INT, i.to_string().into_bytes()),
            Value::Float(f) => (KIND_FLOAT, float_text(*f).into_bytes()),
            Value::Number {
                number: Number::Int(_),
                text,
            } => (KIND_INT, text.clone().into_bytes()),
            Value::Number {
                number: Number::Float(_),
                text,
            } => (KIND_FLOAT, text.clone().into_bytes()),
            Value::Json(j) => (KIND_JSON, j.clone()),
        }
    }

    /// [`Value::encode`], taking the value: its bytes are moved, not copied,
    /// where the storage form is the bytes themselves (untyped raw bytes and
    /// JSON), so that a large value is not held twice.
    pub fn into_encoded(self) -> (u8, Vec<u8>) {
        match self {
            Value::Raw {
                bytes,
                media_type: None,
            } => (KIND_RAW, bytes),
            Value::Json(j) => (KIND_JSON, j),
            other => other.encode(),
        }
    }

    /// The value from its storage form. Unreadable data becomes raw bytes
    /// rather than an error: the bytes are still the user's.
    pub fn decode(kind: u8, bytes: Vec<u8>) -> Self {
        let text = std::str::from_utf8(&bytes).ok();
        match kind {
            KIND_INT => {
                if let Some(t) = text
                    && let Ok(i) = t.trim().parse::<i64>()
                {
                    return Number::Int(i).with_text(t);
                }
            }
            KIND_FLOAT => {
                // Read as a float first: `-0` is negative zero, which the
                // number reading takes for the integer 0 (a Lua script got
                // 0.0 back; found by a review).
                if let Some(t) = text
                    && let Some(f) = t
                        .trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|f| f.is_finite())
                        .or_else(|| parse_number(t).map(Number::as_f64))
                {
                    return Number::Float(f).with_text(t);
                }
            }
            KIND_JSON => return Value::Json(bytes),
            KIND_RAW_TYPED => {
                if let Some((&n, rest)) = bytes.split_first()
                    && rest.len() >= usize::from(n)
                {
                    let (mt, body) = rest.split_at(usize::from(n));
                    return Value::Raw {
                        media_type: Some(String::from_utf8_lossy(mt).into_owned()),
                        bytes: body.to_vec(),
                    };
                }
            }
            _ => {}
        }
        Value::Raw {
            bytes,
            media_type: None,
        }
    }

    /// What the value is, in words, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Raw { .. } => "raw bytes",
            Value::Int(_)
            | Value::Number {
                number: Number::Int(_),
                ..
            } => "an integer",
            Value::Float(_)
            | Value::Number {
                number: Number::Float(_),
                ..
            } => "a float",
            Value::Json(_) => "JSON",
        }
    }

    /// The `Content-Type` a `GET` answers with.
    pub fn content_type(&self) -> &str {
        match self {
            Value::Raw {
                media_type: Some(mt),
                ..
            } => mt,
            Value::Raw { bytes, .. } => {
                if std::str::from_utf8(bytes).is_ok() {
                    "text/plain; charset=utf-8"
                } else {
                    "application/octet-stream"
                }
            }
            Value::Int(_) | Value::Float(_) | Value::Number { .. } => "text/plain; charset=utf-8",
            Value::Json(_) => "application/json",
        }
    }

    /// The bytes a `GET` answers with.
    pub fn body(&self) -> Vec<u8> {
        match self {
            Value::Raw { bytes, .. } | Value::Json(bytes) => bytes.clone(),
            Value::Int(i) => i.to_string().into_bytes(),
            Value::Float(f) => float_text(*f).into_bytes(),
            Value::Number { text, .. } => text.clone().into_bytes(),
        }
    }

    /// The size limits apply to this many bytes.
    pub fn size(&self) -> usize {
        match self {
            Value::Raw { bytes, .. } | Value::Json(bytes) => bytes.len(),
            Value::Int(i) => decimal_len(*i),
            Value::Float(f) => float_text(*f).len(),
            Value::Number { text, .. } => text.len(),
        }
    }

    /// The value as JSON, for listings and scripts: numbers as numbers, JSON as
    /// itself, UTF-8 raw values as strings; other bytes as `None`.
    pub fn to_json(&self) -> Option<Json> {
        match self {
            Value::Int(i) => Some(Json::from(*i)),
            Value::Float(f) => Some(Json::from(*f)),
            Value::Number { number, .. } => Some(number.to_json()),
            Value::Json(bytes) => serde_json::from_slice(bytes).ok(),
            Value::Raw { bytes, .. } => std::str::from_utf8(bytes)
                .ok()
                .map(|s| Json::String(s.to_owned())),
        }
    }

    fn as_number(&self) -> Result<Number, OpConflict> {
        match self {
            Value::Int(i) => Ok(Number::Int(*i)),
            Value::Float(f) => Ok(Number::Float(*f)),
            Value::Number { number, .. } => Ok(*number),
            other => Err(OpConflict::NotANumber(other.type_name())),
        }
    }

    fn as_json(&self) -> Result<Json, OpConflict> {
        match self {
            Value::Json(bytes) => {
                serde_json::from_slice(bytes).map_err(|_| OpConflict::NotJson("unreadable JSON"))
            }
            Value::Int(i) => Ok(Json::from(*i)),
            Value::Float(f) => Ok(Json::from(*f)),
            Value::Number { number, .. } => Ok(number.to_json()),
            Value::Raw { .. } => Err(OpConflict::NotJson(self.type_name())),
        }
    }
}

/// An atomic operation on one value (`PATCH /:bucket/:key`).
#[derive(Debug, Clone)]
pub enum Op {
    /// `+N` / `-N`.
    Add(Number),
    /// RFC 7396.
    MergePatch(Json),
    /// RFC 6902.
    JsonPatch(json_patch::Patch),
    /// `?op=append`; `media_type` is what a value it creates keeps (the
    /// request's raw media type, as a `PUT` of these bytes with it would;
    /// `None`, also for JSON: plain text, since appending makes raw bytes).
    Append {
        bytes: Vec<u8>,
        media_type: Option<String>,
    },
    /// `?op=max`.
    Max(Number),
    /// `?op=min`.
    Min(Number),
}

impl Op {
    /// Whether the operation reads the value as such, so that it needs read
    /// permission as well as write: a JSON patch succeeds or fails on what
    /// the document holds (a `test`, but also a `copy`, `move`, `remove` or
    /// `replace` of a path that may be missing), which would tell a caller
    /// who may not read the value about its structure.
    pub fn reads(&self) -> bool {
        matches!(self, Op::JsonPatch(_))
    }

    /// The new value from the current one (`None`: the key is absent).
    /// `max_bytes` bounds what a JSON patch may build on the way (the value
    /// limit; the result is checked against it again once encoded).
    ///
    /// # Errors
    /// The operation does not apply to the current value.
    pub fn apply(&self, current: Option<Value>, max_bytes: usize) -> Result<Value, OpConflict> {
        match self {
            // Adding zero keeps a number as it is stored: one that a double
            // does not hold exactly (an integer past 64 bits, a long
            // decimal) is not rounded by a `+0` (found by a review).
            Op::Add(n) if n.cmp_exact(Number::Int(0)).is_eq() => match current {
                None => Ok(Number::Int(0).into_value()),
                Some(cur) => {
                    cur.as_number()?;
                    Ok(cur)
                }
            },
            Op::Add(n) => {
                let cur = current.map_or(Ok(Number::Int(0)), |v| v.as_number())?;
                add(cur, *n).map(Number::into_value)
            }
            Op::Max(n) | Op::Min(n) => {
                let Some(current) = current else {
                    return Ok(n.into_value());
                };
                let order = n.cmp_exact(current.as_number()?);
                let take_new = if matches!(self, Op::Max(_)) {
                    order.is_gt()
                } else {
                    order.is_lt()
                };
                // The value that stays is kept as it is stored, not written
                // again from a double (`18446744073709551615` with `max 0`
                // became `18446744073709552000`; found by a review).
                Ok(if take_new { n.into_value() } else { current })
            }
            Op::Append { bytes, media_type } => match current {
                None => Ok(Value::Raw {
                    bytes: bytes.clone(),
                    media_type: media_type.clone(),
                }),
                Some(Value::Raw {
                    bytes: mut cur,
                    media_type,
                }) => {
                    cur.extend_from_slice(bytes);
                    Ok(Value::Raw {
                        bytes: cur,
                        media_type,
                    })
                }
                Some(other) => Err(OpConflict::NotRaw(other.type_name())),
            },
            Op::MergePatch(patch) => {
                let mut doc = current.map_or(Ok(Json::Null), |v| v.as_json())?;
                json_patch::merge(&mut doc, patch);
                Ok(Value::from_json(&doc))
            }
            Op::JsonPatch(patch) => {
                let absent = current.is_none();
                let doc = current.map_or(Ok(Json::Null), |v| v.as_json())?;
                let patched = apply_json_patch(doc, patch, max_bytes).map_err(|e| match e {
                    OpConflict::Patch(why) if absent => OpConflict::Patch(format!(
                        "{why} (the key does not exist, so the patch applied to null: PUT the document first, or use a merge patch, which creates it)"
                    )),
                    other => other,
                })?;
                Ok(Value::from_json(&patched))
            }
        }
    }
}

/// How deeply JSON may nest: what `serde_json` parses (it refuses the 128th
/// level), so that every stored document can be read back.
pub const MAX_JSON_DEPTH: usize = 127;

/// How deeply `v` nests (arrays and objects inside each other, as
/// `serde_json` counts: a scalar 0, `{}` 1, `[[]]` 2) and how many bytes
/// it takes as compact JSON (strings without their escapes)
/// (strings and keys by length, numbers as written), counted without
/// recursion: `v` may be deeper than a thread's stack allows.
fn json_extent(v: &Json) -> (usize, usize) {
    struct Count(usize);
    impl std::fmt::Write for Count {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0 += s.len();
            Ok(())
        }
    }
    let (mut deepest, mut bytes) = (0, 0);
    let mut stack = vec![(v, 0usize)];
    // `depth`: how many arrays and objects enclose `v`.
    while let Some((v, depth)) = stack.pop() {
        let within = if v.is_array() || v.is_object() {
            depth + 1
        } else {
            depth
        };
        deepest = deepest.max(within);
        bytes += match v {
            Json::Null | Json::Bool(true) => 4,
            Json::Bool(false) => 5,
            Json::Number(n) => {
                let mut count = Count(0);
                let _ = std::fmt::Write::write_fmt(&mut count, format_args!("{n}"));
                count.0
            }
            Json::String(s) => s.len() + 2,
            // Brackets and commas.
            Json::Array(items) => {
                stack.extend(items.iter().map(|item| (item, depth + 1)));
                items.len().saturating_sub(1) + 2
            }
            // Braces, commas, quoted keys and colons.
            Json::Object(map) => {
                stack.extend(map.values().map(|item| (item, depth + 1)));
                map.keys().map(|k| k.len() + 3).sum::<usize>() + map.len().saturating_sub(1) + 2
            }
        };
    }
    (deepest, bytes)
}

/// How much work one JSON patch may do, in values visited or shifted (each
/// a few nanoseconds): it runs where writes are serialized, so one patch
/// must not hold up every other write for long (well under a second).
const MAX_PATCH_WORK: usize = 64 * 1024 * 1024;

/// How many values an operation at `path` shifts in place: inserting into
/// or removing from the middle of an array moves what follows.
fn shifted(doc: &Json, path: &json_patch::jsonptr::Pointer) -> usize {
    match path.parent().and_then(|p| doc.pointer(p.as_str())) {
        Some(Json::Array(items)) => items.len(),
        _ => 1,
    }
}

/// Applies a JSON patch one operation at a time, refusing (before it runs)
/// an operation that could make the document nest deeper than
/// [`MAX_JSON_DEPTH`], and a patch that would do more than
/// [`MAX_PATCH_WORK`]. JSON pointers are flat strings, so a patch of small
/// operations can otherwise build a document deeper than any stack can
/// serialize, double one with each `copy`, or shift a large array back and
/// forth for hours. The document's size is bounded from above as it goes;
/// an operation that may take it past `max_bytes` is applied and the
/// document measured. A patch may pass the limit on the way (an `add`
/// before a `remove`), up to twice it; past that the document is answered
/// at once, and the caller refuses it as too large (413), as it does a
/// result over the limit. A single operation at most doubles the document.
/// A `test` compares numbers by value, as RFC 6902 says (`2` equals `2.0`).
fn apply_json_patch(
    mut doc: Json,
    patch: &json_patch::Patch,
    max_bytes: usize,
) -> Result<Json, OpConflict> {
    use json_patch::PatchOperation as P;
    let (mut depth, mut bytes) = json_extent(&doc);
    // Whether the document, as last measured, is past `max_bytes`.
    let mut over = false;
    let mut work = bytes;
    // The size of what sits at `path` now, which a replace replaces, and an
    // add too unless it inserts into an array.
    let existing = |doc: &Json, path: &json_patch::jsonptr::Pointer, inserts: bool| {
        let into_array = path
            .parent()
            .and_then(|p| doc.pointer(p.as_str()))
            .is_some_and(Json::is_array);
        if inserts && into_array {
            return 0;
        }
        doc.pointer(path.as_str())
            .map_or(0, |old| json_extent(old).1)
    };
    for (i, op) in patch.0.iter().enumerate() {
        let refuse = |what: String| OpConflict::Patch(format!("operation '/{i}' would {what}"));
        // The document's depth and size after the operation, bounded from
        // above without applying it, and the work it takes.
        match op {
            P::Add(json_patch::AddOperation { path, value })
            | P::Replace(json_patch::ReplaceOperation { path, value }) => {
                let inserts = matches!(op, P::Add(_));
                let (d, b) = json_extent(value);
                let old = existing(&doc, path, inserts);
                depth = depth.max(path.count() + d);
                bytes = (bytes - old.min(bytes)).saturating_add(b);
                let moved = if inserts { shifted(&doc, path) } else { 0 };
                work = work.saturating_add(b + old + moved);
            }
            P::Copy(op) => {
                if let Some(from) = doc.pointer(op.from.as_str()) {
                    let (d, b) = json_extent(from);
                    let old = existing(&doc, &op.path, true);
                    depth = depth.max(op.path.count() + d);
                    bytes = (bytes - old.min(bytes)).saturating_add(b);
                    work = work.saturating_add(2 * b + old + shifted(&doc, &op.path));
                }
            }
            // What moves is at most as deep as the document below `from`;
            // the document does not grow.
            P::Move(op) => {
                let below = depth.saturating_sub(op.from.count());
                depth = depth.max(op.path.count() + below);
                work = work
                    .saturating_add(shifted(&doc, &op.from))
                    .saturating_add(shifted(&doc, &op.path));
            }
            P::Remove(op) => {
                let old = existing(&doc, &op.path, false);
                bytes -= old.min(bytes);
                work = work.saturating_add(old + shifted(&doc, &op.path));
            }
            P::Test(op) => {
                work = work.saturating_add(json_extent(&op.value).1);
                if doc
                    .pointer(op.path.as_str())
                    .is_some_and(|found| numerically_equal(found, &op.value))
                {
                    continue;
                }
                // Not equal (or no such path): the crate's test fails with
                // its own message, as `==` on `serde_json` values is
                // stricter than equality by value.
            }
        }
        if depth > MAX_JSON_DEPTH {
            return Err(refuse(format!(
                "nest the document deeper than {MAX_JSON_DEPTH} levels"
            )));
        }
        let measure = bytes > max_bytes;
        if measure {
            // The bound is loose (it leaves out keys and commas, and what
            // some operations take away): measure instead.
            work = work.saturating_add(bytes);
        }
        if work > MAX_PATCH_WORK {
            if over {
                // Already past the limit: the caller refuses it as too large.
                return Ok(doc);
            }
            return Err(refuse(
                "take too long: split the patch, or patch a smaller document".to_owned(),
            ));
        }
        // The whole patch is refused on an error: the document is a copy.
        json_patch::patch_unsafe(&mut doc, std::slice::from_ref(op)).map_err(|mut e| {
            e.operation = i;
            OpConflict::Patch(e.to_string())
        })?;
        if measure {
            bytes = json_extent(&doc).1;
            over = bytes > max_bytes;
            if bytes > max_bytes.saturating_mul(2) {
                return Ok(doc);
            }
        }
    }
    Ok(doc)
}

/// JSON equality with numbers compared by value (RFC 6902's `test`): `2`,
/// `2.0` and `2e0` are equal; an integer and a float are equal only if the
/// float is exactly that integer.
fn numerically_equal(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => {
            let int = |n: &serde_json::Number| {
                n.as_i64()
                    .map(i128::from)
                    .or_else(|| n.as_u64().map(i128::from))
            };
            match (int(x), int(y), x.as_f64(), y.as_f64()) {
                (Some(i), Some(j), _, _) => i == j,
                (Some(i), None, _, Some(f)) | (None, Some(i), Some(f), _) => {
                    // Exact: a float past 2^127 is no i64 or u64 either.
                    f.fract() == 0.0 && f.abs() < 2f64.powi(127) && f as i128 == i
                }
                (None, None, Some(f), Some(g)) => f == g,
                _ => false,
            }
        }
        (Json::Array(xs), Json::Array(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| numerically_equal(x, y))
        }
        (Json::Object(xs), Json::Object(ys)) => {
            xs.len() == ys.len()
                && xs
                    .iter()
                    .all(|(k, x)| ys.get(k).is_some_and(|y| numerically_equal(x, y)))
        }
        _ => a == b,
    }
}

fn add(a: Number, b: Number) -> Result<Number, OpConflict> {
    match (a, b) {
        (Number::Int(x), Number::Int(y)) => x
            .checked_add(y)
            .map(Number::Int)
            .ok_or(OpConflict::Overflow),
        (x, y) => {
            let sum = x.as_f64() + y.as_f64();
            if sum.is_finite() {
                Ok(Number::Float(sum))
            } else {
                Err(OpConflict::NotFinite)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coerce(s: &str) -> Value {
        Value::from_body(s.as_bytes(), &Typing::Coerce).expect("coerces")
    }

    /// Untyped text is JSON only if every reader of JSON values reads it.
    #[test]
    fn coerced_json_is_json_that_serde_json_values_read() {
        for text in [
            r#"[1e400]"#,
            r#"{"n":-1e400}"#,
            r#"{"a":"\ud800"}"#,
            r#"{"\udc00":1}"#,
        ] {
            assert!(
                matches!(coerce(text), Value::Raw { .. }),
                "{text} was typed as JSON"
            );
        }
        for text in [
            r#"[1e300, -0.5, 18446744073709551615, -9223372036854775808, true, null]"#,
            r#"{"a":"\ud83d\ude00","b":{"c":[[],{}]},"\n":"\u00e9"}"#,
        ] {
            assert_eq!(coerce(text), Value::Json(text.as_bytes().to_vec()));
            serde_json::from_str::<Json>(text).expect("reads back");
        }
    }

    #[test]
    fn coercion_prefers_int_then_float_then_json_then_raw() {
        assert_eq!(coerce("42"), Value::Int(42));
        assert_eq!(coerce("-7"), Value::Int(-7));
        assert_eq!(
            coerce("+1"),
            Value::Number {
                number: Number::Int(1),
                text: "+1".into()
            }
        );
        assert_eq!(
            coerce("007").body(),
            b"007",
            "leading zeros read back as sent"
        );
        assert_eq!(coerce("42\n").body(), b"42\n");
        assert_eq!(
            Op::Add(Number::Int(1)).apply(Some(coerce("42\n")), usize::MAX),
            Ok(Value::Int(43))
        );
        assert_eq!(coerce("2.5"), Value::Float(2.5));
        assert_eq!(coerce("1e3").to_json(), Some(serde_json::json!(1000.0)));
        assert_eq!(
            coerce("12345678901234567890").body(),
            b"12345678901234567890"
        );
        assert_eq!(coerce(r#"{"a":1}"#), Value::Json(br#"{"a":1}"#.to_vec()));
        assert_eq!(coerce("[1,2]"), Value::Json(b"[1,2]".to_vec()));
        for raw in ["hello", "inf", "NaN", "\"quoted\"", "{broken", "true", ""] {
            assert!(
                matches!(
                    coerce(raw),
                    Value::Raw {
                        media_type: None,
                        ..
                    }
                ),
                "{raw}"
            );
        }
        assert!(matches!(
            Value::from_body(&[0xff, 0xfe], &Typing::Coerce).expect("raw"),
            Value::Raw { .. }
        ));
    }

    #[test]
    fn content_type_decides_typing_and_parameters_do_not() {
        assert_eq!(Typing::from_content_type(None), Ok(Typing::Coerce));
        assert_eq!(
            Typing::from_content_type(Some("text/plain; charset=utf-8")),
            Ok(Typing::Coerce)
        );
        assert_eq!(
            Typing::from_content_type(Some("application/x-www-form-urlencoded")),
            Ok(Typing::Coerce)
        );
        assert_eq!(
            Typing::from_content_type(Some("Application/JSON; charset=utf-8")),
            Ok(Typing::Json)
        );
        assert_eq!(
            Typing::from_content_type(Some("image/png")),
            Ok(Typing::Raw("image/png".into()))
        );
        let long = format!("application/x-{}", "a".repeat(250));
        assert_eq!(
            Typing::from_content_type(Some(&long)),
            Err(BadMediaType::TooLong(264))
        );
        for kept in [
            "image/png;",
            "text/csv; charset=utf-8",
            "text/csv ; charset=utf-8",
            "text/csv;\tcharset=utf-8",
            "application/vnd.api+json; profile=\"a b\"",
            "application/x; a=\"\"",
            "application/x; a=\"x\\\"y\"",
        ] {
            assert_eq!(
                Typing::from_content_type(Some(kept)),
                Ok(Typing::Raw(kept.into())),
                "{kept}"
            );
        }
        for bad in [
            "garbage",
            "image/",
            "/png",
            "a b/c",
            "text/c,sv",
            "garbage; charset=utf-8",
            // Found by a review: kept and served back.
            "a/b; charset=\"",
            "a/b; =x",
            "a/b; charset",
            "a/b; charset=",
            "a/b; a=1 b=2",
            "a/b; a=\"x\\\"",
            "*/*",
            "image/*",
        ] {
            assert!(
                matches!(
                    Typing::from_content_type(Some(bad)),
                    Err(BadMediaType::Malformed { .. })
                ),
                "{bad}"
            );
        }
        assert!(Value::from_body(b"{nope", &Typing::Json).is_err());
        assert_eq!(
            Value::from_body(b"5", &Typing::Json).expect("json"),
            Value::Int(5)
        );
        assert_eq!(
            Value::from_body(b"5", &Typing::Raw("application/octet-stream".into())).expect("raw"),
            Value::Raw {
                bytes: b"5".to_vec(),
                media_type: Some("application/octet-stream".into())
            }
        );
    }

    #[test]
    fn storage_form_round_trips() {
        for v in [
            Value::Int(i64::MIN),
            Value::Float(-0.125),
            Value::Json(b"{}".to_vec()),
            Value::Raw {
                bytes: vec![0, 1, 2],
                media_type: None,
            },
            Value::Raw {
                bytes: b"png".to_vec(),
                media_type: Some("image/png".into()),
            },
        ] {
            let (kind, bytes) = v.encode();
            assert_eq!(Value::decode(kind, bytes), v);
        }
        // Negative zero keeps its sign (0.0 == -0.0, so said apart here).
        let (kind, bytes) = Value::Float(-0.0).encode();
        let sign_kept = match Value::decode(kind, bytes) {
            Value::Float(f)
            | Value::Number {
                number: Number::Float(f),
                ..
            } => f.is_sign_negative(),
            _ => false,
        };
        assert!(sign_kept);
    }

    #[test]
    fn add_checks_overflow_and_types() {
        let add = |cur: Option<Value>, n| Op::Add(n).apply(cur, usize::MAX);
        assert_eq!(add(None, Number::Int(1)), Ok(Value::Int(1)));
        assert_eq!(
            add(Some(Value::Int(2)), Number::Int(-5)),
            Ok(Value::Int(-3))
        );
        assert_eq!(
            add(Some(Value::Int(1)), Number::Float(0.5)),
            Ok(Value::Float(1.5))
        );
        assert_eq!(
            add(Some(Value::Int(i64::MAX)), Number::Int(1)),
            Err(OpConflict::Overflow)
        );
        assert_eq!(
            add(Some(Value::Json(b"{}".to_vec())), Number::Int(1)),
            Err(OpConflict::NotANumber("JSON"))
        );
        assert_eq!(parse_number("+3"), Some(Number::Int(3)));
        assert_eq!(parse_number("-2.5"), Some(Number::Float(-2.5)));
        assert_eq!(parse_number("abc"), None);
        assert_eq!(Number::parse_operand(" +3 "), Ok(Number::Int(3)));
        assert_eq!(
            Number::parse_operand("-9223372036854775808"),
            Ok(Number::Int(i64::MIN))
        );
        assert_eq!(Number::parse_operand("1e20"), Ok(Number::Float(1e20)));
        assert_eq!(Number::parse_operand("abc"), Err(OperandError::NotANumber));
        for big in [
            "99999999999999999999",
            "+9223372036854775808",
            "-9223372036854775809",
        ] {
            let err = Number::parse_operand(big).expect_err("out of range");
            assert_eq!(err, OperandError::OutOfRange(big.to_owned()));
            assert!(err.to_string().contains("1e20"), "{err}");
        }
    }

    #[test]
    fn max_and_min_compare_integers_above_2_pow_53_exactly() {
        // 2^53 + 1 and 2^53 are the same f64.
        let big = 9_007_199_254_740_992_i64;
        assert_eq!(
            Op::Max(Number::Int(big + 1)).apply(Some(Value::Int(big)), usize::MAX),
            Ok(Value::Int(big + 1))
        );
        assert_eq!(
            Op::Min(Number::Int(big)).apply(Some(Value::Int(big + 1)), usize::MAX),
            Ok(Value::Int(big))
        );
        // An integer against an equal-looking float: by value.
        assert_eq!(
            Op::Max(Number::Int(big + 1))
                .apply(Some(Value::Float(9_007_199_254_740_992.0)), usize::MAX),
            Ok(Value::Int(big + 1))
        );
        assert_eq!(
            Op::Min(Number::Float(9_007_199_254_740_992.0))
                .apply(Some(Value::Int(big + 1)), usize::MAX),
            Ok(Value::Float(9_007_199_254_740_992.0))
        );
        assert_eq!(
            Op::Max(Number::Int(i64::MAX))
                .apply(Some(Value::Float(9.223_372_036_854_776e18)), usize::MAX),
            Ok(Value::Float(9.223_372_036_854_776e18))
        );
    }

    #[test]
    fn a_number_that_stays_is_kept_as_stored() {
        for text in [
            "18446744073709551615",
            "12345678901234567890123",
            "0.1000000000000000000000001",
        ] {
            let stored = Value::from_body(text.as_bytes(), &Typing::Coerce).expect("a number");
            for op in [
                Op::Max(Number::Int(0)),
                Op::Min(Number::Int(1_000_000_000_000_000_000)),
                Op::Add(Number::Int(0)),
                Op::Add(Number::Float(0.0)),
            ] {
                // 1e18 is the smaller of the two there: it is taken.
                if !text.starts_with("0.") && matches!(op, Op::Min(_)) {
                    continue;
                }
                assert_eq!(
                    op.apply(Some(stored.clone()), usize::MAX),
                    Ok(stored.clone()),
                    "{op:?} on {text}"
                );
            }
        }
        // The new number, when it wins or there is none.
        let stored = Value::from_body(b"18446744073709551615", &Typing::Coerce).expect("a number");
        assert_eq!(
            Op::Min(Number::Int(7)).apply(Some(stored), usize::MAX),
            Ok(Value::Int(7))
        );
        assert_eq!(
            Op::Add(Number::Int(0)).apply(None, usize::MAX),
            Ok(Value::Int(0))
        );
        assert!(
            Op::Add(Number::Int(0))
                .apply(Some(Value::Json(b"{}".to_vec())), usize::MAX)
                .is_err()
        );
    }

    #[test]
    fn max_min_append_and_patches() {
        assert_eq!(
            Op::Max(Number::Int(5)).apply(Some(Value::Int(3)), usize::MAX),
            Ok(Value::Int(5))
        );
        assert_eq!(
            Op::Max(Number::Int(1)).apply(Some(Value::Int(3)), usize::MAX),
            Ok(Value::Int(3))
        );
        assert_eq!(
            Op::Min(Number::Float(0.5)).apply(Some(Value::Int(3)), usize::MAX),
            Ok(Value::Float(0.5))
        );
        assert_eq!(
            Op::Min(Number::Int(9)).apply(None, usize::MAX),
            Ok(Value::Int(9))
        );
        let append = |bytes: &[u8], media_type: Option<&str>| Op::Append {
            bytes: bytes.to_vec(),
            media_type: media_type.map(str::to_owned),
        };
        assert_eq!(
            append(b"def", Some("image/png")).apply(
                Some(Value::Raw {
                    bytes: b"abc".to_vec(),
                    media_type: None
                }),
                usize::MAX
            ),
            Ok(Value::Raw {
                bytes: b"abcdef".to_vec(),
                media_type: None
            }),
            "an existing value keeps its type"
        );
        assert_eq!(
            append(b"x", Some("image/png")).apply(None, usize::MAX),
            Ok(Value::Raw {
                bytes: b"x".to_vec(),
                media_type: Some("image/png".into())
            }),
            "a new value takes the request's"
        );
        assert!(
            append(b"x", None)
                .apply(Some(Value::Int(1)), usize::MAX)
                .is_err()
        );
        let merged = Op::MergePatch(serde_json::json!({"b": 2, "a": null}))
            .apply(Some(Value::Json(br#"{"a":1,"c":3}"#.to_vec())), usize::MAX)
            .expect("merge");
        assert_eq!(merged.to_json(), Some(serde_json::json!({"b": 2, "c": 3})));
        let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
            {"op": "test", "path": "/n", "value": 1},
            {"op": "replace", "path": "/n", "value": 2}
        ]))
        .expect("patch");
        let doc = Value::Json(br#"{"n":1}"#.to_vec());
        assert_eq!(
            Op::JsonPatch(patch.clone())
                .apply(Some(doc), usize::MAX)
                .expect("applies")
                .to_json(),
            Some(serde_json::json!({"n": 2}))
        );
        let changed = Value::Json(br#"{"n":5}"#.to_vec());
        assert!(matches!(
            Op::JsonPatch(patch).apply(Some(changed), usize::MAX),
            Err(OpConflict::Patch(_))
        ));
    }

    fn json_patch(ops: serde_json::Value) -> Op {
        Op::JsonPatch(serde_json::from_value(ops).expect("patch"))
    }

    fn nested(levels: usize) -> String {
        "[".repeat(levels) + &"]".repeat(levels)
    }

    #[test]
    fn max_json_depth_is_what_serde_json_reads_back() {
        let deepest = serde_json::from_str::<Json>(&nested(MAX_JSON_DEPTH)).expect("reads");
        assert_eq!(json_extent(&deepest).0, MAX_JSON_DEPTH);
        assert!(serde_json::from_str::<Json>(&nested(MAX_JSON_DEPTH + 1)).is_err());
        assert_eq!(json_extent(&serde_json::json!(1)).0, 0);
        assert_eq!(json_extent(&serde_json::json!({})).0, 1);
        assert_eq!(json_extent(&serde_json::json!({"a": [1]})).0, 2);
    }

    #[test]
    fn a_json_patch_can_not_nest_a_document_past_the_depth_limit() {
        // Each operation adds 100 levels under the deepest point so far:
        // flat pointers, small values, an ever deeper document. Unchecked,
        // 120 such operations overflowed the writer thread's stack.
        let chain = |levels: usize| {
            let mut v = serde_json::json!(1);
            for _ in 0..levels {
                v = serde_json::json!({ "x": v });
            }
            v
        };
        let ops = serde_json::json!([
            {"op": "add", "path": "/x", "value": chain(20)},
            {"op": "add", "path": "/x".repeat(21), "value": chain(110)},
        ]);
        let refused = json_patch(ops).apply(Some(Value::Json(b"{}".to_vec())), usize::MAX);
        assert_eq!(
            refused.expect_err("too deep").to_string(),
            format!(
                "the JSON patch does not apply: operation '/1' would nest the document deeper than {MAX_JSON_DEPTH} levels"
            )
        );
        // Up to the limit, and the result reads back.
        let ops = serde_json::json!([
            {"op": "add", "path": "/x", "value": chain(20)},
            {"op": "add", "path": "/x".repeat(21), "value": chain(MAX_JSON_DEPTH - 21)},
        ]);
        let deepest = json_patch(ops)
            .apply(Some(Value::Json(b"{}".to_vec())), usize::MAX)
            .expect("within the limit");
        assert_eq!(
            json_extent(&deepest.to_json().expect("reads back")).0,
            MAX_JSON_DEPTH
        );
        // A copy (or a move) of a deep part under itself counts too.
        let ops = serde_json::json!([
            {"op": "copy", "from": "/x", "path": "/x".repeat(MAX_JSON_DEPTH - 1)},
        ]);
        assert!(
            json_patch(ops)
                .apply(Some(deepest.clone()), usize::MAX)
                .is_err()
        );
        let ops = serde_json::json!([
            {"op": "move", "from": "/x/x", "path": "/x".repeat(MAX_JSON_DEPTH - 1)},
        ]);
        assert!(json_patch(ops).apply(Some(deepest), usize::MAX).is_err());
    }

    #[test]
    fn a_json_patch_can_not_grow_a_document_past_the_value_limit() {
        // Each copy of the whole document into itself doubles it: 40 would
        // make a trillion nodes.
        let doc = Value::Json(format!(r#"{{"a":"{}"}}"#, "x".repeat(1000)).into_bytes());
        let ops: Vec<_> = (0..40)
            .map(|i| serde_json::json!({"op": "copy", "from": "", "path": format!("/c{i}")}))
            .collect();
        // It stops at the first operation that takes it past twice the
        // limit, with what it made (the caller refuses that as too large,
        // 413).
        let grown = json_patch(serde_json::Value::Array(ops))
            .apply(Some(doc.clone()), 100_000)
            .expect("stopped");
        assert!(
            (200_000..=400_200).contains(&grown.size()),
            "{}",
            grown.size()
        );
        // A few copies fit.
        let ops = serde_json::json!([{"op": "copy", "from": "", "path": "/c"}]);
        assert!(json_patch(ops).apply(Some(doc), 100_000).is_ok());
    }

    #[test]
    fn json_extent_counts_compact_json_bytes() {
        for text in [
            r#"[true,false,null,1,-2.5,"ab"]"#,
            r#"{"a":[],"bc":{"d":{}}}"#,
            "[]",
            "{}",
            "7",
        ] {
            let v: Json = serde_json::from_str(text).expect("json");
            assert_eq!(json_extent(&v).1, text.len(), "{text}");
        }
    }

    #[test]
    fn what_a_patch_replaces_no_longer_counts_towards_the_limit() {
        let trues = format!("[{}]", vec!["true"; 1000].join(","));
        let limit = trues.len();
        let doc = || Value::Json(trues.clone().into_bytes());
        let same = json_patch(serde_json::json!([{"op": "replace", "path": "/0", "value": true}]));
        assert!(same.apply(Some(doc()), limit).is_ok());
        let longer =
            json_patch(serde_json::json!([{"op": "replace", "path": "/0", "value": false}]));
        let over =
            |patch: &Op, limit| patch.apply(Some(doc()), limit).expect("applies").size() > limit;
        assert!(over(&longer, limit), "one byte over");
        // An add that inserts into an array replaces nothing.
        let insert = json_patch(serde_json::json!([{"op": "add", "path": "/0", "value": true}]));
        assert!(over(&insert, limit));
        let remove_then_insert = json_patch(serde_json::json!([
            {"op": "remove", "path": "/0"},
            {"op": "add", "path": "/0", "value": true},
        ]));
        assert!(!over(&remove_then_insert, limit));
        // What a remove takes away makes room (found by a review: a patch
        // that removed a large member and added a smaller one was refused).
        let big = Value::Json(format!(r#"{{"a":"{}"}}"#, "x".repeat(880)).into_bytes());
        let swap = json_patch(serde_json::json!([
            {"op": "remove", "path": "/a"},
            {"op": "add", "path": "/b", "value": "y".repeat(200)},
        ]));
        let swapped = swap.apply(Some(big.clone()), 1000).expect("fits");
        assert_eq!(swapped.size(), 208);
        // The other way round passes the limit on the way, and ends under it.
        let rename = json_patch(serde_json::json!([
            {"op": "add", "path": "/b", "value": "y".repeat(200)},
            {"op": "remove", "path": "/a"},
        ]));
        assert_eq!(
            rename.apply(Some(big.clone()), 1000).expect("fits").size(),
            208
        );
        // And so does what a copy replaces.
        let copy = json_patch(serde_json::json!([
            {"op": "add", "path": "/b", "value": 1},
            {"op": "copy", "from": "/b", "path": "/a"},
            {"op": "add", "path": "/c", "value": "z".repeat(500)},
        ]));
        assert!(copy.apply(Some(big), 1000).expect("fits").size() < 1000);
    }

    /// RFC 6902: a `test` compares numbers by value (found by a review: `2`
    /// did not equal `2.0`, so a compare-and-set on a float that GET shows
    /// as `4` kept failing).
    #[test]
    fn a_json_patch_test_compares_numbers_by_value() {
        let doc = || {
            Value::Json(
                br#"{"qty":3,"price":2.0,"big":18446744073709551615,"list":[1,{"f":4.0}]}"#
                    .to_vec(),
            )
        };
        let passes = |path: &str, value: Json| {
            json_patch(serde_json::json!([{"op": "test", "path": path, "value": value}]))
                .apply(Some(doc()), usize::MAX)
                .is_ok()
        };
        assert!(passes("/qty", serde_json::json!(3.0)));
        assert!(passes("/price", serde_json::json!(2)));
        assert!(passes("/big", serde_json::json!(18446744073709551615u64)));
        assert!(passes("/list", serde_json::json!([1.0, {"f": 4}])));
        assert!(!passes("/qty", serde_json::json!(3.5)));
        assert!(!passes("/big", serde_json::json!(18446744073709551614u64)));
        assert!(!passes("/qty", serde_json::json!("3")));
        assert!(!passes("/list", serde_json::json!([1, {"f": 4, "g": 1}])));
        assert!(!passes("/missing", serde_json::json!(3)));
        assert!(numerically_equal(
            &serde_json::json!(-0.0),
            &serde_json::json!(0)
        ));
        assert!(!numerically_equal(
            &serde_json::json!(9_007_199_254_740_993i64),
            &serde_json::json!(9_007_199_254_740_992.0)
        ));
    }

    #[test]
    fn floats_far_from_one_are_written_with_an_exponent() {
        assert_eq!(Value::Float(1e-300).body(), b"1e-300");
        assert_eq!(Value::Float(-1.5e300).body(), b"-1.5e300");
        assert_eq!(Value::Float(0.5).body(), b"0.5");
        assert_eq!(Value::Float(4.0).body(), b"4");
        assert_eq!(Value::Float(1e20).body(), b"100000000000000000000");
        assert_eq!(Value::Float(1e21).body(), b"1e21");
        assert_eq!(Value::Float(0.000_001).body(), b"0.000001");
        assert_eq!(Value::Float(5e-7).body(), b"5e-7");
        // The size limit counts the number as written.
        assert_eq!(Value::Float(1e-300).size(), 6);
        assert_eq!(Value::Int(-12).size(), 3);
        for i in [0, 9, 10, -10, i64::MAX, i64::MIN] {
            assert_eq!(Value::Int(i).size(), i.to_string().len(), "{i}");
        }
    }

    #[test]
    fn a_json_patch_that_would_take_too_long_is_refused_before_it_runs() {
        // Each removal from the front of a large array shifts all of it.
        let doc = Value::Json(format!("[{}]", vec!["0"; 1_000_000].join(",")).into_bytes());
        let ops: Vec<_> = (0..1000)
            .map(|_| serde_json::json!({"op": "remove", "path": "/0"}))
            .collect();
        let refused = json_patch(serde_json::Value::Array(ops)).apply(Some(doc), usize::MAX);
        let message = refused.expect_err("too much work").to_string();
        assert!(message.contains("would take too long"), "{message}");
        // Moving between object keys costs nothing per move, however large
        // what moves (found by a review: each move was walked).
        let big =
            Value::Json(format!(r#"{{"a":[{}]}}"#, vec!["0"; 1_000_000].join(",")).into_bytes());
        let ops: Vec<_> = (0..10_000)
            .flat_map(|_| {
                [
                    serde_json::json!({"op": "move", "from": "/a", "path": "/b"}),
                    serde_json::json!({"op": "move", "from": "/b", "path": "/a"}),
                ]
            })
            .collect();
        let moved = json_patch(serde_json::Value::Array(ops))
            .apply(Some(big), usize::MAX)
            .expect("cheap");
        assert_eq!(
            moved.to_json().expect("json")["a"].as_array().map(Vec::len),
            Some(1_000_000)
        );
    }

    #[test]
    fn a_failed_json_patch_names_its_operation() {
        let ops = serde_json::json!([
            {"op": "add", "path": "/a", "value": 1},
            {"op": "add", "path": "/b", "value": 2},
            {"op": "remove", "path": "/missing"},
        ]);
        let refused = json_patch(ops).apply(Some(Value::Json(b"{}".to_vec())), usize::MAX);
        let message = refused.expect_err("fails").to_string();
        assert!(message.contains("operation '/2' failed"), "{message}");
    }
}
