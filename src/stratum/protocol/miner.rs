//! What miners send: typed requests, with the param shapes real firmware uses.

use std::borrow::Cow;

use serde_json::value::RawValue;

use super::{parse_envelope, Id, Params, ParseError, ParseErrorKind};

/// One line from a miner.
#[derive(Debug)]
pub enum MinerMessage<'a> {
    Request(Request<'a>),
    /// A line without a method: a reply to something the proxy never asks miners, so it is ignored.
    Response {
        id: Id,
    },
}

/// A miner request: the typed call, plus its id, method name and raw params for relaying.
#[derive(Debug)]
pub struct Request<'a> {
    pub id: Id,
    pub method: Cow<'a, str>,
    pub params: Option<&'a RawValue>,
    pub call: Call<'a>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Call<'a> {
    Subscribe {
        user_agent: Option<String>,
        session_id: Option<String>,
    },
    Authorize {
        user: String,
        password: String,
    },
    Configure(Configure),
    ExtranonceSubscribe,
    SuggestDifficulty(f64),
    Submit(Submit<'a>),
    /// A method the proxy does not know; relayed as it came in passthrough mode.
    Unknown,
}

/// `mining.configure`: the extensions asked for and, for BIP310, the version-rolling request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Configure {
    pub extensions: Vec<String>,
    pub version_rolling_mask: Option<u32>,
    pub version_rolling_min_bit_count: Option<u32>,
}

impl Configure {
    pub fn wants_version_rolling(&self) -> bool {
        self.extensions.iter().any(|e| e == "version-rolling")
    }
}

/// `mining.submit [worker, job_id, extranonce2, ntime, nonce, (version_bits)]`, as strings. Hex
/// widths are judged by the share checks, not here.
#[derive(Debug, Clone, PartialEq)]
pub struct Submit<'a> {
    pub worker: Cow<'a, str>,
    pub job_id: Cow<'a, str>,
    pub extranonce2: Cow<'a, str>,
    pub ntime: Cow<'a, str>,
    pub nonce: Cow<'a, str>,
    pub version_bits: Option<Cow<'a, str>>,
}

pub const SUBSCRIBE: &str = "mining.subscribe";
pub const AUTHORIZE: &str = "mining.authorize";
pub const CONFIGURE: &str = "mining.configure";
pub const EXTRANONCE_SUBSCRIBE: &str = "mining.extranonce.subscribe";
pub const SUGGEST_DIFFICULTY: &str = "mining.suggest_difficulty";
pub const SUBMIT: &str = "mining.submit";

/// Parses one line from a miner.
pub fn parse(line: &[u8]) -> Result<MinerMessage<'_>, ParseError> {
    let env = parse_envelope(line)?;
    let Some(method) = env.method else {
        if env.result.is_some() || env.error.is_some() {
            return Ok(MinerMessage::Response { id: env.id });
        }
        return Err(ParseError { id: Some(env.id), kind: ParseErrorKind::NoMethod });
    };
    let id = env.id;
    let call = match &*method {
        SUBSCRIBE => {
            // cgminer-style miners add host and port after the session id; they are ignored.
            let p = Params::new(&id, SUBSCRIBE, env.params)?;
            Call::Subscribe { user_agent: p.opt_string(0, "user agent")?, session_id: p.opt_string(1, "session id")? }
        }
        AUTHORIZE => {
            let p = Params::new(&id, AUTHORIZE, env.params)?;
            p.expect_len(1, 2)?;
            let user = p.string(0, "user")?;
            if user.is_empty() {
                return Err(p.error("user must not be empty"));
            }
            Call::Authorize { user, password: p.opt_string(1, "password")?.unwrap_or_default() }
        }
        CONFIGURE => Call::Configure(parse_configure(&Params::new(&id, CONFIGURE, env.params)?)?),
        EXTRANONCE_SUBSCRIBE => {
            Params::new(&id, EXTRANONCE_SUBSCRIBE, env.params)?;
            Call::ExtranonceSubscribe
        }
        SUGGEST_DIFFICULTY => {
            let p = Params::new(&id, SUGGEST_DIFFICULTY, env.params)?;
            p.expect_len(1, 1)?;
            Call::SuggestDifficulty(p.number(0, "difficulty")?)
        }
        SUBMIT => {
            let p = Params::new(&id, SUBMIT, env.params)?;
            p.expect_len(5, 6)?;
            Call::Submit(Submit {
                worker: p.str(0, "worker")?,
                job_id: p.str(1, "job id")?,
                extranonce2: p.str(2, "extranonce2")?,
                ntime: p.str(3, "ntime")?,
                nonce: p.str(4, "nonce")?,
                version_bits: if p.len() == 6 { Some(p.str(5, "version bits")?) } else { None },
            })
        }
        _ => {
            if let Some(params) = env.params {
                if !params.get().starts_with('[') && params.get() != "null" {
                    return Err(ParseError { id: Some(id), kind: ParseErrorKind::ParamsNotArray });
                }
                // Relayed as they came, so they must be JSON a pool can parse: serde_json's
                // recursion limit refuses what would be nested too deep to answer.
                if serde_json::from_str::<serde_json::Value>(params.get()).is_err() {
                    return Err(ParseError::params(&id, "params", "params nested too deeply"));
                }
            }
            Call::Unknown
        }
    };
    Ok(MinerMessage::Request(Request { id, method, params: env.params, call }))
}

