//! The client's address. The TCP peer is the client unless it is one of the
//! configured trusted proxies; only then are `X-Forwarded-For` (or, without
//! it, RFC 7239 `Forwarded: for=`) believed, read from the right: the first
//! address that is not itself a trusted proxy is the client. A header from
//! anyone else is ignored, so a caller cannot choose the address that is
//! audited and rate limited.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

/// The client address of a request from `peer`.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops = forwarded_for(headers);
    // Right to left: the nearest hop was added by our own trusted proxy.
    hops.iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .or_else(|| hops.first())
        .copied()
        .unwrap_or(peer)
}

/// The addresses a request passed through, oldest first. An unparseable
/// entry ends the list there: what lies left of it cannot be trusted.
fn forwarded_for(headers: &HeaderMap) -> Vec<IpAddr> {
    let xff: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let entries: Vec<String> = if !xff.is_empty() {
        xff.into_iter().map(str::to_owned).collect()
    } else {
        headers
            .get_all(http::header::FORWARDED)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|element| {
                element.split(';').find_map(|pair| {
                    let (key, value) = pair.trim().split_once('=')?;
                    key.eq_ignore_ascii_case("for")
                        .then(|| value.trim_matches('"').to_owned())
                })
            })
            .collect()
    };
    let mut hops = Vec::new();
    for entry in entries.iter().rev() {
        match parse_node(entry) {
            Some(ip) => hops.push(ip),
            None => break,
        }
    }
    hops.reverse();
    hops
}

/// `1.2.3.4`, `1.2.3.4:80`, `[::1]`, `[::1]:80` or `::1`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse() {
        return Some(ip);
    }
    if let Some(rest) = node.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    let (host, _port) = node.rsplit_once(':')?;
    host.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn forwarded_addresses_are_believed_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        type Case<'a> = (&'a str, &'a [(&'static str, &'a str)], &'a str);
        let cases: &[Case] = &[
            // An untrusted peer's header is ignored.
            ("203.0.113.9", &[("x-forwarded-for", "1.1.1.1")], "203.0.113.9"),
            // A trusted proxy's is read from the right.
            (
                "10.0.0.5",
                &[("x-forwarded-for", "1.1.1.1, 198.51.100.7")],
                "198.51.100.7",
            ),
            (
                "10.0.0.5",
                &[("x-forwarded-for", "198.51.100.7, 10.1.1.1")],
                "198.51.100.7",
            ),
            (
                "10.0.0.5",
                &[("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "198.51.100.7")],
                "198.51.100.7",
            ),
            // Garbage ends the chain: nothing to its left is believed.
            (
                "10.0.0.5",
                &[("x-forwarded-for", "1.1.1.1, nonsense, 10.2.2.2")],
                "10.2.2.2",
            ),
            ("10.0.0.5", &[], "10.0.0.5"),
            (
                "10.0.0.5",
                &[("forwarded", "for=192.0.2.60;proto=http;by=203.0.113.43")],
                "192.0.2.60",
            ),
            (
                "10.0.0.5",
                &[("forwarded", "for=\"[2001:db8:cafe::17]:4711\"")],
                "2001:db8:cafe::17",
            ),
        ];
        for (peer, pairs, want) in cases {
            assert_eq!(
                client_ip(ip(peer), &headers(pairs), &trusted),
                ip(want),
                "{peer} {pairs:?}"
            );
        }
    }
}
