//! The `Ready` condition of the custom resources the authority watches
//! (registration entries, federation relationships): every replica checks
//! every object and writes its verdict through the status subresource,
//! `Accepted`, or `Invalid` with a message naming the field at fault. A
//! condition already saying the same is not written again, so replicas
//! agreeing on a verdict make no writes.

use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::kube::KubeClient;
use crate::clock::Clock;

/// Why an object is refused: the field at fault (`spec.selectors[1]`) and
/// what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// The `Ready` condition an object should carry: `Ok` with what is in
/// force (`in force: <summary>`), or why not.
pub fn condition(generation: i64, verdict: Result<&str, &Invalid>) -> Value {
    match verdict {
        Ok(summary) => json!({
            "type": "Ready", "status": "True", "reason": "Accepted",
            "message": format!("in force: {summary}"),
            "observedGeneration": generation,
        }),
        Err(e) => json!({
            "type": "Ready", "status": "False", "reason": "Invalid",
            "message": format!("{e}; not in force (a previously accepted version stays in force on running replicas)"),
            "observedGeneration": generation,
        }),
    }
}

/// The status patch to send, if the object does not already say it.
pub fn status_patch(obj: &Value, want: Value, now: SystemTime) -> Option<Value> {
    let current = obj["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"));
    let same = |c: &Value| {
        ["status", "reason", "message", "observedGeneration"]
            .iter()
            .all(|k| c[*k] == want[*k])
    };
    if current.is_some_and(same) {
        return None;
    }
    let mut want = want;
    want["lastTransitionTime"] = match current {
        Some(c) if c["status"] == want["status"] && c["lastTransitionTime"].is_string() => {
            c["lastTransitionTime"].clone()
        }
        _ => json!(humantime::format_rfc3339_seconds(now).to_string()),
    };
    Some(json!({"status": {"conditions": [want]}}))
}

/// Writes `Ready` conditions through the status subresource, one at a
/// time, in the background.
#[derive(Clone)]
pub struct StatusWriter {
    tx: mpsc::UnboundedSender<(String, Value)>,
    clock: Arc<dyn Clock>,
}

impl StatusWriter {
    pub fn start(
        kube: Arc<KubeClient>,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_statuses(kube, rx, shutdown));
        Self { tx, clock }
    }

    /// Writes `obj`'s verdict to the status subresource at `path`, unless
    /// the object already carries it.
    pub fn report(&self, path: String, obj: &Value, verdict: Result<&str, &Invalid>) {
        let generation = obj["metadata"]["generation"].as_i64().unwrap_or(0);
        if let Some(patch) = status_patch(obj, condition(generation, verdict), self.clock.now()) {
            let _ = self.tx.send((path, patch));
        }
    }
}

async fn write_statuses(
    kube: Arc<KubeClient>,
    mut rx: mpsc::UnboundedReceiver<(String, Value)>,
    shutdown: CancellationToken,
) {
    loop {
        let (path, patch) = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = rx.recv() => match next { Some(n) => n, None => return },
        };
        match kube
            .json(
                hyper::Method::PATCH,
                &path,
                "application/merge-patch+json",
                Some(&patch),
            )
            .await
        {
            Ok(_) => {}
            // Deleted meanwhile: nothing to say.
            Err(e) if e.status == Some(404) => {}
            Err(e) => {
                tracing::warn!(path, error = %e, "could not write an object's Ready condition (the authority needs patch on its status subresource)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn statuses_are_written_only_when_they_change() {
        let obj = json!({"metadata": {"name": "e1", "generation": 3}, "spec": {}});
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let patch = status_patch(&obj, condition(3, Ok("spiffe://example.org/x")), now).unwrap();
        let written = patch["status"]["conditions"][0].clone();
        assert_eq!(written["reason"], "Accepted");
        assert_eq!(written["message"], "in force: spiffe://example.org/x");
        assert_eq!(written["observedGeneration"], 3);
        let mut obj = obj;
        obj["status"] = patch["status"].clone();
        assert!(status_patch(&obj, condition(3, Ok("spiffe://example.org/x")), now).is_none());
        // A new generation, still accepted: the transition time stays.
        let later = now + Duration::from_secs(60);
        let again = status_patch(&obj, condition(4, Ok("spiffe://example.org/x")), later).unwrap();
        assert_eq!(
            again["status"]["conditions"][0]["lastTransitionTime"],
            written["lastTransitionTime"]
        );
        // Refused: a transition, naming the field.
        let refused = invalid("spec.selectors[1]", "bad");
        let now_invalid = status_patch(&obj, condition(5, Err(&refused)), later).unwrap();
        let c = &now_invalid["status"]["conditions"][0];
        assert_eq!(c["reason"], "Invalid");
        assert_eq!(c["status"], "False");
        assert!(
            c["message"]
                .as_str()
                .unwrap()
                .starts_with("spec.selectors[1]: bad")
        );
        assert_ne!(c["lastTransitionTime"], written["lastTransitionTime"]);
    }
}
