//! What an operator can set about SDS (`[sds]` in the config file), with
//! SPIRE's defaults so Envoy configurations written for SPIRE work as is.

/// The resource names with a special meaning, and the validator default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdsConfig {
    /// Names the caller's first X509-SVID (`default_svid_name`).
    pub default_svid_name: String,
    /// Names this trust domain's bundle (`default_bundle_name`).
    pub default_bundle_name: String,
    /// Names every bundle the caller may see (`default_all_bundles_name`).
    pub default_all_bundles_name: String,
    /// Serve plain `trusted_ca` validation contexts instead of Envoy's
    /// SPIFFE validator, unless an Envoy's node metadata asks otherwise.
    pub disable_spiffe_cert_validation: bool,
}

impl Default for SdsConfig {
    fn default() -> Self {
        Self {
            default_svid_name: "default".into(),
            default_bundle_name: "ROOTCA".into(),
            default_all_bundles_name: "ALL".into(),
            disable_spiffe_cert_validation: false,
        }
    }
}

impl SdsConfig {
    /// Why a set of names cannot work: empty, looking like a SPIFFE ID (so
    /// it would shadow one), or two of them equal. Returns the offending
    /// key and the reason.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let names = [
            ("sds.default_svid_name", &self.default_svid_name),
            ("sds.default_bundle_name", &self.default_bundle_name),
            (
                "sds.default_all_bundles_name",
                &self.default_all_bundles_name,
            ),
        ];
        for (i, (key, name)) in names.iter().enumerate() {
            if name.is_empty() {
                return Err((key, "must not be empty".into()));
            }
            if name.to_ascii_lowercase().starts_with("spiffe://") {
                return Err((
                    key,
                    "must not be a SPIFFE ID (those name certificates and trust domains)".into(),
                ));
            }
            if let Some((other, _)) = names[..i].iter().find(|(_, n)| n == name) {
                return Err((key, format!("must differ from {other} (both are {name:?})")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_spires_and_valid() {
        let c = SdsConfig::default();
        assert_eq!(
            (
                c.default_svid_name.as_str(),
                c.default_bundle_name.as_str(),
                c.default_all_bundles_name.as_str()
            ),
            ("default", "ROOTCA", "ALL")
        );
        assert!(!c.disable_spiffe_cert_validation);
        c.check().unwrap();
    }

    #[test]
    fn names_must_be_distinct_non_empty_and_not_ids() {
        let with = |f: fn(&mut SdsConfig)| {
            let mut c = SdsConfig::default();
            f(&mut c);
            c.check().unwrap_err().0
        };
        assert_eq!(
            with(|c| c.default_svid_name.clear()),
            "sds.default_svid_name"
        );
        assert_eq!(
            with(|c| c.default_all_bundles_name = "ROOTCA".into()),
            "sds.default_all_bundles_name"
        );
        assert_eq!(
            with(|c| c.default_bundle_name = "SPIFFE://example.org".into()),
            "sds.default_bundle_name"
        );
    }
}
