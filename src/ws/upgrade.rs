//! The HTTP/1.1 WebSocket upgrade (RFC 6455 section 4), server side.
//!
//! Owns: parsing the upgrade request with httparse under a size limit,
//! checking it is a valid WebSocket opening handshake, computing
//! Sec-WebSocket-Accept, and writing the 101 and error responses. Never
//! decides whether a device may connect (the WSM does) and never does I/O.

use base64::Engine;

pub use holdfast_link::types::UpgradeRequest;

/// A refused upgrade, with the HTTP status to answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {reason}")]
pub struct UpgradeError {
    pub status: u16,
    pub reason: &'static str,
}

const fn bad(reason: &'static str) -> UpgradeError {
    UpgradeError { status: 400, reason }
}

const MAX_HEADERS: usize = 64;

fn header_has_token(v: &str, token: &str) -> bool {
    v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Parses the request at the start of `buf`. `Ok(None)` means incomplete;
/// on success returns the request and the bytes it took.
pub fn parse(buf: &[u8], max_bytes: usize, forward: &[String]) -> Result<Option<(UpgradeRequest, usize)>, UpgradeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n > max_bytes => {
            return Err(UpgradeError { status: 431, reason: "request header too large" });
        }
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max_bytes => {
            return Err(UpgradeError { status: 431, reason: "request header too large" });
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(UpgradeError { status: 431, reason: "too many headers" });
        }
        Err(_) => return Err(bad("malformed HTTP request")),
    };
    if req.method != Some("GET") {
        return Err(UpgradeError { status: 405, reason: "only GET upgrades to WebSocket" });
    }
    if req.version != Some(1) {
        return Err(bad("HTTP/1.1 required"));
    }
    let target = origin_form(req.path.unwrap_or("/")).ok_or(bad("request target must be a path or an absolute URI"))?;
    let target = target.as_str();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut out = UpgradeRequest { path: path.to_string(), query: query.to_string(), ..Default::default() };
    let (mut upgrade, mut connection, mut version, mut hosts, mut keys) = (false, false, None, 0, 0);
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        let Ok(value) = std::str::from_utf8(h.value) else {
            return Err(bad("header value is not UTF-8"));
        };
        match name.as_str() {
            "host" => hosts += 1,
            "upgrade" => upgrade |= header_has_token(value, "websocket"),
            "connection" => connection |= header_has_token(value, "upgrade"),
            // Given twice, neither is the one (RFC 6455 11.3.5).
            "sec-websocket-version" if version.is_some() => return Err(bad("Sec-WebSocket-Version given twice")),
            "sec-websocket-version" => version = Some(value.trim().to_string()),
            "sec-websocket-key" => {
                keys += 1;
                out.key = value.trim().to_string();
            }
            "sec-websocket-protocol" => {
                out.subprotocols.extend(value.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()));
            }
            _ => {}
        }
        if forward.contains(&name) {
            out.headers.push((name, value.to_string()));
        }
    }
    // RFC 9112 3.2: exactly one Host (none, or more than one, is a 400).
    match hosts {
        0 => return Err(bad("missing Host")),
        1 => {}
        _ => return Err(bad("Host given twice")),
    }
    if keys > 1 {
        return Err(bad("Sec-WebSocket-Key given twice")); // RFC 6455 11.3.1
    }
    if !upgrade || !connection {
        return Err(UpgradeError { status: 426, reason: "WebSocket upgrade required" });
    }
    if version.as_deref() != Some("13") {
        return Err(UpgradeError { status: 426, reason: "Sec-WebSocket-Version must be 13" });
    }
    match base64::engine::general_purpose::STANDARD.decode(&out.key) {
        Ok(k) if k.len() == 16 => {}
        _ => return Err(bad("Sec-WebSocket-Key must be 16 bytes in base64")),
    }
    Ok(Some((out, consumed)))
}

/// The origin-form (`/path?query`) of a request target: as it is, or taken
/// from an absolute-form target (`https://host/path?query`), which a
/// server must accept (RFC 9112 3.2.2). `None` for anything else (`*`,
/// authority-form, a relative path).
fn origin_form(target: &str) -> Option<String> {
    if target.starts_with('/') {
        return Some(target.to_string());
    }
    let (scheme, rest) = target.split_once("://")?;
    if !["http", "https", "ws", "wss"].iter().any(|s| s.eq_ignore_ascii_case(scheme)) {
        return None;
    }
    // After the authority: the path, or the query if there is no path
    // (`https://host?x` and `https://host` have the empty path, "/").
    Some(match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('/') => rest[i..].to_string(),
        Some(i) => format!("/{}", &rest[i..]),
        None => "/".to_string(),
    })
}

/// Sec-WebSocket-Accept for a Sec-WebSocket-Key.
pub fn accept_key(key: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

/// The WSM's choice of subprotocol, checked before it goes into the 101:
/// it must be one the device offered (RFC 6455 4.2.2), and a token, so it
/// can neither break the response head nor add a header. Empty is none.
pub fn checked_subprotocol(offered: &[String], chosen: Option<String>) -> Result<Option<String>, &'static str> {
    let is_token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    match chosen {
        None => Ok(None),
        Some(c) if c.is_empty() => Ok(None),
        Some(c) if is_token(&c) && offered.contains(&c) => Ok(Some(c)),
        Some(_) => Err("the WSM chose a subprotocol the device did not offer"),
    }
}

