//! DNS-rebinding protection: a request whose `Host` names a host this
//! server does not answer for is refused (403) before any handler runs.
//!
//! A rebinding page (a domain of the attacker's that starts resolving to
//! 127.0.0.1) makes the browser send the attacker's name as `Host`; it can
//! never make it send an IP literal or `localhost`, so those always pass
//! (and Kubernetes probes, which send the pod's IP, with them). Other names
//! pass when `--allowed-hosts` lists them (`*`: any; `.example.com`: the
//! name and its subdomains). Without the flag, a server bound to a
//! loopback address allows no other name, and one bound elsewhere
//! (0.0.0.0 in a container, where Services send their own names) allows
//! any.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::serving::openai::ApiError;

/// Which `Host` names a server answers for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPolicy {
    any: bool,
    /// Lowercase names without a port; a leading `.` also matches
    /// subdomains.
    names: Vec<String>,
}

impl HostPolicy {
    /// The policy of a server bound to `bound`: `allowed` (the
    /// `--allowed-hosts` list) when given, else none on a loopback
    /// address and any elsewhere.
    pub fn new(allowed: Option<&[String]>, bound: SocketAddr) -> Self {
        match allowed {
            Some(list) => Self {
                any: list.iter().any(|n| n.trim() == "*"),
                names: list.iter().map(|n| name_of(n.trim())).collect(),
            },
            None => Self {
                any: !bound.ip().is_loopback(),
                names: vec![],
            },
        }
    }

    /// Whether a request with this `Host` header (None: without one, so
    /// not from a browser) may be served.
    pub fn allows(&self, host: Option<&str>) -> bool {
        let Some(host) = host else {
            return true;
        };
        if self.any || is_ip_literal(host) {
            return true;
        }
        let name = name_of(host);
        name == "localhost"
            || name.ends_with(".localhost")
            || self.names.iter().any(|n| match n.strip_prefix('.') {
                Some(domain) => name == domain || name.ends_with(n.as_str()),
                None => name == *n,
            })
    }
}

/// A host's name: lowercase, without its port or a trailing dot.
fn name_of(host: &str) -> String {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// `127.0.0.1`, `10.0.0.5:8000`, `[::1]:8000`: an address, not a name.
fn is_ip_literal(host: &str) -> bool {
    if let Some(rest) = host.strip_prefix('[') {
        return rest
            .split_once(']')
            .is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok());
    }
    name_of(host).parse::<IpAddr>().is_ok()
}

/// The middleware: 403 naming the `Host` and the flag, or the request.
pub async fn check_host(
    State(policy): State<Arc<HostPolicy>>,
    req: Request,
    next: Next,
) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned());
    if policy.allows(host.as_deref()) {
        return next.run(req).await;
    }
    ApiError::HostNotAllowed {
        host: host.unwrap_or_default(),
    }
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(addr: &str) -> SocketAddr {
        addr.parse().unwrap()
    }

    #[test]
    fn a_loopback_server_allows_addresses_and_localhost_but_no_other_name() {
        let p = HostPolicy::new(None, bound("127.0.0.1:8000"));
        for ok in [
            "127.0.0.1:8000",
            "localhost:8000",
            "LOCALHOST",
            "app.localhost:1",
            "[::1]:8000",
            "10.0.0.5:8000",
        ] {
            assert!(p.allows(Some(ok)), "{ok}");
        }
        assert!(p.allows(None), "no Host: not a browser");
        for refused in [
            "evil.example:8000",
            "evil.example",
            "localhost.evil.example",
            "[evil]",
        ] {
            assert!(!p.allows(Some(refused)), "{refused}");
        }
    }

    #[test]
    fn a_server_bound_elsewhere_allows_any_name_unless_the_flag_lists_them() {
        assert!(HostPolicy::new(None, bound("0.0.0.0:8000")).allows(Some("gpt-serve.default.svc")));
        let listed = [
            "api.example.com".to_string(),
            ".svc.cluster.local".to_string(),
        ];
        let p = HostPolicy::new(Some(&listed), bound("0.0.0.0:8000"));
        for ok in [
            "API.example.com:443",
            "gpt-serve.default.svc.cluster.local:8000",
            "10.1.2.3:8000",
        ] {
            assert!(p.allows(Some(ok)), "{ok}");
        }
        for refused in ["example.com", "evil.example", "xsvc.cluster.local"] {
            assert!(!p.allows(Some(refused)), "{refused}");
        }
        let any = HostPolicy::new(Some(&["*".to_string()]), bound("127.0.0.1:8000"));
        assert!(any.allows(Some("evil.example")));
    }
}
