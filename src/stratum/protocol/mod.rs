//! JSON-RPC framing of Stratum V1: ids, parse errors and the writers for outgoing lines.
//!
//! A line is parsed once, at the edge, into a typed message ([`miner`] for what miners send,
//! [`pool`] for what pools send). Params are kept as borrowed raw JSON until a method's parser
//! types them, so relaying an unknown method costs no re-encoding.

pub mod miner;
pub mod pool;

use std::borrow::Cow;
use std::fmt;
use std::io::Write;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Stratum error codes (see STRATUM.md).
pub mod code {
    pub const OTHER: i64 = 20;
    pub const JOB_NOT_FOUND: i64 = 21;
    pub const DUPLICATE: i64 = 22;
    pub const LOW_DIFFICULTY: i64 = 23;
    pub const UNAUTHORIZED: i64 = 24;
    pub const NOT_SUBSCRIBED: i64 = 25;
}

/// A JSON-RPC id, kept as the exact JSON text it arrived as (`7`, `1e3`, `"a"`, `null`), so that
/// it is echoed back byte for byte, whatever its size or form.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Id(Box<str>);

impl Id {
    pub fn null() -> Self {
        Id("null".into())
    }

    pub fn number(n: u64) -> Self {
        Id(n.to_string().into_boxed_str())
    }

    pub fn is_null(&self) -> bool {
        &*self.0 == "null"
    }

    /// The id as JSON text.
    pub fn as_json(&self) -> &str {
        &self.0
    }

    /// Accepts numbers, strings and null; objects, arrays and booleans are not ids.
    fn from_raw(raw: Option<&RawValue>) -> Result<Self, ()> {
        let Some(raw) = raw else { return Ok(Id::null()) };
        let text = raw.get();
        match text.as_bytes().first() {
            Some(b'"' | b'-' | b'0'..=b'9') => Ok(Id(text.into())),
            _ => Err(()),
        }
    }

    /// The id as an unsigned integer, for ids the proxy itself assigned.
    pub fn as_u64(&self) -> Option<u64> {
        self.0.parse().ok()
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a line could not be turned into a message. Carries the id when the line had a usable one,
/// so the error reply can echo it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{kind}")]
pub struct ParseError {
    pub id: Option<Id>,
    pub kind: ParseErrorKind,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseErrorKind {
    #[error("invalid JSON")]
    Json,
    #[error("invalid id: must be a number, a string or null")]
    Id,
    #[error("missing method")]
    NoMethod,
    #[error("params must be an array")]
    ParamsNotArray,
    #[error("{method}: {reason}")]
    Params { method: &'static str, reason: Cow<'static, str> },
}

impl ParseError {
    pub(crate) fn params(id: &Id, method: &'static str, reason: impl Into<Cow<'static, str>>) -> Self {
        ParseError { id: Some(id.clone()), kind: ParseErrorKind::Params { method, reason: reason.into() } }
    }
}

/// The common shape of every line: requests, notifications and responses. Unknown keys (such as
/// `"jsonrpc"`) are ignored; a duplicate key is an error.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(default, borrow)]
    id: Option<&'a RawValue>,
    #[serde(default, borrow)]
    method: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    params: Option<&'a RawValue>,
    #[serde(default, borrow)]
    result: Option<&'a RawValue>,
    #[serde(default, borrow)]
    error: Option<&'a RawValue>,
}

/// A parsed envelope with a valid id.
#[derive(Debug)]
struct Parsed<'a> {
    id: Id,
    method: Option<Cow<'a, str>>,
    params: Option<&'a RawValue>,
    result: Option<&'a RawValue>,
    error: Option<&'a RawValue>,
}

fn parse_envelope(line: &[u8]) -> Result<Parsed<'_>, ParseError> {
    let env: Envelope<'_> =
        serde_json::from_slice(line).map_err(|_| ParseError { id: None, kind: ParseErrorKind::Json })?;
    let id = Id::from_raw(env.id).map_err(|_| ParseError { id: None, kind: ParseErrorKind::Id })?;
    Ok(Parsed { id, method: env.method, params: env.params, result: env.result, error: env.error })
}

