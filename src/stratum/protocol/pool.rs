//! What pools send: replies to the proxy's requests, and the pool's own notifications.
//!
//! Every job is decoded and width-checked here, so a job that could not be parsed never reaches a miner.

use serde_json::value::RawValue;

use super::{parse_envelope, Id, Params, ParseError, ParseErrorKind};

#[derive(Debug)]
pub enum PoolMessage<'a> {
    /// A reply to a request the proxy sent.
    Response {
        id: Id,
        result: Option<&'a RawValue>,
        error: Option<&'a RawValue>,
    },
    Notify(Notify),
    SetDifficulty(f64),
    SetExtranonce {
        extranonce1: Vec<u8>,
        extranonce2_size: usize,
    },
    SetVersionMask(u32),
    Reconnect {
        host: Option<String>,
        port: Option<u16>,
        wait: u64,
    },
    ShowMessage(String),
    /// `client.get_version`: a request that expects a reply.
    GetVersion {
        id: Id,
    },
    /// A method the proxy does not know.
    Unknown {
        method: String,
    },
}

/// `mining.notify`, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Notify {
    pub job_id: String,
    /// As in the notify: 32 bytes, each 4-byte word byte-reversed against the header order.
    pub prevhash: [u8; 32],
    pub coinb1: Vec<u8>,
    pub coinb2: Vec<u8>,
    pub merkle_branch: Vec<[u8; 32]>,
    pub version: u32,
    pub nbits: u32,
    pub ntime: u32,
    pub clean_jobs: bool,
}

pub const NOTIFY: &str = "mining.notify";
pub const SET_DIFFICULTY: &str = "mining.set_difficulty";
pub const SET_EXTRANONCE: &str = "mining.set_extranonce";
pub const SET_VERSION_MASK: &str = "mining.set_version_mask";
pub const RECONNECT: &str = "client.reconnect";
pub const SHOW_MESSAGE: &str = "client.show_message";
pub const GET_VERSION: &str = "client.get_version";

/// Bounds on what a pool may send in a job; anything larger is treated as a broken pool.
pub const MAX_COINBASE_PART: usize = 64 * 1024;
pub const MAX_MERKLE_BRANCH: usize = 32;
/// Extranonce sizes a miner can work with.
pub const MAX_EXTRANONCE2_SIZE: usize = 16;
pub const MAX_EXTRANONCE1_SIZE: usize = 32;

/// Parses one line from a pool.
pub fn parse(line: &[u8]) -> Result<PoolMessage<'_>, ParseError> {
    let env = parse_envelope(line)?;
    let id = env.id;
    let Some(method) = env.method else {
        if id.is_null() && env.result.is_none() && env.error.is_none() {
            return Err(ParseError { id: None, kind: ParseErrorKind::NoMethod });
        }
        return Ok(PoolMessage::Response { id, result: env.result, error: env.error });
    };
    Ok(match &*method {
        NOTIFY => PoolMessage::Notify(parse_notify(&Params::new(&id, NOTIFY, env.params)?)?),
        SET_DIFFICULTY => {
            let p = Params::new(&id, SET_DIFFICULTY, env.params)?;
            p.expect_len(1, 1)?;
            let d = p.number(0, "difficulty")?;
            if !(d.is_finite() && d > 0.0 && d < 1e30) {
                return Err(p.error(format!("difficulty out of range: {d}")));
            }
            PoolMessage::SetDifficulty(d)
        }
        SET_EXTRANONCE => {
            let p = Params::new(&id, SET_EXTRANONCE, env.params)?;
            p.expect_len(2, 2)?;
            let extranonce1 = p.hex_bytes(0, "extranonce1", MAX_EXTRANONCE1_SIZE)?;
            let size: i64 = p.typed(1, "extranonce2_size", "an integer")?;
            PoolMessage::SetExtranonce { extranonce1, extranonce2_size: extranonce2_size(&p, size)? }
        }
        SET_VERSION_MASK => {
            let p = Params::new(&id, SET_VERSION_MASK, env.params)?;
            p.expect_len(1, 1)?;
            PoolMessage::SetVersionMask(p.hex_u32(0, "mask")?)
        }
        RECONNECT => {
            let p = Params::new(&id, RECONNECT, env.params)?;
            let host = p.opt_string(0, "host")?.filter(|h| !h.is_empty());
            let port = match p.raw(1) {
                None => None,
                Some(_) => {
                    let n = p.number(1, "port")?;
                    Some(
                        u16::try_from(n as i64)
                            .ok()
                            .filter(|p| *p != 0 && n.fract() == 0.0)
                            .ok_or_else(|| p.error("bad port"))?,
                    )
                }
            };
            let wait = match p.raw(2) {
                None => 0,
                Some(_) => p.number(2, "wait")?.clamp(0.0, 3600.0) as u64,
            };
            PoolMessage::Reconnect { host, port, wait }
        }
        SHOW_MESSAGE => {
            let p = Params::new(&id, SHOW_MESSAGE, env.params)?;
            PoolMessage::ShowMessage(p.opt_string(0, "message")?.unwrap_or_default())
        }
        GET_VERSION => PoolMessage::GetVersion { id },
        other => PoolMessage::Unknown { method: other.to_owned() },
    })
}

