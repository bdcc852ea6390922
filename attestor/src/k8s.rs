//! The Kubernetes attestor: `k8s:` selectors for processes in pods.
//!
//! The container ID (and pod UID) come from the kernel's `/proc/<pid>/cgroup`
//! only, then the pod facts from the kubelet's pod list. `mountinfo` is not
//! evidence: a host process with user and mount namespaces can bind-mount
//! another container's cgroup and make its mount table name that container. A process that is in no container gets no `k8s:` selectors and no
//! error, so host processes can still be attested by the Unix attestor.

use std::sync::Arc;
use std::time::Duration;

use crate::cgroup::{ContainerRef, parse_cgroup_file};
use crate::kubelet::{KubeletClient, KubeletConfig, PodListFetcher};
use crate::{AttestError, AttestFuture, Attestor, ProcRoot, ProcessRef, pods};

#[derive(Debug, Clone)]
pub struct K8sAttestorConfig {
    pub kubelet: KubeletConfig,
    /// How often to look again for a container the kubelet does not list yet.
    pub poll_attempts: u32,
    pub poll_interval: Duration,
    /// A cached pod list younger than this answers a first lookup.
    pub cache_max_age: Duration,
}

pub struct K8sAttestor {
    config: K8sAttestorConfig,
    fetcher: Arc<PodListFetcher>,
}

impl K8sAttestor {
    pub fn new(config: K8sAttestorConfig) -> Self {
        let fetcher = PodListFetcher::new(KubeletClient::new(config.kubelet.clone()));
        Self { config, fetcher }
    }

    /// The shared fetcher (exposes the request count).
    pub fn fetcher(&self) -> &Arc<PodListFetcher> {
        &self.fetcher
    }

    fn locate(&self, pid: i32, proc_root: &ProcRoot) -> Result<Option<ContainerRef>, AttestError> {
        let err = |message: String| AttestError::Attestor {
            attestor: "k8s",
            message,
        };
        let cgroup_path = proc_root.pid_path(pid, "cgroup");
        let cgroup = std::fs::read_to_string(&cgroup_path)
            .map_err(|e| err(format!("{}: {e}", cgroup_path.display())))?;
        parse_cgroup_file(&cgroup).map_err(|e| err(e.to_string()))
    }

    async fn selectors(
        &self,
        process: &ProcessRef,
        proc_root: &ProcRoot,
    ) -> Result<Vec<crate::Selector>, AttestError> {
        let Some(container) = self.locate(process.pid, proc_root)? else {
            return Ok(Vec::new());
        };
        let mut seen = 0;
        let mut last_error = None;
        for attempt in 0..self.config.poll_attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(self.config.poll_interval).await;
            }
            let snapshot = self
                .fetcher
                .newer_than(seen, self.config.cache_max_age)
                .await;
            seen = snapshot.version;
            match snapshot.result {
                Ok(list) => {
                    if let Some((pod, status)) =
                        list.find(container.pod_uid.as_deref(), &container.container_id)
                    {
                        return Ok(pods::selectors(pod, status));
                    }
                    last_error = None;
                }
                Err(e) => last_error = Some(e.to_string()),
            }
        }
        let message = match last_error {
            Some(e) => format!(
                "could not list pods after {} attempts: {e}",
                self.config.poll_attempts
            ),
            None => format!(
                "container {} (pod {}) is not listed by the kubelet after {} attempts",
                container.container_id,
                container.pod_uid.as_deref().unwrap_or("unknown"),
                self.config.poll_attempts
            ),
        };
        Err(AttestError::Attestor {
            attestor: "k8s",
            message,
        })
    }
}

impl Attestor for K8sAttestor {
    fn name(&self) -> &'static str {
        "k8s"
    }

    fn attest<'a>(&'a self, process: &'a ProcessRef, proc_root: &'a ProcRoot) -> AttestFuture<'a> {
        Box::pin(self.selectors(process, proc_root))
    }
}