/// The positional params of a request, borrowed from the line.
pub(crate) struct Params<'i, 'a> {
    id: &'i Id,
    method: &'static str,
    items: Vec<&'a RawValue>,
}

/// The most params any known method takes; a longer array is rejected before it is walked twice.
const MAX_PARAMS: usize = 64;

impl<'i, 'a> Params<'i, 'a> {
    fn new(id: &'i Id, method: &'static str, raw: Option<&'a RawValue>) -> Result<Self, ParseError> {
        let items = match raw {
            None => Vec::new(),
            Some(raw) if raw.get() == "null" => Vec::new(),
            Some(raw) => {
                if !raw.get().starts_with('[') {
                    return Err(ParseError { id: Some(id.clone()), kind: ParseErrorKind::ParamsNotArray });
                }
                serde_json::from_str::<Vec<&RawValue>>(raw.get())
                    .map_err(|_| ParseError::params(id, method, "params must be an array"))?
            }
        };
        if items.len() > MAX_PARAMS {
            return Err(ParseError::params(id, method, "too many params"));
        }
        Ok(Params { id, method, items })
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    fn error(&self, reason: impl Into<Cow<'static, str>>) -> ParseError {
        ParseError::params(self.id, self.method, reason)
    }

    fn expect_len(&self, min: usize, max: usize) -> Result<(), ParseError> {
        let n = self.items.len();
        if n < min || n > max {
            let want = if min == max { format!("{min}") } else { format!("{min} to {max}") };
            return Err(self.error(format!("expected {want} params, got {n}")));
        }
        Ok(())
    }

    fn raw(&self, i: usize) -> Option<&'a RawValue> {
        self.items.get(i).copied().filter(|r| r.get() != "null")
    }

    fn typed<T: Deserialize<'a>>(&self, i: usize, name: &'static str, what: &'static str) -> Result<T, ParseError> {
        let raw = self.items.get(i).ok_or_else(|| self.error(format!("missing {name}")))?;
        serde_json::from_str(raw.get()).map_err(|_| self.error(format!("{name} must be {what}")))
    }

    fn string(&self, i: usize, name: &'static str) -> Result<String, ParseError> {
        self.typed::<String>(i, name, "a string")
    }

    /// A string borrowed from the line, or unescaped into one of its own: a share's fields are
    /// read without allocating.
    fn str(&self, i: usize, name: &'static str) -> Result<Cow<'a, str>, ParseError> {
        match self.typed::<&'a str>(i, name, "a string") {
            Ok(s) => Ok(Cow::Borrowed(s)),
            Err(_) => self.string(i, name).map(Cow::Owned),
        }
    }

    fn opt_string(&self, i: usize, name: &'static str) -> Result<Option<String>, ParseError> {
        match self.raw(i) {
            None => Ok(None),
            Some(_) => self.string(i, name).map(Some),
        }
    }

    /// A number, or a string holding one (some firmware quotes numbers).
    fn number(&self, i: usize, name: &'static str) -> Result<f64, ParseError> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Num<'s> {
            N(f64),
            S(&'s str),
        }
        match self.typed::<Num<'_>>(i, name, "a number")? {
            Num::N(n) => Ok(n),
            Num::S(s) => s.trim().parse().map_err(|_| self.error(format!("{name} must be a number"))),
        }
    }

    /// A 4-byte value written as 8 hex characters (version, nbits, ntime, masks).
    fn hex_u32(&self, i: usize, name: &'static str) -> Result<u32, ParseError> {
        let s: Cow<'_, str> = self.typed(i, name, "a hex string")?;
        parse_hex_u32(&s).ok_or_else(|| self.error(format!("{name} must be 8 hex characters")))
    }

    /// Hex bytes of any even length up to `max` bytes.
    fn hex_bytes(&self, i: usize, name: &'static str, max: usize) -> Result<Vec<u8>, ParseError> {
        let s: Cow<'_, str> = self.typed(i, name, "a hex string")?;
        if s.len() > max * 2 {
            return Err(self.error(format!("{name} is longer than {max} bytes")));
        }
        hex::decode(s.as_bytes()).map_err(|_| self.error(format!("{name} must be hex of even length")))
    }
}

