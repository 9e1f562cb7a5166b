//! A minimal, blocking HTTP/1.1 client for our own admin API (SPEC §9), used by `jumpvpn
//! status` and the other commands that talk to a gateway.
//!
//! It speaks just enough HTTP for that: `http://HOST:PORT` URLs (no TLS: the admin API listens
//! on a private address), one request per connection (`Connection: close`), a JSON body, an
//! optional bearer token, and answers with `Content-Length`, chunked or read-to-close bodies.
//! A general-purpose HTTP client crate would be far more code than the job needs.

use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use serde::de::DeserializeOwned;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::admin::ErrorBody;

/// How long to wait for a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for each read or write once connected (the admin server itself gives the
/// gateway 5 s to answer).
const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest answer read: a session list of a very busy gateway fits with room to spare.
const MAX_RESPONSE: u64 = 256 << 20;

/// An admin API address: `http://HOST:PORT`, with an optional trailing `/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminUrl {
    /// As given, for messages.
    text: String,
    /// `HOST:PORT` (brackets kept around an IPv6 host), for the `Host` header and resolving.
    authority: String,
}

impl AdminUrl {
    /// The URL as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for AdminUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for AdminUrl {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Self> {
        let invalid = || {
            anyhow!(
                "invalid admin URL {text:?}: expected http://HOST:PORT, \
                 e.g. http://127.0.0.1:51900"
            )
        };
        let rest = text.strip_prefix("http://").ok_or_else(invalid)?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        // The port is whatever follows the last ':' that is not inside IPv6 brackets.
        let (host, port) = authority.rsplit_once(':').ok_or_else(invalid)?;
        let host_ok = if let Some(inner) = host.strip_prefix('[') {
            inner
                .strip_suffix(']')
                .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
        } else {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        };
        let port_ok = !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u16>().is_ok_and(|p| p != 0);
        if !host_ok || !port_ok {
            return Err(invalid());
        }
        Ok(Self {
            text: text.to_owned(),
            authority: authority.to_owned(),
        })
    }
}

/// An answer: the status code, the headers and the body (already de-chunked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// The headers, names as sent, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The server's error message: the `error` of a JSON error body, else the body as text.
    pub fn error_message(&self) -> String {
        match serde_json::from_slice::<ErrorBody>(&self.body) {
            Ok(body) => body.error,
            Err(_) => String::from_utf8_lossy(&self.body).trim().to_owned(),
        }
    }
}

/// A client of one gateway's admin API.
pub struct AdminClient {
    url: AdminUrl,
    token: Option<Zeroizing<String>>,
}

impl fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminClient")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl AdminClient {
    /// A client of the admin API at `url` (`http://HOST:PORT`); the error names the URL.
    pub fn new(url: &str) -> anyhow::Result<Self> {
        Ok(Self {
            url: url.parse()?,
            token: None,
        })
    }

    /// Sends `Authorization: Bearer <token>` with every request.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Zeroizing::new(token.into()));
        self
    }

    /// The admin API's address.
    pub fn url(&self) -> &AdminUrl {
        &self.url
    }

    /// `GET path`, whatever the status.
    pub fn get(&self, path: &str) -> anyhow::Result<Response> {
        self.request("GET", path, None)
    }

    /// `POST path` with `body` as JSON, whatever the status.
    pub fn post_json(&self, path: &str, body: &impl Serialize) -> anyhow::Result<Response> {
        let body = serde_json::to_vec(body).context("cannot encode the request body")?;
        self.request("POST", path, Some(&body))
    }

    /// `GET path`, decoding a 2xx JSON answer; any other status is an error carrying the
    /// server's message.
    pub fn get_json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let response = self.get(path)?;
        self.decode(path, &response)
    }

    /// `POST path` with a JSON body, decoding a 2xx JSON answer; any other status is an error
    /// carrying the server's message.
    pub fn post_json_for<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        let response = self.post_json(path, body)?;
        self.decode(path, &response)
    }

    fn decode<T: DeserializeOwned>(&self, path: &str, response: &Response) -> anyhow::Result<T> {
        if !response.is_success() {
            bail!(
                "admin API at {} answered {} for {path}: {}",
                self.url,
                response.status,
                response.error_message()
            );
        }
        serde_json::from_slice(&response.body).with_context(|| {
            format!(
                "admin API at {} sent an answer to {path} that is not what was expected",
                self.url
            )
        })
    }

    /// One request on a fresh connection.
    fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> anyhow::Result<Response> {
        let mut stream = self
            .connect()
            .with_context(|| format!("cannot reach admin API at {}", self.url))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: jumpvpn/{}\r\n\
             Accept: application/json\r\nConnection: close\r\n",
            self.url.authority,
            env!("CARGO_PKG_VERSION")
        );
        if let Some(body) = body {
            head.push_str("Content-Type: application/json\r\n");
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        let mut head = Zeroizing::new(head);
        if let Some(token) = &self.token {
            // Room for all of it first: a reallocation would leave a copy of the token behind.
            head.reserve(token.len() + 64);
            head.push_str("Authorization: Bearer ");
            head.push_str(token);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let raw = exchange(&mut stream, head.as_bytes(), body)
            .with_context(|| format!("admin API at {} did not answer {method} {path}", self.url))?;
        parse_response(&raw).with_context(|| {
            format!(
                "admin API at {} sent a malformed answer to {method} {path}",
                self.url
            )
        })
    }

    /// Connects to the first address of the host that accepts.
    fn connect(&self) -> std::io::Result<TcpStream> {
        let addrs: Vec<SocketAddr> = self.url.authority.to_socket_addrs()?.collect();
        let mut last = std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the host name resolves to no address",
        );
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(stream) => {
                    stream.set_read_timeout(Some(IO_TIMEOUT))?;
                    stream.set_write_timeout(Some(IO_TIMEOUT))?;
                    return Ok(stream);
                }
                Err(error) => last = error,
            }
        }
        Err(last)
    }
}