/// The extranonce2 size from a subscribe reply or `set_extranonce`, within what miners can use.
pub(crate) fn extranonce2_size(p: &Params<'_, '_>, size: i64) -> Result<usize, ParseError> {
    match usize::try_from(size) {
        Ok(s @ 1..=MAX_EXTRANONCE2_SIZE) => Ok(s),
        _ => Err(p.error(format!("extranonce2_size out of range: {size}"))),
    }
}

fn parse_notify(p: &Params<'_, '_>) -> Result<Notify, ParseError> {
    if p.len() < 9 {
        return Err(p.error(format!("expected 9 params, got {}", p.len())));
    }
    let job_id = p.string(0, "job id")?;
    if job_id.is_empty() || job_id.len() > 128 {
        return Err(p.error("job id must be 1 to 128 characters"));
    }
    let prevhash = hash32(p, p.hex_bytes(1, "prevhash", 32)?, "prevhash")?;
    let coinb1 = p.hex_bytes(2, "coinb1", MAX_COINBASE_PART)?;
    let coinb2 = p.hex_bytes(3, "coinb2", MAX_COINBASE_PART)?;
    let branch: Vec<&str> = p.typed(4, "merkle branch", "an array of hex strings")?;
    if branch.len() > MAX_MERKLE_BRANCH {
        return Err(p.error(format!("merkle branch has {} entries, more than {MAX_MERKLE_BRANCH}", branch.len())));
    }
    let mut merkle_branch = Vec::with_capacity(branch.len());
    for h in branch {
        let bytes = hex::decode(h).map_err(|_| p.error("merkle branch entries must be hex"))?;
        merkle_branch.push(hash32(p, bytes, "merkle branch entry")?);
    }
    Ok(Notify {
        job_id,
        prevhash,
        coinb1,
        coinb2,
        merkle_branch,
        version: p.hex_u32(5, "version")?,
        nbits: p.hex_u32(6, "nbits")?,
        ntime: p.hex_u32(7, "ntime")?,
        clean_jobs: p.typed(8, "clean_jobs", "a boolean")?,
    })
}

fn hash32(p: &Params<'_, '_>, bytes: Vec<u8>, name: &'static str) -> Result<[u8; 32], ParseError> {
    bytes.try_into().map_err(|_| p.error(format!("{name} must be 32 bytes")))
}

impl Notify {
    /// Appends this job as a `mining.notify` line, in the hex shapes pools send. Hex is written
    /// straight into `buf`: a job goes to every miner of a session, so this stays allocation-free.
    pub fn write(&self, buf: &mut Vec<u8>) {
        self.write_as(buf, &self.job_id, self.ntime, self.clean_jobs);
    }