pub fn response_101(key: &str, subprotocol: Option<&str>) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    if let Some(p) = subprotocol {
        r.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

fn status_text(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// A complete error response that closes the connection.
pub fn response_error(status: u16, reason: &str) -> Vec<u8> {
    response_error_retry(status, reason, None)
}

/// As [`response_error`], telling the device when to try again
/// (`Retry-After`, seconds; RFC 9110 10.2.3).
pub fn response_error_retry(status: u16, reason: &str, retry_after: Option<u32>) -> Vec<u8> {
    let body = format!("{reason}\n");
    let mut extra = if status == 426 { "Sec-WebSocket-Version: 13\r\n".to_string() } else { String::new() };
    if let Some(s) = retry_after {
        extra.push_str(&format!("Retry-After: {s}\r\n"));
    }
    format!(
        "HTTP/1.1 {status} {}\r\n{extra}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        status_text(status),
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ: &str = "GET /dev/ice?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: v2.iot, v1.iot\r\nUser-Agent: oven/1.0\r\n\r\n";

    #[test]
    fn rfc6455_accept_example() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn parses_valid_upgrade() {
        let (r, n) = parse(REQ.as_bytes(), 8192, &["user-agent".into()]).unwrap().unwrap();
        assert_eq!(n, REQ.len());
        assert_eq!((r.path.as_str(), r.query.as_str()), ("/dev/ice", "x=1"));
        assert_eq!(r.subprotocols, vec!["v2.iot", "v1.iot"]);
        assert_eq!(checked_subprotocol(&r.subprotocols, Some("v1.iot".into())), Ok(Some("v1.iot".into())));
        assert_eq!(checked_subprotocol(&r.subprotocols, None), Ok(None));
        assert_eq!(checked_subprotocol(&r.subprotocols, Some(String::new())), Ok(None));
        for bad in ["v3.iot", "v1.iot\r\nSet-Cookie: a=b", "v1.iot ", ""] {
            if !bad.is_empty() {
                assert!(checked_subprotocol(&r.subprotocols, Some(bad.into())).is_err(), "{bad:?}");
            }
        }
        assert!(checked_subprotocol(&["a\r\nX: y".to_string()], Some("a\r\nX: y".into())).is_err(), "not a token");
        assert_eq!(r.headers, vec![("user-agent".to_string(), "oven/1.0".to_string())]);
    }

    #[test]
    fn partial_and_oversize() {
        assert_eq!(parse(&REQ.as_bytes()[..30], 8192, &[]), Ok(None));
        assert_eq!(parse(&REQ.as_bytes()[..150], 100, &[]).unwrap_err().status, 431);
    }

    #[test]
    fn refusals_carry_status() {
        let cases = [
            ("POST / HTTP/1.1\r\nHost: h\r\n\r\n", 405),
            ("GARBAGE\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: h\r\n\r\n", 426),
            ("GET / HTTP/1.0\r\nHost: h\r\n\r\n", 400),
        ];
        for (req, status) in cases {
            assert_eq!(parse(req.as_bytes(), 8192, &[]).unwrap_err().status, status, "{req}");
        }
        let no_key = REQ.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "");
        assert_eq!(parse(no_key.as_bytes(), 8192, &[]).unwrap_err().status, 400);
        let old = REQ.replace("Version: 13", "Version: 8");
        assert_eq!(parse(old.as_bytes(), 8192, &[]).unwrap_err().status, 426);
    }

    #[test]
    fn a_header_that_must_be_single_given_twice_is_a_400() {
        // RFC 9112 3.2 (Host), RFC 6455 11.3.1 (Key) and 11.3.5 (Version).
        for (twice, what) in [
            ("Host: h\r\n", "Host"),
            ("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "Sec-WebSocket-Key"),
            ("Sec-WebSocket-Version: 13\r\n", "Sec-WebSocket-Version"),
        ] {
            let req = REQ.replacen(twice, &format!("{twice}{twice}"), 1);
            let e = parse(req.as_bytes(), 8192, &[]).unwrap_err();
            assert_eq!(e.status, 400, "{what} twice");
            assert!(e.reason.contains(what), "{what}: {}", e.reason);
        }
    }

    #[test]
    fn an_absolute_form_target_is_accepted_as_its_path() {
        // RFC 9112 3.2.2: a server must accept the absolute form.
        for (target, path, query) in [
            ("https://edge.example:443/dev/ice?x=1", "/dev/ice", "x=1"),
            ("wss://edge.example/", "/", ""),
            ("HTTPS://edge.example", "/", ""),
            ("https://edge.example?x=1", "/", "x=1"),
        ] {
            let req = REQ.replacen("/dev/ice?x=1", target, 1);
            let (r, _) = parse(req.as_bytes(), 8192, &[]).unwrap().unwrap_or_else(|| panic!("{target}"));
            assert_eq!((r.path.as_str(), r.query.as_str()), (path, query), "{target}");
        }
        for bad_target in ["*", "edge.example:443", "dev/ice", "ftp://x/y"] {
            let req = REQ.replacen("/dev/ice?x=1", bad_target, 1);
            assert_eq!(parse(req.as_bytes(), 8192, &[]).unwrap_err().status, 400, "{bad_target}");
        }
    }

    #[test]
    fn error_response_is_complete_http() {
        let r = String::from_utf8(response_error_retry(503, "busy", Some(17))).unwrap();
        assert!(r.contains("\r\nRetry-After: 17\r\n"), "{r}");
        let r = String::from_utf8(response_error(503, "no WSM reachable")).unwrap();
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(r.ends_with("\r\n\r\nno WSM reachable\n"));
    }
}