/// Parses exactly 8 hex characters as a big-endian u32.
pub fn parse_hex_u32(s: &str) -> Option<u32> {
    if s.len() != 8 {
        return None;
    }
    let mut out = [0u8; 4];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(u32::from_be_bytes(out))
}

/// The outcome a pool (or the proxy) gives a request: `Ok` for a true result, `Err((code, message))`
/// for a false result or an error.
pub fn verdict(result: Option<&RawValue>, error: Option<&RawValue>) -> Result<(), (i64, String)> {
    if let Some(error) = error {
        let value: serde_json::Value = serde_json::from_str(error.get()).unwrap_or_default();
        let (code, message) = match &value {
            serde_json::Value::Array(a) => (a.first(), a.get(1)),
            serde_json::Value::Object(o) => (o.get("code"), o.get("message")),
            _ => (None, None),
        };
        return Err((
            code.and_then(serde_json::Value::as_i64).unwrap_or(code::OTHER),
            message
                .and_then(serde_json::Value::as_str)
                .map_or_else(|| error.get().chars().take(120).collect(), str::to_owned),
        ));
    }
    match result.map(RawValue::get) {
        Some("true") => Ok(()),
        _ => Err((code::OTHER, "rejected".into())),
    }
}

/// Writers for outgoing lines. Each appends one complete line, `\n` included, to `buf`.
pub mod write {
    use super::*;

    fn json(buf: &mut Vec<u8>, value: &impl Serialize) {
        // Serialising plain data into a Vec cannot fail.
        serde_json::to_writer(&mut *buf, value).expect("serialise to Vec");
    }

    /// `{"id":ID,"result":RESULT,"error":null}`
    pub fn result(buf: &mut Vec<u8>, id: &Id, result: &impl Serialize) {
        buf.extend_from_slice(b"{\"id\":");
        buf.extend_from_slice(id.as_json().as_bytes());
        buf.extend_from_slice(b",\"result\":");
        json(buf, result);
        buf.extend_from_slice(b",\"error\":null}\n");
    }

    /// `{"id":ID,"result":null,"error":[CODE,"MESSAGE",null]}`
    pub fn error(buf: &mut Vec<u8>, id: &Id, code: i64, message: &str) {
        let _ = write!(buf, "{{\"id\":{},\"result\":null,\"error\":[{code},", id.as_json());
        json(buf, &message);
        buf.extend_from_slice(b",null]}\n");
    }

    /// A pool's reply relayed under the miner's id, with its result and error as they came.
    pub fn relayed_reply(buf: &mut Vec<u8>, id: &Id, result: Option<&RawValue>, error: Option<&RawValue>) {
        let _ = writeln!(
            buf,
            "{{\"id\":{},\"result\":{},\"error\":{}}}",
            id.as_json(),
            result.map_or("null", RawValue::get),
            error.map_or("null", RawValue::get)
        );
    }

    /// A request with raw params, as relayed upstream under the proxy's own id.
    pub fn request_raw(buf: &mut Vec<u8>, id: u64, method: &str, params: Option<&RawValue>) {
        buf.extend_from_slice(b"{\"id\":");
        let _ = write!(buf, "{id}");
        buf.extend_from_slice(b",\"method\":");
        json(buf, &method);
        buf.extend_from_slice(b",\"params\":");
        buf.extend_from_slice(params.map_or("[]", RawValue::get).as_bytes());
        buf.extend_from_slice(b"}\n");
    }

