//! The authority's view of the cluster, from the Kubernetes API: TokenReview
//! for node attestation, and the pods scheduled on a node for entitlement.
//!
//! The API server is the only source of truth; the authority keeps nothing
//! but a short per-node pod cache, refreshed before any refusal, so a pod
//! that was just scheduled is never refused because of a stale list.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use serde::Deserialize;
use serde_json::json;
use tessera_attestor::pods::{Pod, PodList};

use crate::transport::https_client as http;

#[derive(Debug, Clone)]
pub struct KubeConfig {
    /// `https://host[:port]`.
    pub api_server: String,
    pub ca_file: PathBuf,
    /// The authority's own service account token (re-read on every call).
    pub token_file: PathBuf,
    /// The audience agents' projected tokens must carry.
    pub audience: String,
    /// `namespace:service-account` of the agent DaemonSet.
    pub allowed_service_accounts: Vec<String>,
    pub pod_cache_ttl: Duration,
    pub timeout: Duration,
}

/// Why a token did not attest a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    /// The API server could not be asked (unreachable, our own credentials
    /// refused, a 5xx): nothing is known about the token; retry.
    #[error("{0}")]
    Unavailable(String),
    /// The API server answered: this token does not attest a node.
    #[error("{0}")]
    Rejected(String),
}

/// A node proved by a bound service account token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewedNode {
    pub node_name: String,
    /// `namespace/name` of the agent pod the token was bound to.
    pub agent_pod: String,
}

pub struct KubeClient {
    config: KubeConfig,
    addr: String,
    host: String,
    tls: Arc<rustls::ClientConfig>,
    pods: Mutex<HashMap<String, (Instant, Arc<PodList>)>>,
    /// The last access check and when it was made ([`KubeClient::access`]).
    access: Mutex<Option<(Instant, Result<(), String>)>>,
    /// What else the authority needs, in one namespace (the fleet store's
    /// custom resources): (verb, group, resource, namespace).
    also_needed: Mutex<Vec<(&'static str, &'static str, &'static str, String)>>,
}

/// What the authority must be allowed to do (RBAC), as (verb, group,
/// resource). Checked for readiness with SelfSubjectAccessReview.
const NEEDED: &[(&str, &str, &str)] = &[
    ("create", "authentication.k8s.io", "tokenreviews"),
    ("list", "", "pods"),
    ("get", "", "pods"),
];

/// How long an access check answers readiness probes.
const ACCESS_CHECK_TTL: Duration = Duration::from_secs(5);

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TokenReview {
    status: ReviewStatus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ReviewStatus {
    authenticated: bool,
    user: ReviewUser,
    audiences: Option<Vec<String>>,
    error: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ReviewUser {
    username: String,
    extra: HashMap<String, Vec<String>>,
}

/// Why a Kubernetes client could not be built from its config.
#[derive(Debug, thiserror::Error)]
pub enum KubeConfigError {
    #[error("api_server {0:?} must start with https://")]
    Scheme(String),
    #[error("{}: {source}", path.display())]
    CaFile {
        path: std::path::PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Tls(#[from] super::tls::TlsError),
}

/// Why the pods on a node could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum PodListError {
    #[error("{0}")]
    Api(String),
    #[error("{path}: not a PodList: {source}")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A failed API call: the HTTP status when the server answered.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct CallError {
    pub status: Option<u16>,
    pub message: String,
}

const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

impl KubeClient {
    pub fn new(config: KubeConfig) -> Result<Self, KubeConfigError> {
        let rest = config
            .api_server
            .strip_prefix("https://")
            .ok_or_else(|| KubeConfigError::Scheme(config.api_server.clone()))?
            .trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
                Ok(port) => (h.to_string(), port),
                Err(_) => (rest.to_string(), 443),
            },
            _ => (rest.to_string(), 443),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let ca_err = |e: Box<dyn std::error::Error + Send + Sync>| KubeConfigError::CaFile {
            path: config.ca_file.clone(),
            source: e,
        };
        let pem = std::fs::read(&config.ca_file).map_err(|e| ca_err(e.into()))?;
        let cas = crate::identity::pem::decode_certs(&pem).map_err(|e| ca_err(e.into()))?;
        let roots =
            super::tls::roots(cas.iter().map(Vec::as_slice)).map_err(|e| ca_err(e.into()))?;
        let tls = super::tls::client_config(roots, None)?;
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Self {
            config,
            addr,
            host,
            tls,
            pods: Mutex::default(),
            access: Mutex::default(),
            also_needed: Mutex::default(),
        })
    }

    async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::body::Bytes, CallError> {
        self.call_as(method, path, "application/json", body).await
    }

    /// The authority's own token, re-read each time (the kubelet rotates it).
    async fn token(&self) -> Result<String, CallError> {
        tokio::fs::read_to_string(&self.config.token_file)
            .await
            .map(|t| t.trim().to_string())
            .map_err(|e| CallError {
                status: None,
                message: format!("{}: {e}", self.config.token_file.display()),
            })
    }

    fn request<'a>(
        &'a self,
        method: hyper::Method,
        path: &'a str,
        content_type: &'static str,
        bearer: String,
        body: Option<Vec<u8>>,
    ) -> http::Request<'a> {
        http::Request {
            addr: &self.addr,
            server_name: &self.host,
            tls: self.tls.clone(),
            method,
            path,
            bearer: Some(bearer),
            content_type,
            body,
            timeout: self.config.timeout,
        }
    }

