//! The SSRF guard (judges every address kiln is about to dial, after DNS and
//! on every redirect), the HTTP client built around it for fetches and
//! callbacks, outbound URL checks and request path normalisation.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use percent_encoding::percent_decode_str;

use crate::error::{Error, Result};

/// Which addresses outbound connections may reach, and which DNS servers
/// turn host names into addresses.
#[derive(Debug, Clone, Default)]
pub struct NetworkPolicy {
    allow: Vec<IpNet>,
    /// Host names whose every address may be dialled; `.example.com` also
    /// covers its subdomains.
    allow_hosts: Vec<String>,
    /// DNS servers to ask; empty = the system resolver.
    nameservers: Vec<SocketAddr>,
}

impl NetworkPolicy {
    pub fn new(allow: Vec<IpNet>) -> Self {
        NetworkPolicy {
            allow,
            ..Default::default()
        }
    }

    pub fn with_allowed_hosts(mut self, hosts: Vec<String>) -> Self {
        self.allow_hosts = hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect();
        self
    }

    pub fn with_nameservers(mut self, nameservers: Vec<SocketAddr>) -> Self {
        self.nameservers = nameservers;
        self
    }

    /// Public unicast addresses are allowed; everything else only when an
    /// allow-list entry names it.
    pub fn is_allowed(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.allow.iter().any(|net| net.contains(&ip)) || is_public(ip)
    }

    /// Whether an operator named this host as reachable whatever it resolves to.
    pub fn is_allowed_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.allow_hosts
            .iter()
            .any(|entry| match entry.strip_prefix('.') {
                Some(suffix) => host == suffix || host.ends_with(entry.as_str()),
                None => host == *entry,
            })
    }

    pub fn check(&self, ip: IpAddr) -> Result<()> {
        if self.is_allowed(ip) {
            Ok(())
        } else {
            Err(Error::AddressDenied(ip.to_string()))
        }
    }

    /// Scheme, credentials and literal-address checks of an outbound URL.
    /// Host names are judged after DNS, by the resolver that uses this policy.
    pub fn check_url(&self, url: &url::Url) -> Result<()> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::InvalidUrl(format!(
                "scheme {:?} is not http or https",
                url.scheme()
            )));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Error::InvalidUrl(
                "URLs with credentials are refused".into(),
            ));
        }
        match url.host() {
            None => Err(Error::InvalidUrl("URL has no host".into())),
            Some(url::Host::Ipv4(ip)) => self.check(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check(IpAddr::V6(ip)),
            Some(url::Host::Domain(_)) => Ok(()),
        }
    }
}

/// Parses and checks an outbound URL given by a client.
pub fn parse_outbound_url(raw: &str, policy: &NetworkPolicy) -> Result<url::Url> {
    let url = url::Url::parse(raw).map_err(|e| Error::InvalidUrl(format!("{raw:?}: {e}")))?;
    policy.check_url(&url)?;
    Ok(url)
}

/// Resolves host names for the HTTP client and keeps only allowed addresses,
/// so the address dialled is the address judged: a name that resolves
/// differently the second time (DNS rebinding) is judged again.
struct GuardedResolver {
    policy: NetworkPolicy,
    dns: Option<hickory_resolver::TokioResolver>,
}

impl GuardedResolver {
    fn new(policy: &NetworkPolicy) -> GuardedResolver {
        let dns = (!policy.nameservers.is_empty()).then(|| {
            use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
            use hickory_resolver::proto::xfer::Protocol;
            let mut config = ResolverConfig::new();
            for addr in &policy.nameservers {
                config.add_name_server(NameServerConfig::new(*addr, Protocol::Udp));
            }
            let mut opts = ResolverOpts::default();
            // Every connection asks again: a cached answer must not outlive its TTL.
            opts.cache_size = 0;
            opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
            let mut builder = hickory_resolver::TokioResolver::builder_with_config(
                config,
                hickory_resolver::name_server::TokioConnectionProvider::default(),
            );
            *builder.options_mut() = opts;
            builder.build()
        });
        GuardedResolver {
            policy: policy.clone(),
            dns,
        }
    }

