//! Agent config files: `Config::parse(text, "fuzz.toml")`.
//!
//! Input: the TOML text.
//!
//! Properties beyond "no panic": a config that parses has a canonical trust
//! domain, every entry's template is in that trust domain and has at least
//! one selector, every TTL is at least 2 seconds and can be added to the
//! current time without leaving the range of an X.509 validity date
//! (GeneralizedTime ends at 9999-12-31T23:59:59Z; the authority computes
//! `not_after = now + ttl` in whole seconds), and every other interval can
//! be added to the current time (`SystemTime`, `Instant` and the agent's
//! whole-second `u64` clocks) without overflowing; every error names the file.
#![no_main]

use std::time::{Duration, Instant, SystemTime};

use libfuzzer_sys::fuzz_target;
use tessera_agent::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, "fuzz.toml") {
        Err(e) => {
            let shown = e.to_string();
            assert!(shown.starts_with("fuzz.toml"), "{shown}");
        }
        Ok(config) => {
            let td = config.trust_domain.as_str();
            assert_eq!(
                spiffe::TrustDomain::new(td)
                    .map(|t| t.to_string())
                    .as_deref(),
                Ok(td)
            );
            let min = Duration::from_secs(2);
            let mut ttls = vec![
                config.x509_ttl,
                config.jwt_ttl,
                config.authority.ca_ttl,
                config.authority.jwt_key_ttl,
            ];
            for entry in config.entries.iter() {
                assert_eq!(entry.template.trust_domain(), td);
                assert!(!entry.selectors.is_empty());
                ttls.push(entry.x509_ttl);
                ttls.push(entry.jwt_ttl);
            }
            let mut intervals = vec![config.shutdown_grace];
            if let Some(k) = &config.k8s_attestor {
                intervals.extend([k.poll_interval, k.kubelet.timeout]);
            }
            if let Some(x) = &config.exchange {
                ttls.push(x.max_ttl);
                intervals.extend([
                    x.policy_reload_interval,
                    x.approval_timeout,
                    x.approval_grant_ttl,
                    x.approval_poll_interval,
                ]);
                assert!(x.default_ttl <= x.max_ttl);
                assert!(x.max_delegation_depth <= 16);
                assert!(!x.issuer.is_empty() && x.issuer.len() <= 512);
                assert_ne!(x.socket_path, config.socket_path);
            }
            // 9999-12-31T23:59:59Z, the last instant a certificate can name.
            const LAST_X509_SECOND: u64 = 253_402_300_799;
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            for ttl in ttls {
                assert!(ttl >= min, "{ttl:?}");
                assert!(
                    now.checked_add(ttl.as_secs())
                        .is_some_and(|end| end <= LAST_X509_SECOND),
                    "a TTL of {ttl:?} ends after the last date a certificate can carry"
                );
            }
            for d in intervals {
                assert!(
                    now.checked_add(d.as_secs())
                        .is_some_and(|end| end <= i64::MAX as u64)
                        && SystemTime::now().checked_add(d).is_some()
                        && Instant::now().checked_add(d).is_some(),
                    "an interval of {d:?} overflows the clock"
                );
            }
        }
    }
});
