//! A fake Kubernetes API server for the authority's tests: HTTPS on
//! 127.0.0.1 (openssl-made PKI, see [`crate::fake_kubelet::make_pki`]),
//! answering TokenReview, pod list by `spec.nodeName` field selector and pod
//! get with the JSON shapes the real API server uses, and checking the
//! caller's bearer token.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

/// What the fake knows and what it saw.
#[derive(Default)]
pub struct ApiState {
    /// The bearer token the authority must present.
    pub authority_token: String,
    /// Agent token -> the `status.user` a real TokenReview would return.
    pub tokens: HashMap<String, Value>,
    /// Every pod in the cluster (real PodList `items`).
    pub pods: Vec<Value>,
    /// Request paths with their query, in order.
    pub requests: Vec<String>,
}

pub struct FakeApiServer {
    pub port: u16,
    pub state: Arc<Mutex<ApiState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `status.user` of a projected token bound to `pod` (uid `pod_uid`) on
/// `node` (`node: None` models Kubernetes before 1.30: no node claims).
pub fn bound_user(sa: &str, pod: &str, pod_uid: &str, node: Option<&str>) -> Value {
    let mut extra = json!({
        "authentication.kubernetes.io/pod-name": [pod],
        "authentication.kubernetes.io/pod-uid": [pod_uid],
        "authentication.kubernetes.io/credential-id": ["JTI=4f2c"],
    });
    if let Some(n) = node {
        extra["authentication.kubernetes.io/node-name"] = json!([n]);
        extra["authentication.kubernetes.io/node-uid"] = json!(["9b1f"]);
    }
    json!({
        "username": format!("system:serviceaccount:{sa}"),
        "uid": "a1b2",
        "groups": ["system:serviceaccounts", "system:authenticated"],
        "extra": extra,
    })
}

fn review(state: &ApiState, body: &[u8]) -> (u16, Value) {
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return (
            400,
            json!({"kind": "Status", "status": "Failure", "code": 400}),
        );
    };
    let token = req["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<Value> = req["spec"]["audiences"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // Tokens in this fake are all minted for audience "tessera-authority".
    let aud_ok = wanted.is_empty() || wanted.iter().any(|a| a == "tessera-authority");
    let status = match state.tokens.get(token) {
        Some(user) if aud_ok => json!({
            "authenticated": true,
            "user": user,
            "audiences": ["tessera-authority"],
        }),
        Some(_) => {
            json!({"authenticated": false, "error": "[invalid bearer token, token audiences [\"tessera-authority\"] is invalid for the target audiences]"})
        }
        None => {
            json!({"authenticated": false, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"})
        }
    };
    (
        201,
        json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": req["spec"],
            "status": status,
        }),
    )
}

fn route(
    state: &mut ApiState,
    method: &hyper::Method,
    uri: &hyper::Uri,
    body: &[u8],
) -> (u16, Value) {
    let path = uri.path();
    if method == hyper::Method::POST && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        return review(state, body);
    }
    if method == hyper::Method::GET && path == "/api/v1/pods" {
        let query: HashMap<String, String> =
            form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let node = query
            .get("fieldSelector")
            .and_then(|f| f.strip_prefix("spec.nodeName="))
            .map(str::to_string);
        let items: Vec<Value> = state
            .pods
            .iter()
            .filter(|p| node.as_deref().is_none_or(|n| p["spec"]["nodeName"] == n))
            .cloned()
            .collect();
        return (
            200,
            json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "88200"}, "items": items}),
        );
    }
    if method == hyper::Method::GET
        && let Some(rest) = path.strip_prefix("/api/v1/namespaces/")
        && let Some((ns, name)) = rest.split_once("/pods/")
    {
        return match state
            .pods
            .iter()
            .find(|p| p["metadata"]["namespace"] == ns && p["metadata"]["name"] == name)
        {
            Some(p) => (200, p.clone()),
            None => (
                404,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
                       "message": format!("pods \"{name}\" not found")}),
            ),
        };
    }
    (
        404,
        json!({"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404}),
    )
}

/// Starts the fake with the PKI in `dir` (`server.pem`, `server.key`).
pub async fn fake_apiserver(dir: &Path, state: ApiState) -> FakeApiServer {
    let state = Arc::new(Mutex::new(state));
    let shared = state.clone();
    let (port, task) = crate::fake_kubelet::serve_https(dir, move |method, uri, auth, body| {
        let mut st = shared.lock().unwrap();
        st.requests.push(uri.to_string());
        if auth != format!("Bearer {}", st.authority_token) {
            return (401, json!({"kind": "Status", "status": "Failure", "reason": "Unauthorized", "code": 401}).to_string());
        }
        let (status, v) = route(&mut st, &method, &uri, &body);
        (status, v.to_string())
    })
    .await;
    FakeApiServer { port, state, task }
}
