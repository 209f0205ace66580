//! The PROXY protocol (v1 text and v2 binary) in front of the miner listener: which sources may
//! send a header, and reading one header off a fresh connection without taking a byte of the
//! Stratum stream behind it.
//!
//! A load balancer such as HAProxy (`send-proxy-v2`) writes the header first on every connection
//! it opens to us; the source address it carries then stands for the miner in the logs, the
//! registry, the per-IP limit and the auth backoff. Parsing is the `ppp` crate's; this module only
//! frames the bytes and decides.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ppp::{v1, v2, PartialResult};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Longest v1 header the specification allows, `\r\n` included.
pub const V1_MAX: usize = 107;
/// Fixed part of a v2 header: signature, version and command, family, length.
const V2_FIXED: usize = 16;
/// Cap on a v2 header's address and TLV block. Addresses need at most 216 bytes (UNIX); the rest
/// is TLVs, which we ignore, so a load balancer sending more is misconfigured.
pub const V2_MAX_PAYLOAD: usize = 512;
/// Longest header of either version we read.
pub const MAX_HEADER: usize = V2_FIXED + V2_MAX_PAYLOAD;

/// An address block such as `10.0.0.0/8` or `::1/128`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` lies in this block. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, as a
    /// dual-stack listener reports IPv4 peers) matches as the IPv4 address it carries.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(u128::from(u32::from(net)) << 96, u128::from(u32::from(ip)) << 96, self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(u128::from(net), u128::from(ip), self.prefix),
            _ => false,
        }
    }
}

/// Whether the top `prefix` bits of `a` and `b` agree.
fn prefix_eq(a: u128, b: u128, prefix: u8) -> bool {
    prefix == 0 || (a ^ b) >> (128 - u32::from(prefix)) == 0
}

impl FromStr for Cidr {
    type Err = String;

    /// `ADDRESS/PREFIX`; a bare address means the single host. Host bits must be zero, so that
    /// `10.1.2.3/8` (probably meant as `10.1.2.3/32`) is caught instead of trusting a whole /8.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let network: IpAddr =
            addr.parse().map_err(|_| format!("{addr:?} is not an IP address; expected e.g. 10.0.0.0/8 or ::1/128"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("prefix length {p:?} must be a number from 0 to {max}")),
            },
        };
        let cidr = Cidr { network, prefix };
        let masked = match network {
            IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
            IpAddr::V6(a) => u128::from(a),
        };
        let host_bits = masked.checked_shl(u32::from(prefix)).unwrap_or(0);
        if host_bits != 0 {
            return Err(format!("{s} has host bits set past the /{prefix} prefix"));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The sources allowed to put a PROXY header in front of a connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trusted(Vec<Cidr>);

impl Trusted {
    /// Parses every block, failing on the first bad one with its index and reason.
    pub fn parse<S: AsRef<str>>(blocks: &[S]) -> Result<Trusted, (usize, String)> {
        blocks
            .iter()
            .enumerate()
            .map(|(i, b)| b.as_ref().parse().map_err(|e| (i, e)))
            .collect::<Result<_, _>>()
            .map(Trusted)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }
}

/// A complete header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Bytes the header takes on the wire; the Stratum stream starts right after them.
    pub len: usize,
    /// The client the load balancer accepted. `None` for a v2 `LOCAL` header (the balancer's own
    /// health check), a v1 `UNKNOWN` one, or a non-TCP family: there is no client to serve.
    pub source: Option<SocketAddr>,
}

/// What [`parse`] makes of the bytes seen so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parse {
    Complete(Header),
    /// Every byte so far belongs to a header that is not finished; read more.
    Incomplete,
}

/// Why a connection's header was refused.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("invalid PROXY header: {0}")]
    Invalid(String),
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("connection closed inside the PROXY header")]
    Truncated,
    /// Closed before sending anything, as a plain TCP health check does.
    #[error("connection closed before a PROXY header")]
    Empty,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
}