    async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>> {
        let unreachable = |e: &dyn std::fmt::Display| {
            Error::OriginUnreachable(format!("cannot resolve {host}: {e}"))
        };
        match &self.dns {
            Some(dns) => Ok(dns
                .lookup_ip(host)
                .await
                .map_err(|e| unreachable(&e))?
                .iter()
                .collect()),
            None => Ok(tokio::net::lookup_host((host, 0))
                .await
                .map_err(|e| unreachable(&e))?
                .map(|addr| addr.ip())
                .collect()),
        }
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let this = GuardedResolver {
            policy: self.policy.clone(),
            dns: self.dns.clone(),
        };
        let host = name.as_str().to_string();
        Box::pin(async move {
            let resolved = this.lookup(&host).await?;
            let host_allowed = this.policy.is_allowed_host(&host);
            let allowed: Vec<SocketAddr> = resolved
                .iter()
                .filter(|ip| host_allowed || this.policy.is_allowed(**ip))
                .map(|ip| SocketAddr::new(*ip, 0))
                .collect();
            if allowed.is_empty() {
                let shown = resolved
                    .first()
                    .map_or("no address".into(), |ip| ip.to_string());
                let denied: Box<dyn std::error::Error + Send + Sync> =
                    Box::new(Error::AddressDenied(format!("{host} resolves to {shown}")));
                return Err(denied);
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// Timeouts and caps of an outbound client.
#[derive(Debug, Clone)]
pub struct ClientLimits {
    pub connect_timeout: Duration,
    pub total_timeout: Duration,
    /// Redirects followed at most; 0: none, a 3xx is the answer.
    pub max_redirects: usize,
    pub user_agent: String,
}

/// An HTTP client whose every connection and redirect passes the policy,
/// with system proxies ignored (a proxy would dial on our behalf unjudged).
pub fn guarded_client(policy: &NetworkPolicy, limits: &ClientLimits) -> Result<reqwest::Client> {
    let redirect_policy = policy.clone();
    let max_redirects = limits.max_redirects;
    let redirects = match max_redirects {
        0 => reqwest::redirect::Policy::none(),
        _ => reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max_redirects {
                return attempt.error(Error::TooManyRedirects(max_redirects));
            }
            match redirect_policy.check_url(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(e) => attempt.error(e),
            }
        }),
    };
    reqwest::Client::builder()
        .no_proxy()
        .dns_resolver(Arc::new(GuardedResolver::new(policy)))
        .redirect(redirects)
        .connect_timeout(limits.connect_timeout)
        .timeout(limits.total_timeout)
        .user_agent(limits.user_agent.clone())
        .build()
        .map_err(|e| Error::Internal(format!("http client: {e}")))
}

/// Recovers kiln's own error (a denied address, too many redirects) from
/// inside a client error, or classifies the client error.
pub fn classify_client_error(e: &reqwest::Error, url: &str) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(ours) = err.downcast_ref::<Error>() {
            return match ours {
                Error::AddressDenied(m) => Error::AddressDenied(m.clone()),
                Error::TooManyRedirects(n) => Error::TooManyRedirects(*n),
                Error::InvalidUrl(m) => Error::InvalidUrl(m.clone()),
                other => Error::OriginUnreachable(other.to_string()),
            };
        }
        source = err.source();
    }
    if e.is_timeout() {
        Error::Timeout(format!("{url}: {e}"))
    } else {
        Error::OriginUnreachable(format!("{url}: {e}"))
    }
}

/// Unwraps IPv6 forms that carry an IPv4 address, so the IPv4 rules judge them.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        // IPv4-mapped ::ffff:a.b.c.d and IPv4-compatible ::a.b.c.d (not :: or ::1).
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(tail),
        [0, 0, 0, 0, 0, 0, hi, _] if hi != 0 => Some(tail),
        // NAT64 well-known prefix 64:ff9b::/96.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(tail),
        // 6to4 2002:AABB:CCDD::/48.
        [0x2002, a, b, ..] => Some(Ipv4Addr::new(
            (a >> 8) as u8,
            a as u8,
            (b >> 8) as u8,
            b as u8,
        )),
        _ => None,
    }
}

fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking 198.18/15
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x2001 && s[1] == 0) // Teredo hides the real peer
        || (s[0] == 0x2001 && s[1] == 0x0002 && s[2] == 0) // benchmarking
        || (s[0] == 0x0100 && s[1..4] == [0, 0, 0]) // discard-only
        || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) // local-use NAT64
        || s[..6] == [0, 0, 0, 0, 0, 0]) // remaining IPv4-compatible forms
}