    /// Appends this job as a `mining.notify` line under another job id, ntime and clean flag.
    pub fn write_as(&self, buf: &mut Vec<u8>, job_id: &str, ntime: u32, clean_jobs: bool) {
        fn hex_field(buf: &mut Vec<u8>, bytes: &[u8]) {
            const DIGITS: &[u8; 16] = b"0123456789abcdef";
            buf.push(b'"');
            for b in bytes {
                buf.extend_from_slice(&[DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xf)]]);
            }
            buf.extend_from_slice(b"\",");
        }
        buf.extend_from_slice(b"{\"id\":null,\"method\":\"mining.notify\",\"params\":[");
        serde_json::to_writer(&mut *buf, job_id).expect("serialise to Vec");
        buf.push(b',');
        hex_field(buf, &self.prevhash);
        hex_field(buf, &self.coinb1);
        hex_field(buf, &self.coinb2);
        buf.push(b'[');
        for (i, entry) in self.merkle_branch.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            hex_field(buf, entry);
            buf.pop();
        }
        buf.extend_from_slice(b"],");
        for word in [self.version, self.nbits, ntime] {
            hex_field(buf, &word.to_be_bytes());
        }
        buf.extend_from_slice(if clean_jobs { b"true]}\n" } else { b"false]}\n" });
    }
}

/// `mining.subscribe`'s result: `[subscriptions, extranonce1, extranonce2_size]`.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscribeResult {
    pub extranonce1: Vec<u8>,
    pub extranonce2_size: usize,
}

pub fn parse_subscribe_result(result: &RawValue) -> Option<SubscribeResult> {
    let (_subs, en1, size): (&RawValue, &str, i64) = serde_json::from_str(result.get()).ok()?;
    if en1.len() > MAX_EXTRANONCE1_SIZE * 2 {
        return None;
    }
    let extranonce1 = hex::decode(en1).ok()?;
    let extranonce2_size = usize::try_from(size).ok().filter(|s| (1..=MAX_EXTRANONCE2_SIZE).contains(s))?;
    Some(SubscribeResult { extranonce1, extranonce2_size })
}