/// Parses the start of a connection. Sans-IO: the caller supplies what it has read or peeked.
///
/// The two versions start differently (`\r\n\r\n…` and `PROXY `), so the first bytes decide.
/// A v2 header says its length after 16 bytes; a v1 header ends at its `\n`, and is only handed
/// to `ppp` once that has arrived, since a half-received line such as `PROXY TCP4 1.2.3.4 ` would
/// otherwise read as an empty address.
pub fn parse(input: &[u8]) -> Result<Parse, HeaderError> {
    let signature = v2::PROTOCOL_PREFIX;
    if input.len() < signature.len() && signature.starts_with(input) {
        return Ok(Parse::Incomplete);
    }
    if input.starts_with(signature) {
        // Refuse an oversize header on its first 16 bytes, before reading the rest.
        if input.len() >= V2_FIXED && usize::from(u16::from_be_bytes([input[14], input[15]])) > V2_MAX_PAYLOAD {
            return Err(HeaderError::TooLong);
        }
        return match v2::Header::try_from(input) {
            Err(e) if e.is_incomplete() => Ok(Parse::Incomplete),
            Err(e) => Err(HeaderError::Invalid(e.to_string())),
            Ok(h) => {
                let source = match (h.command, h.addresses) {
                    (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    _ => None,
                };
                Ok(Parse::Complete(Header { len: h.len(), source }))
            }
        };
    }
    const V1_PREFIX: &[u8] = b"PROXY ";
    let started =
        if input.len() < V1_PREFIX.len() { V1_PREFIX.starts_with(input) } else { input.starts_with(V1_PREFIX) };
    if !started {
        return Err(HeaderError::Invalid("expected a v1 (\"PROXY \") or v2 signature".into()));
    }
    let window = &input[..input.len().min(V1_MAX)];
    let Some(end) = window.iter().position(|&b| b == b'\n') else {
        return if input.len() >= V1_MAX { Err(HeaderError::TooLong) } else { Ok(Parse::Incomplete) };
    };
    let h = v1::Header::try_from(&input[..=end]).map_err(|e| HeaderError::Invalid(e.to_string()))?;
    if h.header.len() != end + 1 {
        return Err(HeaderError::Invalid("a v1 header ends with \\r\\n".into()));
    }
    let source = match h.addresses {
        v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Unknown => None,
    };
    Ok(Parse::Complete(Header { len: end + 1, source }))
}

/// Reads one header off `stream` and consumes exactly its bytes, so what follows reaches the
/// Stratum codec untouched. Each round peeks at what has arrived: a complete header is then read
/// to its end; an incomplete one is all header, so it is read whole and the next peek waits for
/// more. Not bounded in time: the caller wraps it in a deadline.
pub async fn read_header(stream: &mut TcpStream) -> Result<Header, HeaderError> {
    let mut header = Vec::with_capacity(64);
    let mut peeked = [0u8; MAX_HEADER];
    loop {
        let room = MAX_HEADER - header.len();
        let n = stream.peek(&mut peeked[..room]).await?;
        if n == 0 {
            return Err(if header.is_empty() { HeaderError::Empty } else { HeaderError::Truncated });
        }
        let seen = header.len();
        header.extend_from_slice(&peeked[..n]);
        match parse(&header)? {
            Parse::Complete(h) => {
                stream.read_exact(&mut peeked[..h.len - seen]).await?;
                return Ok(h);
            }
            Parse::Incomplete => {
                stream.read_exact(&mut peeked[..n]).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppp::v2::{Builder, Command, Protocol, Version};

    fn v2(command: Command, addresses: v2::Addresses) -> Vec<u8> {
        Builder::with_addresses(Version::Two | command, Protocol::Stream, addresses).build().unwrap()
    }

    fn sock(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn complete(input: &[u8]) -> Header {
        match parse(input) {
            Ok(Parse::Complete(h)) => h,
            other => panic!("{input:?}: {other:?}"),
        }
    }

    #[test]
    fn v1_headers() {
        let line = "PROXY TCP4 203.0.113.7 127.0.0.1 50000 3333\r\n";
        let with_stratum = format!("{line}{{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[]}}\n");
        for input in [line.to_owned(), with_stratum] {
            let h = complete(input.as_bytes());
            assert_eq!(h, Header { len: line.len(), source: Some(sock("203.0.113.7:50000")) });
        }
        let h = complete(b"PROXY TCP6 2001:db8::7 ::1 4242 3333\r\n");
        assert_eq!(h.source, Some(sock("[2001:db8::7]:4242")));
        assert_eq!(complete(b"PROXY UNKNOWN\r\n"), Header { len: 15, source: None });
    }

    #[test]
    fn v2_headers() {
        let bytes = v2(Command::Proxy, (sock("203.0.113.7:50000"), sock("127.0.0.1:3333")).into());
        let mut with_stratum = bytes.clone();
        with_stratum.extend_from_slice(b"{\"id\":1}\n");
        for input in [&bytes, &with_stratum] {
            assert_eq!(complete(input), Header { len: bytes.len(), source: Some(sock("203.0.113.7:50000")) });
        }
        let six = v2(Command::Proxy, (sock("[2001:db8::7]:4242"), sock("[::1]:3333")).into());
        assert_eq!(complete(&six).source, Some(sock("[2001:db8::7]:4242")));
        let local = v2(Command::Local, v2::Addresses::Unspecified);
        assert_eq!(complete(&local), Header { len: 16, source: None });
    }

    /// Every strict prefix of a valid header asks for more; none is mistaken for garbage.
    #[test]
    fn prefixes_are_incomplete() {
        let v1 = b"PROXY TCP4 203.0.113.7 127.0.0.1 50000 3333\r\n".to_vec();
        let v2 = v2(Command::Proxy, (sock("[2001:db8::7]:4242"), sock("[::1]:3333")).into());
        for header in [v1, v2] {
            for end in 0..header.len() {
                assert_eq!(parse(&header[..end]).unwrap(), Parse::Incomplete, "{:?}", &header[..end]);
            }
        }
    }

    #[test]
    fn garbage_and_oversize() {
        let invalid = |input: &[u8]| match parse(input) {
            Err(HeaderError::Invalid(_)) => {}
            other => panic!("{input:?}: {other:?}"),
        };
        invalid(b"{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[]}\n");
        invalid(b"GET / HTTP/1.1\r\n");
        invalid(b"PROXY TCP4 999.0.0.1 127.0.0.1 1 2\r\n");
        invalid(b"PROXY TCP4 203.0.113.7 127.0.0.1 70000 3333\r\n");
        invalid(b"PROXY TCP9 1.2.3.4 1.2.3.4 1 2\r\n");
        invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n");
        let mut bad_version = v2(Command::Proxy, (sock("1.2.3.4:1"), sock("5.6.7.8:2")).into());
        bad_version[12] = 0x31;
        invalid(&bad_version);

        let too_long = |input: &[u8]| match parse(input) {
            Err(HeaderError::TooLong) => {}
            other => panic!("{} bytes: {other:?}", input.len()),
        };
        // A v1 line that never ends, and one past 107 bytes.
        too_long(&[b"PROXY TCP6 ".as_slice(), &[b'1'; 120]].concat());
        too_long(format!("PROXY UNKNOWN {}\r\n", "f".repeat(100)).as_bytes());
        // A v2 header declaring more than the cap is refused on its first 16 bytes.
        let mut big = v2::PROTOCOL_PREFIX.to_vec();
        big.extend_from_slice(&[0x21, 0x11]);
        big.extend_from_slice(&((V2_MAX_PAYLOAD + 1) as u16).to_be_bytes());
        too_long(&big);
    }

    #[test]
    fn cidr_matching() {
        let cases: &[(&str, &str, bool)] = &[
            ("10.0.0.0/8", "10.255.1.2", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("127.0.0.1/32", "127.0.0.1", true),
            ("127.0.0.1/32", "127.0.0.2", false),
            ("127.0.0.1", "127.0.0.1", true),
            ("127.0.0.1/32", "::ffff:127.0.0.1", true),
            ("0.0.0.0/0", "192.0.2.1", true),
            ("0.0.0.0/0", "::1", false),
            ("::1/128", "::1", true),
            ("::1/128", "127.0.0.1", false),
            ("2001:db8::/32", "2001:db8:ffff::1", true),
            ("2001:db8::/32", "2001:db9::1", false),
            ("::/0", "2001:db8::1", true),
            ("172.16.0.0/12", "172.31.255.255", true),
            ("172.16.0.0/12", "172.32.0.0", false),
        ];
        for (cidr, ip, expected) in cases {
            let block: Cidr = cidr.parse().unwrap_or_else(|e| panic!("{cidr}: {e}"));
            assert_eq!(block.contains(ip.parse().unwrap()), *expected, "{cidr} ∋ {ip}");
        }
        let trusted = Trusted::parse(&["10.0.0.0/8", "::1/128"]).unwrap();
        assert!(trusted.contains("10.1.1.1".parse().unwrap()));
        assert!(trusted.contains("::1".parse().unwrap()));
        assert!(!trusted.contains("127.0.0.1".parse().unwrap()));
        assert!(!Trusted::default().contains("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn cidr_errors() {
        let cases = [
            ("10.0.0.0/33", "prefix length \"33\""),
            ("::/129", "from 0 to 128"),
            ("10.0.0.0/x", "prefix length \"x\""),
            ("10.0.0/8", "\"10.0.0\" is not an IP address"),
            ("localhost", "not an IP address"),
            ("", "not an IP address"),
            ("10.1.2.3/8", "host bits set"),
            ("2001:db8::1/32", "host bits set"),
        ];
        for (input, needle) in cases {
            let e = input.parse::<Cidr>().expect_err(input);
            assert!(e.contains(needle), "{input}: {e}");
        }
        assert_eq!(Trusted::parse(&["10.0.0.0/8", "nope"]).unwrap_err().0, 1);
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().to_string(), "10.0.0.0/8");
    }
}