/// Normalises a request path once, before any use: percent-decodes it and
/// refuses anything that could name a file outside the storage root.
pub fn normalize_path(raw: &str, max_bytes: usize) -> Result<Cow<'_, str>> {
    if raw.len() > max_bytes {
        return Err(Error::InvalidPath(format!("longer than {max_bytes} bytes")));
    }
    let decoded = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| Error::InvalidPath("not UTF-8".into()))?;
    // A second layer of encoding is how traversal hides from one decode.
    // Nothing decoded (borrowed): `raw` holds no `%XX` at all, so none can.
    if let Cow::Owned(decoded) = &decoded {
        let lower = decoded.to_ascii_lowercase();
        if ["%2e", "%2f", "%5c", "%00", "%25"]
            .iter()
            .any(|enc| lower.contains(enc))
        {
            return Err(Error::InvalidPath("encoded separators or dots".into()));
        }
    }
    if decoded.is_empty() {
        return Err(Error::InvalidPath("empty".into()));
    }
    if decoded.starts_with('/') {
        return Err(Error::InvalidPath("absolute".into()));
    }
    if decoded.chars().any(|c| c == '\\' || c.is_control()) {
        return Err(Error::InvalidPath("backslash or control character".into()));
    }
    for segment in decoded.split('/') {
        match segment {
            "" => return Err(Error::InvalidPath("empty segment".into())),
            "." | ".." => return Err(Error::InvalidPath("dot segment".into())),
            _ => {}
        }
    }
    Ok(decoded)
}

/// A new account API key: `kiln_` + 32 random hex digits.
pub fn new_api_key() -> String {
    format!("kiln_{:032x}", rand::random::<u128>())
}

/// Compares a presented key with a stored one in constant time.
pub fn keys_match(presented: &str, stored: &str) -> bool {
    use subtle::ConstantTimeEq;
    !stored.is_empty() && bool::from(presented.as_bytes().ct_eq(stored.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(s: &str) -> bool {
        !NetworkPolicy::default().is_allowed(s.parse().unwrap())
    }

    #[test]
    fn private_and_special_addresses_are_denied() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "::",
            "::1",
            "fe80::1",
            "fc00::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
        ] {
            assert!(denied(ip), "{ip} should be denied");
        }
        for ip in ["93.184.216.34", "2606:4700::1111", "::ffff:93.184.216.34"] {
            assert!(!denied(ip), "{ip} should be allowed");
        }
        let policy = NetworkPolicy::new(vec!["127.0.0.1/32".parse().unwrap()]);
        assert!(policy.is_allowed("127.0.0.1".parse().unwrap()));
        assert!(!policy.is_allowed("127.0.0.2".parse().unwrap()));
    }

    #[test]
    fn outbound_urls() {
        let policy = NetworkPolicy::default();
        for bad in [
            "ftp://example.com/a.jpg",
            "http://user:pw@example.com/a.jpg",
            "http://127.0.0.1/a.jpg",
            // Other spellings of loopback and "this host" are judged as what they mean.
            "http://2130706433/a.jpg",
            "http://0x7f.1/a.jpg",
            "http://0x7f000001/a.jpg",
            "http://0177.0.0.1/a.jpg",
            "http://127.1/a.jpg",
            "http://0/a.jpg",
            "http://169.254.43518/latest",
            "http://[::ffff:7f00:1]/a.jpg",
            "http://[::1]/a.jpg",
            "file:///etc/passwd",
        ] {
            assert!(parse_outbound_url(bad, &policy).is_err(), "{bad}");
        }
        assert!(parse_outbound_url("https://example.com/a.jpg", &policy).is_ok());
    }

    #[test]
    fn paths_are_normalised_or_refused() {
        assert_eq!(normalize_path("a/b%20c.jpg", 100).unwrap(), "a/b c.jpg");
        // Nothing to decode: the request's own bytes, not a copy.
        assert!(matches!(
            normalize_path("a/b-c.jpg", 100).unwrap(),
            Cow::Borrowed("a/b-c.jpg")
        ));
        for bad in [
            "../etc/passwd",
            "a/../../b",
            "%2e%2e/x",
            "a/%2e%2e/x",
            "%252e%252e/x",
            "a\\..\\b",
            "a%5c..%5cb",
            "a/%00b",
            "/etc/passwd",
            "a//b",
            "",
        ] {
            assert!(normalize_path(bad, 100).is_err(), "{bad:?}");
        }
        assert!(normalize_path(&"a".repeat(101), 100).is_err());
    }
}
