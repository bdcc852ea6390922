//! The slice of the kubelet's `/pods` PodList that attestation needs, and the
//! `k8s:` selectors derived from one pod and container. A small typed model:
//! unknown fields are ignored, missing ones default.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::Selector;

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct PodList {
    pub items: Vec<Pod>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Pod {
    pub metadata: ObjectMeta,
    pub spec: PodSpec,
    pub status: PodStatus,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub owner_references: Vec<OwnerReference>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct OwnerReference {
    pub kind: String,
    pub name: String,
    pub uid: String,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PodSpec {
    pub service_account_name: String,
    pub node_name: String,
    pub containers: Vec<ContainerSpec>,
    pub init_containers: Vec<ContainerSpec>,
    pub ephemeral_containers: Vec<ContainerSpec>,
}

/// A container as the pod's spec names it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PodStatus {
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Unknown`.
    pub phase: String,
    pub container_statuses: Vec<ContainerStatus>,
    pub init_container_statuses: Vec<ContainerStatus>,
    pub ephemeral_container_statuses: Vec<ContainerStatus>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ContainerStatus {
    pub name: String,
    pub image: String,
    #[serde(rename = "imageID")]
    pub image_id: String,
    #[serde(rename = "containerID")]
    pub container_id: String,
}

impl ContainerStatus {
    /// The bare ID of `containerd://<id>`, `cri-o://<id>`, `docker://<id>`.
    pub fn bare_id(&self) -> &str {
        self.container_id
            .split_once("://")
            .map_or(self.container_id.as_str(), |(_, id)| id)
    }
}

impl Pod {
    fn statuses(&self) -> impl Iterator<Item = &ContainerStatus> {
        self.status
            .container_statuses
            .iter()
            .chain(&self.status.init_container_statuses)
            .chain(&self.status.ephemeral_container_statuses)
    }
}

impl Pod {
    /// Adds a status for every container of the spec that has none yet (the
    /// kubelet has not reported it): its name and the image the spec asks
    /// for, no image ID and no container ID. Returns whether any was added.
    ///
    /// The Kubernetes API's view lags the node's: a container can run (and
    /// ask the agent for its identity) before its status reaches the API
    /// server. What the spec says is as trustworthy as what the status says,
    /// so the fleet authority can decide from it; selectors that need the
    /// kubelet's report (`imageID`) are simply absent until it arrives.
    pub fn complete_statuses_from_spec(&mut self) -> bool {
        let mut added = false;
        let spec = &self.spec;
        let status = &mut self.status;
        for (specs, statuses) in [
            (&spec.containers, &mut status.container_statuses),
            (&spec.init_containers, &mut status.init_container_statuses),
            (
                &spec.ephemeral_containers,
                &mut status.ephemeral_container_statuses,
            ),
        ] {
            for c in specs {
                if !statuses.iter().any(|s| s.name == c.name) {
                    statuses.push(ContainerStatus {
                        name: c.name.clone(),
                        image: c.image.clone(),
                        ..ContainerStatus::default()
                    });
                    added = true;
                }
            }
        }
        added
    }
}

impl PodList {
    /// The pod and container running `container_id` (and, when known, in the
    /// pod with `pod_uid`).
    pub fn find(
        &self,
        pod_uid: Option<&str>,
        container_id: &str,
    ) -> Option<(&Pod, &ContainerStatus)> {
        self.items
            .iter()
            .filter(|p| pod_uid.is_none_or(|u| p.metadata.uid == u))
            .find_map(|p| {
                p.statuses()
                    .find(|c| c.bare_id() == container_id)
                    .map(|c| (p, c))
            })
    }
}

/// `k8s:` selectors for a container of a pod.
pub fn selectors(pod: &Pod, container: &ContainerStatus) -> Vec<Selector> {
    let m = &pod.metadata;
    let mut out = vec![
        Selector::new("k8s:ns", &m.namespace),
        Selector::new("k8s:sa", &pod.spec.service_account_name),
        Selector::new("k8s:pod-uid", &m.uid),
        Selector::new("k8s:pod-name", &m.name),
        Selector::new("k8s:container-name", &container.name),
    ];
    if !pod.spec.node_name.is_empty() {
        out.push(Selector::new("k8s:node-name", &pod.spec.node_name));
    }
    for (k, v) in &m.labels {
        out.push(Selector::new("k8s:pod-label", format!("{k}:{v}")));
    }
    for o in &m.owner_references {
        out.push(Selector::new(
            "k8s:pod-owner",
            format!("{}:{}", o.kind, o.name),
        ));
        out.push(Selector::new(
            "k8s:pod-owner-uid",
            format!("{}:{}", o.kind, o.uid),
        ));
    }
    for c in pod.statuses() {
        for image in [&c.image, &c.image_id] {
            if !image.is_empty() {
                out.push(Selector::new("k8s:pod-image", image.as_str()));
            }
        }
    }
    for image in [&container.image, &container.image_id] {
        if !image.is_empty() {
            out.push(Selector::new("k8s:container-image", image.as_str()));
        }
    }
    out.retain(|s| !s.value().is_empty());
    out
}