    /// A request with typed params.
    pub fn request(buf: &mut Vec<u8>, id: u64, method: &str, params: &impl Serialize) {
        let _ = write!(buf, "{{\"id\":{id},\"method\":");
        json(buf, &method);
        buf.extend_from_slice(b",\"params\":");
        json(buf, params);
        buf.extend_from_slice(b"}\n");
    }

    /// A notification (`"id":null`) with typed params.
    pub fn notification(buf: &mut Vec<u8>, method: &str, params: &impl Serialize) {
        buf.extend_from_slice(b"{\"id\":null,\"method\":");
        json(buf, &method);
        buf.extend_from_slice(b",\"params\":");
        json(buf, params);
        buf.extend_from_slice(b"}\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_echoed_exactly() {
        for (line, id) in [
            (r#"{"id":7,"method":"x"}"#, "7"),
            (r#"{"id":"abc","method":"x"}"#, r#""abc""#),
            (r#"{"id":null,"method":"x"}"#, "null"),
            (r#"{"method":"x"}"#, "null"),
            (r#"{"id":1.50,"method":"x"}"#, "1.50"),
            (r#"{"id":123456789012345678901234567890,"method":"x"}"#, "123456789012345678901234567890"),
            (r#"{"id":"\u00e9\"q","method":"x"}"#, r#""\u00e9\"q""#),
        ] {
            let p = parse_envelope(line.as_bytes()).unwrap();
            assert_eq!(p.id.as_json(), id, "{line}");
            let mut buf = Vec::new();
            write::result(&mut buf, &p.id, &true);
            assert_eq!(String::from_utf8(buf).unwrap(), format!("{{\"id\":{id},\"result\":true,\"error\":null}}\n"));
        }
    }

    #[test]
    fn bad_ids_and_json_are_errors() {
        for line in [r#"{"id":{},"method":"x"}"#, r#"{"id":[1],"method":"x"}"#, r#"{"id":true,"method":"x"}"#] {
            assert_eq!(parse_envelope(line.as_bytes()).unwrap_err().kind, ParseErrorKind::Id, "{line}");
        }
        for line in ["", "{", "[1,2]", "42", "\"s\"", "{\"id\":1,\"id\":2}", "{\"id\":1}\u{0}"] {
            assert_eq!(parse_envelope(line.as_bytes()).unwrap_err().kind, ParseErrorKind::Json, "{line:?}");
        }
        assert!(parse_envelope(b"{\"id\":1,\"method\":\"\xff\"}").is_err());
    }

    #[test]
    fn error_lines_escape_messages() {
        let mut buf = Vec::new();
        write::error(&mut buf, &Id::number(3), code::OTHER, "bad \"x\"");
        assert_eq!(buf, b"{\"id\":3,\"result\":null,\"error\":[20,\"bad \\\"x\\\"\",null]}\n");
    }

    #[test]
    fn verdicts() {
        let raw = |s: &str| RawValue::from_string(s.to_string()).unwrap();
        assert_eq!(verdict(Some(&raw("true")), None), Ok(()));
        assert_eq!(verdict(Some(&raw("false")), None), Err((20, "rejected".into())));
        assert_eq!(verdict(None, Some(&raw(r#"[21,"Job not found",null]"#))), Err((21, "Job not found".into())));
        assert_eq!(
            verdict(None, Some(&raw(r#"[23,"Low difficulty share"]"#))),
            Err((23, "Low difficulty share".into()))
        );
        assert_eq!(verdict(None, Some(&raw(r#"{"code":22,"message":"Duplicate"}"#))), Err((22, "Duplicate".into())));
        assert_eq!(verdict(None, Some(&raw(r#""weird""#))).unwrap_err().0, 20);
    }

    #[test]
    fn hex_u32() {
        assert_eq!(parse_hex_u32("1fffe000"), Some(0x1fffe000));
        assert_eq!(parse_hex_u32("1FFFE000"), Some(0x1fffe000));
        for bad in ["", "1fffe00", "1fffe0000", "0x1fffe0", "1fffe00g"] {
            assert_eq!(parse_hex_u32(bad), None, "{bad}");
        }
    }
}
