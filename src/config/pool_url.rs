//! Pool URLs: `stratum+tcp://host:port` and `stratum+ssl://host:port`.

use std::fmt;
use std::net::Ipv6Addr;

/// A parsed pool URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolUrl {
    /// Host as written, without IPv6 brackets; resolved at connect time.
    pub host: String,
    pub port: u16,
    /// `stratum+ssl://`: the session runs over TLS.
    pub tls: bool,
}

impl PoolUrl {
    /// Parses `stratum+tcp://host:port`. Anything a URL could carry beyond host and port (paths,
    /// user info) is rejected rather than ignored, so a pasted URL never means something else.
    pub fn parse(url: &str) -> Result<PoolUrl, String> {
        let (scheme, rest) = url.split_once("://").ok_or("missing scheme, expected stratum+tcp://host:port")?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "stratum+tcp" => false,
            "stratum+ssl" | "stratum+tls" => true,
            _ => return Err(format!("unsupported scheme {scheme:?}, expected stratum+tcp or stratum+ssl")),
        };
        if rest.contains(['/', '?', '#']) {
            return Err("a pool URL has no path, expected stratum+tcp://host:port".into());
        }
        if rest.contains('@') {
            return Err("user info is not allowed in the URL; set the pool's user and password".into());
        }
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed.split_once(']').ok_or("unclosed '[' in IPv6 address")?;
            host.parse::<Ipv6Addr>().map_err(|_| format!("{host:?} is not an IPv6 address"))?;
            let port = after.strip_prefix(':').ok_or("missing port, expected [ipv6]:port")?;
            (host, port)
        } else {
            let (host, port) = rest.rsplit_once(':').ok_or("missing port, expected host:port")?;
            if host.contains(':') {
                return Err("IPv6 addresses must be in brackets, e.g. [::1]:3333".into());
            }
            if host.is_empty() {
                return Err("empty host".into());
            }
            let valid = host.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
            if !valid {
                return Err(format!("{host:?} is not a valid host name"));
            }
            (host, port)
        };
        let port: u16 = port.parse().map_err(|_| format!("port {port:?} is not a number from 1 to 65535"))?;
        if port == 0 {
            return Err("port 0 is not a valid pool port".into());
        }
        Ok(PoolUrl { host: host.to_owned(), port, tls })
    }
}

impl fmt::Display for PoolUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_urls() {
        let ok = |url: &str, host: &str, port: u16, shown: &str| {
            let parsed = PoolUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(parsed, PoolUrl { host: host.into(), port, tls: url.contains("ssl") }, "{url}");
            assert_eq!(parsed.to_string(), shown);
        };
        ok("stratum+tcp://10.0.0.1:3333", "10.0.0.1", 3333, "10.0.0.1:3333");
        ok("stratum+tcp://[::1]:4444", "::1", 4444, "[::1]:4444");
        ok("stratum+tcp://[2001:db8::7]:1", "2001:db8::7", 1, "[2001:db8::7]:1");
        ok("stratum+tcp://eu.pool-1.example.com:65535", "eu.pool-1.example.com", 65535, "eu.pool-1.example.com:65535");
        ok("STRATUM+TCP://pool:3333", "pool", 3333, "pool:3333");

        let bad = |url: &str, needle: &str| {
            let e = PoolUrl::parse(url).expect_err(url);
            assert!(e.contains(needle), "{url}: {e}");
        };
        ok("stratum+ssl://pool.example:443", "pool.example", 443, "pool.example:443");
        bad("http://pool:80", "unsupported scheme \"http\"");
        bad("pool:3333", "missing scheme");
        bad("stratum+tcp://pool", "missing port");
        bad("stratum+tcp://pool:", "port \"\"");
        bad("stratum+tcp://pool:0", "port 0");
        bad("stratum+tcp://pool:70000", "port \"70000\"");
        bad("stratum+tcp://:3333", "empty host");
        bad("stratum+tcp://pool:3333/path", "no path");
        bad("stratum+tcp://user:pw@pool:3333", "user info");
        bad("stratum+tcp://::1:3333", "in brackets");
        bad("stratum+tcp://[::1]", "missing port");
        bad("stratum+tcp://[nope]:1", "not an IPv6 address");
        bad("stratum+tcp://po ol:1", "not a valid host name");
    }
}
