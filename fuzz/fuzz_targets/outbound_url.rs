//! `security::parse_outbound_url` and `NetworkPolicy::is_allowed`: an
//! accepted URL is http(s), without credentials, and a literal address in
//! it is one the policy allows; an IPv6 wrapper of a denied IPv4 address
//! (mapped, compatible, NAT64, 6to4) is denied too.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kiln::security::{parse_outbound_url, NetworkPolicy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let policy = NetworkPolicy::default();
    if let Ok(raw) = std::str::from_utf8(data) {
        if let Ok(url) = parse_outbound_url(raw, &policy) {
            assert!(matches!(url.scheme(), "http" | "https"), "{raw:?}");
            assert!(
                url.username().is_empty() && url.password().is_none(),
                "credentials in {raw:?}"
            );
            match url.host() {
                Some(url::Host::Ipv4(ip)) => assert!(policy.is_allowed(ip.into()), "{raw:?}"),
                Some(url::Host::Ipv6(ip)) => assert!(policy.is_allowed(ip.into()), "{raw:?}"),
                Some(url::Host::Domain(d)) => {
                    // Numeric spellings of an address must have become an address.
                    assert!(d.parse::<IpAddr>().is_err(), "{raw:?} kept {d:?} as a name");
                }
                None => panic!("accepted {raw:?} without a host"),
            }
        }
    }

    if data.len() >= 4 {
        let v4 = Ipv4Addr::new(data[0], data[1], data[2], data[3]);
        let [a, b, c, d] = v4.octets();
        let hi = u16::from_be_bytes([a, b]);
        let lo = u16::from_be_bytes([c, d]);
        let tail = |i: usize| {
            data.get(4 + 2 * i..6 + 2 * i)
                .map_or(0, |s| u16::from_be_bytes([s[0], s[1]]))
        };
        let wrappers = [
            v4.to_ipv6_mapped(),
            Ipv6Addr::new(0, 0, 0, 0, 0, 0, hi, lo),
            Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, hi, lo),
            Ipv6Addr::new(0x2002, hi, lo, tail(0), tail(1), tail(2), tail(3), tail(4)),
        ];
        if !policy.is_allowed(v4.into()) {
            for w in wrappers {
                assert!(!policy.is_allowed(w.into()), "{w} wraps denied {v4}");
            }
        }
        assert_eq!(
            policy.is_allowed(v4.to_ipv6_mapped().into()),
            policy.is_allowed(v4.into()),
            "::ffff:{v4} judged unlike {v4}"
        );
    }

    if data.len() >= 16 {
        let octets: [u8; 16] = data[..16].try_into().unwrap();
        let v6 = Ipv6Addr::from(octets);
        let s = v6.segments();
        let v4_of = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
        let embedded = match s {
            [0, 0, 0, 0, 0, 0xffff, hi, lo] | [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => {
                Some(v4_of(hi, lo))
            }
            [0, 0, 0, 0, 0, 0, hi, lo] => Some(v4_of(hi, lo)),
            [0x2002, hi, lo, ..] => Some(v4_of(hi, lo)),
            _ => None,
        };
        if let Some(v4) = embedded {
            if !policy.is_allowed(v4.into()) {
                assert!(!policy.is_allowed(v6.into()), "{v6} wraps denied {v4}");
            }
        }
        // Teredo hides its peer: never allowed.
        if s[0] == 0x2001 && s[1] == 0 {
            assert!(!policy.is_allowed(v6.into()), "Teredo {v6}");
        }
    }
});
