//! Bundle endpoint URLs: `https://host[:port][/path][?query]` (Federation
//! spec §5: scheme `https`, no userinfo; a fragment means nothing to a
//! server and is refused too).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointUrl {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// Path and query, at least `/`.
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UrlError(String);

impl EndpointUrl {
    pub fn parse(text: &str) -> Result<Self, UrlError> {
        let err = |m: &str| UrlError(format!("{text:?}: {m}"));
        let rest = text
            .strip_prefix("https://")
            .ok_or_else(|| err("must be an https:// URL"))?;
        if text.contains('#') {
            return Err(err("must not have a fragment"));
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err("must not contain spaces or control characters"));
        }
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(err("must not carry user information"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| err("unclosed '[' in the host"))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| err("bad port"))?),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(err("has no host"));
        }
        let port = match port {
            None => 443,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| err("bad port"))?,
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port,
            path,
        })
    }

    /// `host:port` to connect to.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Where a redirect's `Location` points, from this URL: an absolute
    /// `https://` URL, or an absolute path on the same server.
    pub fn join(&self, location: &str) -> Result<Self, UrlError> {
        if location.starts_with("https://") {
            Self::parse(location)
        } else if location.starts_with('/') && !location.starts_with("//") {
            Self::parse(&format!("https://{}{location}", self.address()))
        } else {
            Err(UrlError(format!(
                "redirect to {location:?}: only https:// URLs and absolute paths are followed"
            )))
        }
    }
}

impl fmt::Display for EndpointUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port == 443 {
            if self.host.contains(':') {
                write!(f, "https://[{}]{}", self.host, self.path)
            } else {
                write!(f, "https://{}{}", self.host, self.path)
            }
        } else {
            write!(f, "https://{}{}", self.address(), self.path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_ports_and_paths() {
        let u = EndpointUrl::parse("https://Bundle.Example.com/td/bundle?x=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("bundle.example.com", 443, "/td/bundle?x=1")
        );
        assert_eq!(u.to_string(), "https://bundle.example.com/td/bundle?x=1");
        let u = EndpointUrl::parse("https://127.0.0.1:8443").unwrap();
        assert_eq!(
            (u.address().as_str(), u.path.as_str()),
            ("127.0.0.1:8443", "/")
        );
        let u = EndpointUrl::parse("https://[::1]:9000/b").unwrap();
        assert_eq!(
            (u.host.as_str(), u.address().as_str()),
            ("::1", "[::1]:9000")
        );
        assert_eq!(u.to_string(), "https://[::1]:9000/b");
    }

    #[test]
    fn refuses_what_the_spec_forbids() {
        for bad in [
            "http://example.com/",
            "https://user@example.com/",
            "https://example.com/#frag",
            "https://:443/",
            "https://example.com:0/",
            "https://example.com:99999/",
            "https://[::1/",
            "https://exa mple.com/",
        ] {
            assert!(EndpointUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn redirects_stay_on_https() {
        let u = EndpointUrl::parse("https://a.example:8443/x").unwrap();
        assert_eq!(
            u.join("/y").unwrap().to_string(),
            "https://a.example:8443/y"
        );
        assert_eq!(
            u.join("https://b.example/z").unwrap().to_string(),
            "https://b.example/z"
        );
        assert!(u.join("http://b.example/z").is_err());
        assert!(u.join("//b.example/z").is_err());
        assert!(u.join("relative").is_err());
    }
}