/// Writes the request and reads the answer to the end of the connection.
fn exchange(stream: &mut TcpStream, head: &[u8], body: Option<&[u8]>) -> std::io::Result<Vec<u8>> {
    stream.write_all(head)?;
    if let Some(body) = body {
        stream.write_all(body)?;
    }
    stream.flush()?;
    let mut raw = Vec::new();
    stream.take(MAX_RESPONSE).read_to_end(&mut raw)?;
    Ok(raw)
}

/// Parses a whole HTTP/1.1 answer read to the end of the connection.
fn parse_response(raw: &[u8]) -> anyhow::Result<Response> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of headers"))?;
    let (head, rest) = raw.split_at(end);
    let body = rest.get(4..).unwrap_or_default();
    let head = std::str::from_utf8(head).context("headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        bail!("bad status line {status_line:?}");
    };
    if !version.starts_with("HTTP/1.") {
        bail!("bad status line {status_line:?}");
    }
    let status: u16 = code
        .parse()
        .with_context(|| format!("bad status line {status_line:?}"))?;

    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            bail!("bad header line {line:?}");
        };
        let value = value.trim();
        headers.push((name.to_owned(), value.to_owned()));
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse()
                    .with_context(|| format!("bad Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(length) = length {
        body.get(..length)
            .ok_or_else(|| anyhow!("body shorter than its Content-Length {length}"))?
            .to_vec()
    } else {
        body.to_vec()
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// Decodes a chunked body (trailers ignored).
fn dechunk(mut raw: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("truncated chunk size"))?;
        let (size_line, rest) = raw.split_at(line_end);
        let size_text = std::str::from_utf8(size_line).context("bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        let rest = rest.get(2..).unwrap_or_default();
        if size == 0 {
            return Ok(body);
        }
        let chunk = rest.get(..size).ok_or_else(|| anyhow!("truncated chunk"))?;
        body.extend_from_slice(chunk);
        raw = rest.get(size..).unwrap_or_default();
        raw = raw
            .strip_prefix(b"\r\n")
            .ok_or_else(|| anyhow!("chunk not followed by CRLF"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_urls_are_http_host_port_only() {
        for good in [
            "http://127.0.0.1:51900",
            "http://127.0.0.1:51900/",
            "http://gw1.example:80",
            "http://[::1]:51900",
        ] {
            assert!(good.parse::<AdminUrl>().is_ok(), "{good} refused");
        }
        for bad in [
            "https://127.0.0.1:51900",
            "127.0.0.1:51900",
            "http://127.0.0.1",
            "http://127.0.0.1:0",
            "http://127.0.0.1:99999",
            "http://127.0.0.1:51900/v1",
            "http://user@host:1",
            "http://[::1:51900",
            "http://:51900",
        ] {
            let err = bad.parse::<AdminUrl>().expect_err(bad);
            assert!(err.to_string().contains(bad), "{err} does not name {bad}");
        }
    }

    #[test]
    fn responses_with_length_chunks_or_close_are_parsed() {
        let fixed =
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA").expect("parses");
        assert_eq!((fixed.status, fixed.body.as_slice()), (200, &b"ok"[..]));
        assert_eq!(fixed.header("content-length"), Some("2"));

        let chunked = parse_response(
            b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n\
              3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .expect("parses");
        assert_eq!(
            (chunked.status, chunked.body.as_slice()),
            (404, &b"abcde"[..])
        );

        let to_close = parse_response(b"HTTP/1.0 503 Unavailable\r\n\r\n{\"error\":\"down\"}")
            .expect("parses");
        assert_eq!(to_close.status, 503);
        assert_eq!(to_close.error_message(), "down");

        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").is_err());
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"SSH-2.0 x\r\n\r\n").is_err());
    }
}
