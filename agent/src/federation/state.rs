//! Foreign bundles kept across restarts, so a restart trusts what was
//! trusted before without waiting for a fetch (the foreign endpoint may be
//! down), and an `https_spiffe` endpoint is authenticated with its latest
//! bundle rather than the bootstrap one. [`KeptBundles`] is where they are
//! kept: [`BundleState`] on a single node (`data_dir`), the fleet store at
//! the authority (`fleet::foreign_bundles`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use crate::identity::ForeignBundle;

pub type SaveFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Where foreign bundles are kept: the document exactly as the endpoint
/// served it, one per trust domain.
pub trait KeptBundles: Send + Sync + 'static {
    /// The kept bundle of `td`, if any. Called when a relationship starts,
    /// so it answers from what is at hand (a store that must be asked over
    /// the network is read once at start).
    fn load(&self, td: &spiffe::TrustDomain) -> Option<ForeignBundle>;

    /// Keeps `bundle`, replacing the trust domain's earlier one.
    fn save(&self, bundle: Arc<ForeignBundle>) -> SaveFuture;

    /// Forgets `td`'s bundle (the relationship ended); may complete in the
    /// background.
    fn remove(&self, td: &spiffe::TrustDomain);
}

/// `data_dir/federation/<trust domain>.json` (0600, atomic write).

#[derive(Debug, Clone)]
pub struct BundleState {
    dir: PathBuf,
}

impl BundleState {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("federation"),
        }
    }

    fn path(&self, td: &spiffe::TrustDomain) -> PathBuf {
        // Trust domain names are [a-z0-9._-]: safe as file names.
        self.dir.join(format!("{}.json", td.as_str()))
    }

    /// The kept bundle of `td`, if any; a file that no longer parses is
    /// reported and ignored (the next fetch replaces it).
    fn load_file(&self, td: &spiffe::TrustDomain) -> Option<ForeignBundle> {
        let path = self.path(td);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read a kept foreign bundle; fetching afresh");
                return None;
            }
        };
        match ForeignBundle::parse(td.clone(), &bytes) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "ignoring a kept foreign bundle that does not parse");
                None
            }
        }
    }

    fn save_file(&self, bundle: &ForeignBundle) -> Result<(), crate::fsutil::FsError> {
        crate::fsutil::create_private_dir(&self.dir)?;
        let path = self.path(&bundle.trust_domain);
        crate::fsutil::write_private_atomic(&path, &bundle.document)
            .map_err(|e| crate::fsutil::FsError::io(&path, e))
    }

    fn remove_file(&self, td: &spiffe::TrustDomain) {
        let path = self.path(td);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot remove the kept bundle of an ended federation")
            }
        }
    }
}

impl KeptBundles for BundleState {
    fn load(&self, td: &spiffe::TrustDomain) -> Option<ForeignBundle> {
        self.load_file(td)
    }

    fn save(&self, bundle: Arc<ForeignBundle>) -> SaveFuture {
        let state = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || state.save_file(&bundle))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
        })
    }

    fn remove(&self, td: &spiffe::TrustDomain) {
        self.remove_file(td);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_bundle_loads_back_as_served_and_a_corrupt_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let state = BundleState::new(dir.path());
        let td = spiffe::TrustDomain::new("other.org").unwrap();
        assert!(state.load(&td).is_none());
        let doc = br#"{"keys": [], "spiffe_sequence": 3}"#;
        let bundle = ForeignBundle::parse(td.clone(), doc).unwrap();
        state.save_file(&bundle).unwrap();
        let path = dir.path().join("federation/other.org.json");
        assert_eq!(std::fs::read(&path).unwrap(), doc);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(state.load(&td), Some(bundle));
        std::fs::write(&path, b"{not json").unwrap();
        assert!(state.load(&td).is_none());
        state.remove(&td);
        assert!(!path.exists());
        state.remove(&td);
    }
}