/// `mining.configure`'s result: the negotiated version-rolling mask, if rolling was granted.
pub fn parse_configure_result(result: &RawValue) -> Option<u32> {
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(result.get()).ok()?;
    if map.get("version-rolling")?.as_bool()? {
        let mask = map.get("version-rolling.mask")?.as_str()?;
        (mask.len() <= 8).then(|| u32::from_str_radix(mask, 16).ok()).flatten()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A notify in the shape ckpool sends (block 125552's prevhash, word-swapped as stratum does).
    const NOTIFY_LINE: &str = r#"{"id":null,"method":"mining.notify","params":["4f3a","ab02cd818b9e567ee21793cddef299fe8b29ad44a3a41b85000008a300000000","01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff0704","0a636b706f6f6cffffffff0100f2052a010000001976a914000000000000000000000000000000000000000088ac00000000",["2b12fcf1b09288fcaff797d71e950e71ae42b91e8bdb2304758dfcffc2b620e3"],"00000001","1a44b9f2","4dd7f5c7",true]}"#;

    #[test]
    fn notify_is_decoded() {
        let PoolMessage::Notify(n) = parse(NOTIFY_LINE.as_bytes()).unwrap() else { panic!() };
        assert_eq!(n.job_id, "4f3a");
        assert_eq!(n.version, 1);
        assert_eq!(n.nbits, 0x1a44b9f2);
        assert_eq!(n.ntime, 1305998791);
        assert_eq!(n.merkle_branch.len(), 1);
        assert_eq!(n.prevhash[0], 0xab);
        assert!(n.clean_jobs);
    }

    #[test]
    fn notify_round_trips() {
        let PoolMessage::Notify(n) = parse(NOTIFY_LINE.as_bytes()).unwrap() else { panic!() };
        let mut buf = Vec::new();
        n.write(&mut buf);
        assert_eq!(buf.last(), Some(&b'\n'));
        let PoolMessage::Notify(again) = parse(&buf[..buf.len() - 1]).unwrap() else { panic!() };
        assert_eq!(again, n);
        let original: serde_json::Value = serde_json::from_str(NOTIFY_LINE).unwrap();
        let written: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(original, written);
        // A job id that needs escaping, no branch, and clean_jobs false.
        let odd = Notify { job_id: "a\"b".into(), merkle_branch: vec![], clean_jobs: false, ..n };
        buf.clear();
        odd.write(&mut buf);
        let PoolMessage::Notify(again) = parse(&buf[..buf.len() - 1]).unwrap() else { panic!() };
        assert_eq!(again, odd);
    }

    #[test]
    fn hostile_notifies_are_rejected() {
        let base: serde_json::Value = serde_json::from_str(NOTIFY_LINE).unwrap();
        let with = |i: usize, v: serde_json::Value| {
            let mut m = base.clone();
            m["params"][i] = v;
            m.to_string()
        };
        let cases = [
            with(0, serde_json::json!(5)),
            with(1, serde_json::json!("abcd")),
            with(2, serde_json::json!("0g")),
            with(2, serde_json::json!("a".repeat(2 * MAX_COINBASE_PART + 2))),
            with(4, serde_json::json!(vec!["00".repeat(32); 33])),
            with(4, serde_json::json!(["00"])),
            with(5, serde_json::json!("1")),
            with(8, serde_json::json!("true")),
        ];
        for line in cases {
            assert!(parse(line.as_bytes()).is_err(), "{}", &line[..line.len().min(200)]);
        }
        assert!(parse(br#"{"id":null,"method":"mining.notify","params":["a"]}"#).is_err());
    }

    #[test]
    fn difficulty_bounds() {
        assert!(matches!(
            parse(br#"{"id":null,"method":"mining.set_difficulty","params":[0.0001]}"#).unwrap(),
            PoolMessage::SetDifficulty(d) if d == 0.0001
        ));
        for bad in ["0", "-1", "1e300", "\"NaN\"", "\"x\""] {
            let line = format!(r#"{{"id":null,"method":"mining.set_difficulty","params":[{bad}]}}"#);
            assert!(parse(line.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn other_notifications() {
        assert!(matches!(
            parse(br#"{"id":null,"method":"mining.set_extranonce","params":["08000002",4]}"#).unwrap(),
            PoolMessage::SetExtranonce { extranonce2_size: 4, .. }
        ));
        for bad in ["0", "-1", "17", "\"4\""] {
            let line = format!(r#"{{"id":null,"method":"mining.set_extranonce","params":["08000002",{bad}]}}"#);
            assert!(parse(line.as_bytes()).is_err(), "{bad}");
        }
        assert!(matches!(
            parse(br#"{"id":null,"method":"mining.set_version_mask","params":["1fffe000"]}"#).unwrap(),
            PoolMessage::SetVersionMask(0x1fffe000)
        ));
        assert!(matches!(
            parse(br#"{"id":null,"method":"client.reconnect","params":["pool.example",3334,5]}"#).unwrap(),
            PoolMessage::Reconnect { port: Some(3334), wait: 5, .. }
        ));
        assert!(matches!(
            parse(br#"{"id":null,"method":"client.reconnect","params":[]}"#).unwrap(),
            PoolMessage::Reconnect { host: None, port: None, wait: 0 }
        ));
        assert!(matches!(
            parse(br#"{"id":null,"method":"client.show_message","params":["maintenance at 12:00"]}"#).unwrap(),
            PoolMessage::ShowMessage(m) if m == "maintenance at 12:00"
        ));
        assert!(matches!(
            parse(br#"{"id":"v1","method":"client.get_version","params":[]}"#).unwrap(),
            PoolMessage::GetVersion { id } if id.as_json() == "\"v1\""
        ));
    }

    #[test]
    fn replies() {
        let PoolMessage::Response { id, result, error } = parse(
            br#"{"id":3,"result":[[["mining.set_difficulty","1"],["mining.notify","1"]],"08000002",4],"error":null}"#,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(id.as_u64(), Some(3));
        assert!(error.is_none());
        assert_eq!(
            parse_subscribe_result(result.unwrap()),
            Some(SubscribeResult { extranonce1: vec![8, 0, 0, 2], extranonce2_size: 4 })
        );
        let raw =
            RawValue::from_string(r#"{"version-rolling":true,"version-rolling.mask":"1fffe000"}"#.into()).unwrap();
        assert_eq!(parse_configure_result(&raw), Some(0x1fffe000));
    }
}
