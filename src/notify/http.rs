//! One POST to the webhook over a fresh HTTP/1.1 connection, plain or TLS, and what the answer
//! means for a retry.
//!
//! A connection per POST: POSTs are at most one per coalescing window, so a connection pool would
//! only keep an idle socket open to the operator's chat service.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderMap, CONTENT_TYPE, HOST, RETRY_AFTER, USER_AGENT};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::masked_url;

/// A parsed webhook URL with what it takes to reach it.
#[derive(Clone)]
pub struct Endpoint {
    /// The request target: the URL's path and query.
    target: Uri,
    /// `host:port` to connect to; an IPv6 host keeps its brackets.
    address: String,
    /// The `Host` header: the URL's authority.
    host_header: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// The URL for logs: the path, which carries the token, masked.
    shown: String,
}

/// How one attempt ended.
#[derive(Debug, PartialEq)]
pub enum Attempt {
    /// A 2xx status.
    Delivered,
    /// A status no retry will change (a wrong URL, a revoked token): given up at once.
    Refused(StatusCode),
    /// A connection error, a timeout, 408, 429 or 5xx, with the receiver's `Retry-After`.
    Failed { reason: String, retry_after: Option<Duration> },
}

impl Endpoint {
    /// Parses `url` (`http://` or `https://`); `ca_file` (https only) replaces the system's roots.
    pub fn parse(url: &str, ca_file: &str) -> Result<Self, String> {
        let https = match url.split_once("://") {
            Some(("https", _)) => true,
            Some(("http", _)) => false,
            _ => return Err("expected an http:// or https:// URL".into()),
        };
        let uri: Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
        let authority = uri.authority().ok_or("the URL has no host")?;
        if authority.as_str().contains('@') {
            return Err("credentials in the URL are not supported; most webhooks carry a token in the path".into());
        }
        let host = authority.host();
        if host.is_empty() {
            return Err("the URL has no host".into());
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            let config = crate::tls::verifying_client_config(ca_file)?;
            let name = crate::tls::server_name(host.trim_start_matches('[').trim_end_matches(']'))?;
            Some((TlsConnector::from(config), name))
        } else if !ca_file.is_empty() {
            return Err("webhook_ca_file needs an https:// URL".into());
        } else {
            None
        };
        Ok(Self {
            address: format!("{host}:{port}"),
            host_header: authority.as_str().to_owned(),
            tls,
            shown: masked_url(url),
            target: uri.path_and_query().map_or("/", |p| p.as_str()).parse().map_err(|e| format!("not a URL: {e}"))?,
        })
    }

    /// The URL as logs show it.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// POSTs `body` as JSON, connect to status line within `timeout`.
    pub async fn post(&self, body: Bytes, timeout: Duration) -> Attempt {
        let failed = |reason: String| Attempt::Failed { reason, retry_after: None };
        let response = match tokio::time::timeout(timeout, self.exchange(body)).await {
            Err(_) => return failed(format!("no answer within {timeout:?}")),
            Ok(Err(reason)) => return failed(reason),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if status.is_success() {
            Attempt::Delivered
        } else if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
        {
            Attempt::Failed {
                reason: format!("status {status}"),
                retry_after: retry_after(response.headers(), SystemTime::now()),
            }
        } else {
            Attempt::Refused(status)
        }
    }

    async fn exchange(&self, body: Bytes) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        let request = Request::post(self.target.clone())
            .header(HOST, &self.host_header)
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, concat!("loka-stratum/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let tcp = TcpStream::connect(&self.address).await.map_err(|e| format!("connect: {e}"))?;
        match &self.tls {
            None => send(tcp, request).await,
            Some((connector, name)) => {
                let stream = connector.connect(name.clone(), tcp).await.map_err(|e| format!("TLS: {e}"))?;
                send(stream, request).await
            }
        }
    }
}

/// Sends `request` on `io` and returns the response's head; the body is not read.
async fn send<S>(io: S, request: Request<Full<Bytes>>) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| e.to_string())?;
    let mut conn = std::pin::pin!(conn);
    // The connection is driven beside the request; it ends without an error only once the
    // exchange is over, when `send_request` has its answer too.
    tokio::select! {
        response = sender.send_request(request) => response.map_err(|e| e.to_string()),
        Err(e) = &mut conn => Err(e.to_string()),
    }
}

/// A `Retry-After` header: delay-seconds, or an HTTP date (a date passed is no wait).
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        for (url, address, host, target) in [
            ("http://127.0.0.1:8080/hook", "127.0.0.1:8080", "127.0.0.1:8080", "/hook"),
            ("http://example.com/hook?x=1", "example.com:80", "example.com", "/hook?x=1"),
            ("http://example.com", "example.com:80", "example.com", "/"),
            (
                "https://hooks.example.com/services/T0/B0/XYZ",
                "hooks.example.com:443",
                "hooks.example.com",
                "/services/T0/B0/XYZ",
            ),
            ("http://[::1]:9/h", "[::1]:9", "[::1]:9", "/h"),
        ] {
            let e = Endpoint::parse(url, "").unwrap();
            let parsed = (e.address.as_str(), e.host_header.as_str(), e.target.to_string());
            assert_eq!(parsed, (address, host, target.to_owned()), "{url}");
        }
        assert_eq!(
            Endpoint::parse("https://h.example/services/T0/B0/XYZ", "").unwrap().shown(),
            "https://h.example/***"
        );
        for (url, ca, expected) in [
            ("ftp://example.com/x", "", "expected an http:// or https:// URL"),
            ("example.com/x", "", "expected an http:// or https:// URL"),
            ("http://", "", "not a URL"),
            ("http://u:p@example.com/x", "", "credentials in the URL"),
            ("http://example.com/x", "/ca.pem", "webhook_ca_file needs an https:// URL"),
            ("https://example.com/x", "/nonexistent/ca.pem", "/nonexistent/ca.pem"),
            ("http://exa mple.com/", "", "not a URL"),
        ] {
            let message = Endpoint::parse(url, ca).err().unwrap_or_else(|| panic!("{url} parsed"));
            assert!(message.contains(expected), "{url}: {message:?} lacks {expected:?}");
        }
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let header = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(RETRY_AFTER, value.parse().unwrap());
            retry_after(&headers, now)
        };
        assert_eq!(header("7"), Some(Duration::from_secs(7)));
        assert_eq!(header(" 0 "), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(header(&later), Some(Duration::from_secs(30)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(header(&earlier), Some(Duration::ZERO));
        assert_eq!(header("soon"), None);
        assert_eq!(header("-1"), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }
}