fn parse_configure(p: &Params<'_, '_>) -> Result<Configure, ParseError> {
    p.expect_len(1, 2)?;
    let extensions: Vec<String> = p.typed(0, "extensions", "an array of strings")?;
    let mut out = Configure { extensions, ..Configure::default() };
    if p.len() == 2 {
        let opts: serde_json::Map<String, serde_json::Value> = p.typed(1, "extension params", "an object")?;
        if let Some(mask) = opts.get("version-rolling.mask") {
            let parsed = mask.as_str().and_then(|s| {
                // Some firmware drops leading zeros.
                (s.len() <= 8).then(|| u32::from_str_radix(s, 16).ok()).flatten()
            });
            out.version_rolling_mask = Some(parsed.ok_or_else(|| p.error("version-rolling.mask must be hex"))?);
        }
        if let Some(bits) = opts.get("version-rolling.min-bit-count") {
            let bits = bits.as_u64().filter(|b| *b <= 32);
            out.version_rolling_min_bit_count =
                Some(bits.ok_or_else(|| p.error("version-rolling.min-bit-count must be 0 to 32"))? as u32);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(line: &str) -> Call<'_> {
        match parse(line.as_bytes()).unwrap_or_else(|e| panic!("{line}: {e}")) {
            MinerMessage::Request(r) => r.call,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn err(line: &str) -> ParseError {
        parse(line.as_bytes()).expect_err(line)
    }

    #[test]
    fn firmware_subscribes() {
        // cgminer / bmminer (Antminer)
        assert_eq!(
            call(r#"{"id": 1, "method": "mining.subscribe", "params": ["bmminer/2.0.0"]}"#),
            Call::Subscribe { user_agent: Some("bmminer/2.0.0".into()), session_id: None }
        );
        // cpuminer's retry with no params
        assert_eq!(
            call(r#"{"id":1,"method":"mining.subscribe","params":[]}"#),
            Call::Subscribe { user_agent: None, session_id: None }
        );
        // Bitaxe / ESP-Miner
        assert_eq!(
            call(r#"{"id": 1, "method": "mining.subscribe", "params": ["bitaxe/BM1366/v2.4.2"]}"#),
            Call::Subscribe { user_agent: Some("bitaxe/BM1366/v2.4.2".into()), session_id: None }
        );
        // resume with a session id, and cgminer's host/port tail
        assert_eq!(
            call(r#"{"id":2,"method":"mining.subscribe","params":["cgminer/4.12.0","d2a1c4f0","pool.example",3333]}"#),
            Call::Subscribe { user_agent: Some("cgminer/4.12.0".into()), session_id: Some("d2a1c4f0".into()) }
        );
        assert_eq!(
            call(r#"{"id":2,"method":"mining.subscribe","params":["whatsminer/v1.0",null]}"#),
            Call::Subscribe { user_agent: Some("whatsminer/v1.0".into()), session_id: None }
        );
    }

    #[test]
    fn authorize_shapes() {
        assert_eq!(
            call(r#"{"params": ["acct.rig1", "x"], "id": 2, "method": "mining.authorize"}"#),
            Call::Authorize { user: "acct.rig1".into(), password: "x".into() }
        );
        assert_eq!(
            call(r#"{"id":2,"method":"mining.authorize","params":["acct.rig1"]}"#),
            Call::Authorize { user: "acct.rig1".into(), password: String::new() }
        );
        assert_eq!(
            call(r#"{"id":2,"method":"mining.authorize","params":["acct",null]}"#),
            Call::Authorize { user: "acct".into(), password: String::new() }
        );
    }

    #[test]
    fn configure_bip310() {
        let c = call(
            r#"{"id":1,"method":"mining.configure","params":[["version-rolling"],{"version-rolling.mask":"1fffe000","version-rolling.min-bit-count":2}]}"#,
        );
        assert_eq!(
            c,
            Call::Configure(Configure {
                extensions: vec!["version-rolling".into()],
                version_rolling_mask: Some(0x1fffe000),
                version_rolling_min_bit_count: Some(2),
            })
        );
        // Whatsminer asks for several extensions and a full mask.
        let c = call(
            r#"{"id":1,"method":"mining.configure","params":[["minimum-difficulty","version-rolling"],{"minimum-difficulty.value":2048,"version-rolling.mask":"ffffffff","version-rolling.min-bit-count":16}]}"#,
        );
        let Call::Configure(c) = c else { panic!() };
        assert!(c.wants_version_rolling());
        assert_eq!(c.version_rolling_mask, Some(0xffffffff));
    }

    #[test]
    fn nicehash_extranonce_subscribe_and_suggest() {
        assert_eq!(call(r#"{"id":3,"method":"mining.extranonce.subscribe","params":[]}"#), Call::ExtranonceSubscribe);
        assert_eq!(
            call(r#"{"id":3,"method":"mining.suggest_difficulty","params":[512]}"#),
            Call::SuggestDifficulty(512.0)
        );
        assert_eq!(
            call(r#"{"id":3,"method":"mining.suggest_difficulty","params":["0.5"]}"#),
            Call::SuggestDifficulty(0.5)
        );
    }

    #[test]
    fn submits() {
        assert_eq!(
            call(
                r#"{"params": ["acct.rig1", "1a2b", "00000000", "5c8f0a1e", "b2957c02"], "id": 4, "method": "mining.submit"}"#
            ),
            Call::Submit(Submit {
                worker: "acct.rig1".into(),
                job_id: "1a2b".into(),
                extranonce2: "00000000".into(),
                ntime: "5c8f0a1e".into(),
                nonce: "b2957c02".into(),
                version_bits: None,
            })
        );
        let Call::Submit(s) = call(
            r#"{"id":5,"method":"mining.submit","params":["acct.rig1","1a2b","0000000000000001","5c8f0a1e","b2957c02","00a6e000"]}"#,
        ) else {
            panic!()
        };
        assert_eq!(s.version_bits.as_deref(), Some("00a6e000"));
    }

    #[test]
    fn unknown_methods_keep_raw_params() {
        let MinerMessage::Request(r) =
            parse(br#"{"id":9,"method":"mining.get_transactions","params":["7f"]}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(r.call, Call::Unknown);
        assert_eq!(r.method, "mining.get_transactions");
        assert_eq!(r.params.unwrap().get(), r#"["7f"]"#);
    }

    #[test]
    fn malformed_params_keep_the_id() {
        for line in [
            r#"{"id":4,"method":"mining.submit","params":["w","j","00","00"]}"#,
            r#"{"id":4,"method":"mining.submit","params":["w","j","00","00","00","00","00"]}"#,
            r#"{"id":4,"method":"mining.submit","params":["w",1,"00","00","00"]}"#,
            r#"{"id":4,"method":"mining.submit","params":{"worker":"w"}}"#,
            r#"{"id":4,"method":"mining.authorize","params":[]}"#,
            r#"{"id":4,"method":"mining.authorize","params":[7,"x"]}"#,
            r#"{"id":4,"method":"mining.authorize","params":["","x"]}"#,
            r#"{"id":4,"method":"mining.subscribe","params":[5]}"#,
            r#"{"id":4,"method":"mining.suggest_difficulty","params":["abc"]}"#,
            r#"{"id":4,"method":"mining.suggest_difficulty","params":[]}"#,
            r#"{"id":4,"method":"mining.configure","params":["version-rolling"]}"#,
            r#"{"id":4,"method":"mining.configure","params":[["version-rolling"],{"version-rolling.mask":"xyz"}]}"#,
            r#"{"id":4,"method":"mining.foo","params":7}"#,
            r#"{"id":4,"method":"mining.extranonce.subscribe","params":true}"#,
            &format!(r#"{{"id":4,"method":"mining.nope","params":{}{}}}"#, "[".repeat(200), "]".repeat(200)),
            r#"{"id":4,"params":[]}"#,
        ] {
            assert_eq!(err(line).id, Some(Id::number(4)), "{line}");
        }
    }

    #[test]
    fn replies_from_miners_are_recognised() {
        assert!(matches!(
            parse(br#"{"id":1,"result":"cgminer/4.12","error":null}"#).unwrap(),
            MinerMessage::Response { .. }
        ));
    }
}
