//! Selectors: `type:value` facts about a workload, where the type has two
//! parts (`unix:uid`, `k8s:ns`) and the value is everything after them
//! (`k8s:pod-label:app:web` has type `k8s:pod-label`, value `app:web`).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    kind: String,
    value: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorError {
    #[error("selector {0:?} must look like `plugin:type` or `plugin:type:value`")]
    Malformed(String),
}

impl Selector {
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            value: value.into(),
        }
    }

    /// Parse `plugin:type[:value]`. A selector without a value has an empty value
    /// and, in an entry, means "this type must be present".
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let malformed = || SelectorError::Malformed(text.to_string());
        let mut parts = text.splitn(3, ':');
        let plugin = parts
            .next()
            .filter(|s| valid_token(s))
            .ok_or_else(malformed)?;
        let kind = parts
            .next()
            .filter(|s| valid_token(s))
            .ok_or_else(malformed)?;
        let value = parts.next().unwrap_or("");
        if value.chars().any(char::is_control) {
            return Err(malformed());
        }
        Ok(Self::new(format!("{plugin}:{kind}"), value))
    }

    /// The two-part type, e.g. `unix:uid`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    pub fn value(&self) -> &str {
        &self.value
    }
}

fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            f.write_str(&self.kind)
        } else {
            write!(f, "{}:{}", self.kind, self.value)
        }
    }
}

/// The selectors of one workload, sorted and de-duplicated so lookups are
/// binary searches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SelectorSet {
    selectors: Vec<Selector>,
}

impl SelectorSet {
    pub fn new(mut selectors: Vec<Selector>) -> Self {
        selectors.sort();
        selectors.dedup();
        Self { selectors }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Selector> {
        self.selectors.iter()
    }

    pub fn len(&self) -> usize {
        self.selectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.selectors.is_empty()
    }

    pub fn contains(&self, selector: &Selector) -> bool {
        self.selectors.binary_search(selector).is_ok()
    }

    /// Values of every selector of this type, in sorted order.
    pub fn values_of<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        let start = self.selectors.partition_point(|s| s.kind.as_str() < kind);
        self.selectors[start..]
            .iter()
            .take_while(move |s| s.kind == kind)
            .map(|s| s.value.as_str())
    }

    /// The first value (in sorted order) of a selector type.
    pub fn first_value(&self, kind: &str) -> Option<&str> {
        let start = self.selectors.partition_point(|s| s.kind.as_str() < kind);
        self.selectors
            .get(start)
            .filter(|s| s.kind == kind)
            .map(|s| s.value.as_str())
    }

    /// Does a requirement from an entry hold? A requirement with an empty value
    /// only needs the type to be present.
    pub fn satisfies(&self, requirement: &Selector) -> bool {
        if requirement.value.is_empty() {
            self.values_of(&requirement.kind).next().is_some()
        } else {
            self.contains(requirement)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_two_part_types() {
        let s = Selector::parse("k8s:pod-label:app:web").unwrap();
        assert_eq!(s.kind(), "k8s:pod-label");
        assert_eq!(s.value(), "app:web");
        assert_eq!(s.to_string(), "k8s:pod-label:app:web");
        let s = Selector::parse("k8s:ns").unwrap();
        assert_eq!((s.kind(), s.value()), ("k8s:ns", ""));
        for bad in [
            "",
            "unix",
            ":uid",
            "unix::1",
            "un ix:uid:1",
            "unix:uid:a\nb",
        ] {
            assert!(Selector::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn presence_and_exact_requirements() {
        let set = SelectorSet::new(vec![
            Selector::new("unix:uid", "1000"),
            Selector::new("unix:gid", "1000"),
            Selector::new("unix:supplementary_gid", "27"),
            Selector::new("unix:supplementary_gid", "4"),
        ]);
        assert!(set.satisfies(&Selector::parse("unix:uid").unwrap()));
        assert!(set.satisfies(&Selector::parse("unix:uid:1000").unwrap()));
        assert!(!set.satisfies(&Selector::parse("unix:uid:0").unwrap()));
        assert!(!set.satisfies(&Selector::parse("k8s:ns").unwrap()));
        let gids: Vec<_> = set.values_of("unix:supplementary_gid").collect();
        assert_eq!(gids, ["27", "4"]);
    }
}