    async fn call_as(
        &self,
        method: hyper::Method,
        path: &str,
        content_type: &'static str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::body::Bytes, CallError> {
        let fail = |status: Option<u16>, message: String| CallError { status, message };
        let token = self.token().await?;
        let (status, body) = http::send(self.request(method, path, content_type, token, body))
            .await
            .map_err(|e| fail(None, format!("Kubernetes API {e}")))?;
        if !(200..300).contains(&status) {
            // The API server's own explanation (a `Status` object).
            let detail = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string));
            if let Some(detail) = detail
                && !matches!(status, 401 | 403)
            {
                return Err(fail(
                    Some(status),
                    format!("Kubernetes API {path}: {status}, {detail}"),
                ));
            }
        }
        let why = match status {
            200..=299 => return Ok(body),
            401 => "the authority's own token was not accepted",
            403 => "the authority needs create on tokenreviews and get/list on pods",
            404 => "not found",
            _ => "unexpected status",
        };
        let message = format!("Kubernetes API {path}: {status}, {why}");
        if matches!(status, 401 | 403) {
            // Readiness must see this now, not at the next check.
            *self.access.lock() = Some((Instant::now(), Err(message.clone())));
        }
        Err(fail(Some(status), message))
    }

    /// One JSON request (`content_type` names a patch type where needed);
    /// the decoded answer.
    pub async fn json(
        &self,
        method: hyper::Method,
        path: &str,
        content_type: &'static str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, CallError> {
        let bytes = self
            .call_as(
                method,
                path,
                content_type,
                body.map(|b| b.to_string().into_bytes()),
            )
            .await?;
        serde_json::from_slice(&bytes).map_err(|e| CallError {
            status: None,
            message: format!("Kubernetes API {path}: not JSON: {e}"),
        })
    }

    /// Opens a watch (`path` carries `watch=1` and its resource version).
    pub async fn watch(&self, path: &str) -> Result<http::JsonStream, CallError> {
        let token = self.token().await?;
        let stream =
            http::open(self.request(hyper::Method::GET, path, "application/json", token, None))
                .await
                .map_err(|e| CallError {
                    status: None,
                    message: format!("Kubernetes API {e}"),
                })?;
        if stream.status != 200 {
            let status = stream.status;
            let body = stream.rest().await;
            let detail = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or_default();
            return Err(CallError {
                status: Some(status),
                message: format!("Kubernetes API watch {path}: {status} {detail}"),
            });
        }
        Ok(http::JsonStream::new(stream))
    }

    /// Whether the API server accepts the authority's token and lets it do
    /// what attestation and entitlement need (SelfSubjectAccessReview for
    /// each). Cached for a few seconds: readiness probes call it.
    pub async fn access(&self) -> Result<(), String> {
        if let Some((at, result)) = &*self.access.lock()
            && at.elapsed() < ACCESS_CHECK_TTL
        {
            return result.clone();
        }
        let result = self.check_access().await;
        *self.access.lock() = Some((Instant::now(), result.clone()));
        result
    }

    /// The user name the API server knows the authority by (a
    /// SelfSubjectReview, which every authenticated user may make).
    pub async fn own_user(&self) -> Result<String, String> {
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "SelfSubjectReview",
        });
        let answer = self
            .call(
                hyper::Method::POST,
                "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                Some(body.to_string().into_bytes()),
            )
            .await
            .map_err(|e| e.message)?;
        serde_json::from_slice::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| {
                v["status"]["userInfo"]["username"]
                    .as_str()
                    .map(str::to_string)
            })
            .filter(|u| !u.is_empty())
            .ok_or_else(|| "SelfSubjectReview: no user name in the answer".to_string())
    }

    /// Adds to what readiness checks: `verb` on `resource.group` in
    /// `namespace` (every namespace, or a cluster-scoped resource, if empty).
    pub fn also_need(
        &self,
        verb: &'static str,
        group: &'static str,
        resource: &'static str,
        namespace: &str,
    ) {
        self.also_needed
            .lock()
            .push((verb, group, resource, namespace.to_string()));
        *self.access.lock() = None;
    }

    async fn check_access(&self) -> Result<(), String> {
        let mut needs: Vec<(&str, &str, &str, Option<String>)> =
            NEEDED.iter().map(|(v, g, r)| (*v, *g, *r, None)).collect();
        needs.extend(
            self.also_needed
                .lock()
                .iter()
                .map(|(v, g, r, ns)| (*v, *g, *r, Some(ns.clone()))),
        );
        for (verb, group, resource, namespace) in needs {
            let mut attributes = json!({"verb": verb, "group": group, "resource": resource});
            if let Some(ns) = namespace.as_ref().filter(|ns| !ns.is_empty()) {
                attributes["namespace"] = json!(ns);
            }
            let body = json!({
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SelfSubjectAccessReview",
                "spec": {"resourceAttributes": attributes},
            });
            let answer = self
                .call(
                    hyper::Method::POST,
                    "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                    Some(body.to_string().into_bytes()),
                )
                .await
                .map_err(|e| e.message)?;
            let allowed = serde_json::from_slice::<serde_json::Value>(&answer)
                .ok()
                .and_then(|v| v["status"]["allowed"].as_bool())
                .unwrap_or(false);
            if !allowed {
                let what = if group.is_empty() {
                    resource.to_string()
                } else {
                    format!("{resource}.{group}")
                };
                let place = namespace
                    .filter(|ns| !ns.is_empty())
                    .map(|ns| format!(" in namespace {ns}"))
                    .unwrap_or_default();
                return Err(format!(
                    "the authority's service account may not {verb} {what}{place} (RBAC)"
                ));
            }
        }
        Ok(())
    }

    /// Checks an agent's projected service account token with TokenReview:
    /// authenticated, for our audience, bound to a pod of an allowed service
    /// account; returns the node that pod runs on.
    pub async fn review_token(&self, token: &str) -> Result<ReviewedNode, ReviewError> {
        use ReviewError::{Rejected, Unavailable};
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.config.audience]},
        });
        let bytes = self
            .call(
                hyper::Method::POST,
                "/apis/authentication.k8s.io/v1/tokenreviews",
                Some(body.to_string().into_bytes()),
            )
            .await
            .map_err(|e| Unavailable(e.message))?;
        let review: TokenReview = serde_json::from_slice(&bytes)
            .map_err(|e| Unavailable(format!("TokenReview answer is not a TokenReview: {e}")))?;
        let st = review.status;
        if !st.authenticated {
            return Err(Rejected(if st.error.is_empty() {
                "the token was not authenticated".into()
            } else {
                format!("the token was not authenticated: {}", st.error)
            }));
        }
        if !st
            .audiences
            .as_ref()
            .is_some_and(|a| a.contains(&self.config.audience))
        {
            return Err(Rejected(format!(
                "the token is not for audience {:?}",
                self.config.audience
            )));
        }
        let sa = st
            .user
            .username
            .strip_prefix("system:serviceaccount:")
            .ok_or_else(|| Rejected(format!("{:?} is not a service account", st.user.username)))?;
        if !self.config.allowed_service_accounts.iter().any(|a| a == sa) {
            return Err(Rejected(format!(
                "service account {sa:?} is not allowed to attest nodes (allowed_service_accounts)"
            )));
        }
        let (ns, _) = sa.split_once(':').unwrap_or((sa, ""));
        let extra = |k: &str| st.user.extra.get(k).and_then(|v| v.first()).cloned();
        let (Some(pod_name), Some(pod_uid)) = (extra(EXTRA_POD_NAME), extra(EXTRA_POD_UID)) else {
            return Err(Rejected(
                "the token is not bound to a pod (use a projected service account token)".into(),
            ));
        };
        let node_name = match extra(EXTRA_NODE_NAME) {
            Some(n) => n,
            // Before Kubernetes 1.30 tokens do not name the node: ask for the pod.
            None => {
                let path = format!("/api/v1/namespaces/{ns}/pods/{pod_name}");
                let bytes =
                    self.call(hyper::Method::GET, &path, None)
                        .await
                        .map_err(|e| match e.status {
                            Some(404) => {
                                Rejected(format!("the token's pod {ns}/{pod_name} is gone"))
                            }
                            _ => Unavailable(e.message),
                        })?;
                let pod: Pod = serde_json::from_slice(&bytes)
                    .map_err(|e| Unavailable(format!("{path}: not a Pod: {e}")))?;
                if pod.metadata.uid != pod_uid {
                    return Err(Rejected(format!(
                        "pod {ns}/{pod_name} was replaced since the token was issued"
                    )));
                }
                pod.spec.node_name
            }
        };
        if node_name.is_empty() || node_name.contains('/') {
            return Err(Rejected(format!(
                "the agent pod's node name {node_name:?} is not usable"
            )));
        }
        Ok(ReviewedNode {
            node_name,
            agent_pod: format!("{ns}/{pod_name}"),
        })
    }

    /// Pods scheduled on `node`, from a cache no older than `pod_cache_ttl`
    /// unless `fresh` is set.
    pub async fn pods_on_node(
        &self,
        node: &str,
        fresh: bool,
    ) -> Result<Arc<PodList>, PodListError> {
        if !fresh
            && let Some((at, list)) = self.pods.lock().get(node)
            && at.elapsed() < self.config.pod_cache_ttl
        {
            return Ok(list.clone());
        }
        let selector: String =
            form_urlencoded::byte_serialize(format!("spec.nodeName={node}").as_bytes()).collect();
        let path = format!("/api/v1/pods?fieldSelector={selector}");
        let bytes = self
            .call(hyper::Method::GET, &path, None)
            .await
            .map_err(|e| PodListError::Api(e.message))?;
        let list: PodList = serde_json::from_slice(&bytes)
            .map_err(|source| PodListError::Decode { path, source })?;
        let list = Arc::new(list);
        let mut cache = self.pods.lock();
        // Bounded by the number of nodes; forget lists nobody asked for in a while.
        cache.retain(|_, (at, _)| at.elapsed() < Duration::from_secs(600));
        cache.insert(node.to_string(), (Instant::now(), list.clone()));
        Ok(list)
    }
}
