//! Workloads shared by the criterion benchmarks (`benches/micro.rs`) and the
//! callgrind instruction-count driver (`src/bin/icount.rs`), so both measure
//! the same operations on the same inputs.
//!
//! [`catalog`] lists every operation as an [`OpSpec`]. [`OpSpec::prepare`]
//! does the untimed part (building inputs, parsing the config, generating the
//! CA) and returns a [`Prepared`] whose `run` performs the operation once.
//!
//! Covered, from issue 6's list of pure parts: cgroup parsing (and the kubelet
//! PodList decode that follows it), entry matching, SVID signing and JWT
//! validation. Not covered: "policy slice lookup" — there is no policy engine
//! yet (Cedar-based token exchange is still planned); add it here when it lands.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tessera_agent::clock::Clock;
use tessera_agent::config::Config;
use tessera_agent::entries::EntrySet;
use tessera_agent::identity::{AuthoritySettings, LocalAuthority};
use tessera_attestor::{Selector, SelectorSet};

/// One operation, performed once per call.
pub type Run = Box<dyn FnMut()>;

/// A prepared operation.
pub struct Prepared {
    pub run: Run,
    /// Input size, for criterion's throughput column.
    pub bytes: Option<u64>,
    /// What the input is, for humans (`icount describe`).
    pub detail: String,
}

type Setup = Box<dyn Fn(Arc<dyn Clock>) -> Prepared>;

/// A named operation; the name is `group/param`.
pub struct OpSpec {
    pub group: &'static str,
    pub param: String,
    /// Iterations `benches/callgrind.sh` runs: enough that per-call noise
    /// vanishes, few enough that valgrind finishes in seconds.
    pub icount_iterations: u64,
    setup: Setup,
}

impl OpSpec {
    fn new(
        group: &'static str,
        param: impl Into<String>,
        icount_iterations: u64,
        setup: impl Fn(Arc<dyn Clock>) -> Prepared + 'static,
    ) -> Self {
        Self {
            group,
            param: param.into(),
            icount_iterations,
            setup: Box::new(setup),
        }
    }

    pub fn name(&self) -> String {
        format!("{}/{}", self.group, self.param)
    }

    /// Builds the inputs; the clock is the authority's (SVID operations only).
    pub fn prepare(&self, clock: Arc<dyn Clock>) -> Prepared {
        (self.setup)(clock)
    }
}

/// A clock that never moves, so tokens and certificates (and with them the
/// instruction counts) do not depend on when the run happens.
#[derive(Debug, Clone, Copy)]
pub struct FixedClock(pub SystemTime);

impl Default for FixedClock {
    /// 2027-01-15T08:00:00Z.
    fn default() -> Self {
        Self(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000))
    }
}

impl Clock for FixedClock {
    fn now(&self) -> SystemTime {
        self.0
    }
}

// ---------------------------------------------------------------------------
// cgroup parsing and the kubelet PodList

/// `/proc/<pid>/cgroup` fixtures from the attestor's tests.
pub const CGROUP_FIXTURES: &[(&str, &str)] = &[
    (
        "v1-cgroupfs-containerd",
        include_str!("../../attestor/tests/fixtures/cgroup/v1-cgroupfs-containerd.txt"),
    ),
    (
        "v2-systemd-containerd",
        include_str!("../../attestor/tests/fixtures/cgroup/v2-systemd-containerd.txt"),
    ),
    (
        "v2-host-process",
        include_str!("../../attestor/tests/fixtures/cgroup/v2-host-process.txt"),
    ),
];

const PODLIST_FIXTURE: &str = include_str!("../../attestor/tests/fixtures/podlist.json");

/// The first pod of the attestor's PodList fixture, copied with distinct
/// names and UIDs until the (compact, as the kubelet sends it) JSON is about
/// `target_bytes` long (within half a pod, ~1.3 KB). Returns the JSON and the
/// number of pods.
pub fn podlist_json(target_bytes: usize) -> (Vec<u8>, usize) {
    let fixture: serde_json::Value =
        serde_json::from_str(PODLIST_FIXTURE).expect("podlist fixture is JSON");
    let pod = fixture["items"][0].clone();
    let one = serde_json::to_vec(&pod).expect("serialize").len() + 1;
    let count = ((target_bytes + one / 2) / one).max(1);
    let items: Vec<serde_json::Value> = (0..count)
        .map(|i| {
            let mut p = pod.clone();
            p["metadata"]["name"] = format!("billing-7d9f8c6b5-{i:05}").into();
            p["metadata"]["uid"] = format!("2c48913c-b29f-11e7-9350-{i:012x}").into();
            p
        })
        .collect();
    let list = serde_json::json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {},
        "items": items,
    });
    (serde_json::to_vec(&list).expect("serialize"), count)
}

/// PodList sizes benchmarked: a small node, a busy one, a 1 MiB response.
pub const PODLIST_SIZES: &[(&str, usize)] = &[
    ("16KiB", 16 << 10),
    ("128KiB", 128 << 10),
    ("1MiB", 1 << 20),
];

// ---------------------------------------------------------------------------
// entry matching

/// Entry counts benchmarked.
pub const ENTRY_COUNTS: &[usize] = &[10, 100, 1000];

/// A config with `n` entries: groups of four per namespace `ns<g>` (an exact
/// unix entry, an exact k8s entry with a hint, two templated k8s entries),
/// then the Helm chart's catch-all `ns/{k8s:ns}/sa/{k8s:sa}` last.
pub fn entries_toml(n: usize) -> String {
    let mut s = String::from(
        "trust_domain = \"example.org\"\n\
         socket_path = \"/tmp/tessera-bench/agent.sock\"\n\
         data_dir = \"/tmp/tessera-bench\"\n",
    );
    for i in 0..n.saturating_sub(1) {
        let g = i / 4;
        let uid = 10_000 + g;
        s.push_str("\n[[entries]]\n");
        match i % 4 {
            0 => s.push_str(&format!(
                "spiffe_id = \"spiffe://example.org/uid/u{i}\"\n\
                 selectors = [\"unix:uid:{uid}\", \"unix:gid:{uid}\"]\n"
            )),
            1 => s.push_str(&format!(
                "spiffe_id = \"spiffe://example.org/ns/ns{g}/sa/sa{g}/e{i}\"\n\
                 selectors = [\"k8s:ns:ns{g}\", \"k8s:sa:sa{g}\", \"k8s:pod-label:app:web\"]\n\
                 hint = \"e{i}\"\n"
            )),
            2 => s.push_str(&format!(
                "spiffe_id = \"spiffe://example.org/ns/{{k8s:ns}}/sa/{{k8s:sa}}/t{i}\"\n\
                 selectors = [\"k8s:ns:ns{g}\"]\n"
            )),
            _ => s.push_str(&format!(
                "spiffe_id = \"spiffe://example.org/node/{{k8s:node-name}}/pod/{{k8s:pod-name}}/t{i}\"\n\
                 selectors = [\"k8s:ns:ns{g}\", \"k8s:container-name:app\"]\n"
            )),
        }
    }
    s.push_str(
        "\n[[entries]]\n\
         spiffe_id = \"spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}\"\n\
         selectors = [\"k8s:ns\", \"k8s:sa\"]\n",
    );
    s
}

/// The entry set of [`entries_toml`], through the public config parser.
pub fn entry_set(n: usize) -> EntrySet {
    Config::parse(&entries_toml(n), "<bench>")
        .expect("generated config is valid")
        .entries
}

fn selector_set(selectors: &[String]) -> SelectorSet {
    SelectorSet::new(
        selectors
            .iter()
            .map(|s| Selector::parse(s).expect("valid selector"))
            .collect(),
    )
}

/// Ten selectors of a pod in the middle namespace of [`entries_toml`]`(n)`:
/// it matches that namespace's four entries and the catch-all.
pub fn k8s_workload(n: usize) -> SelectorSet {
    let g = n.saturating_sub(1) / 4 / 2;
    let uid = 10_000 + g;
    selector_set(&[
        format!("k8s:ns:ns{g}"),
        format!("k8s:sa:sa{g}"),
        format!("k8s:pod-name:web-{g}-7d9f8c6b5-x2x4q"),
        "k8s:pod-uid:2c48913c-b29f-11e7-9350-020968147796".into(),
        "k8s:container-name:app".into(),
        "k8s:node-name:node-a".into(),
        "k8s:pod-label:app:web".into(),
        "k8s:container-image:registry.example/web:1.4.2".into(),
        format!("unix:uid:{uid}"),
        format!("unix:gid:{uid}"),
    ])
}

/// Ten selectors of a host process no entry matches: the full scan.
pub fn unmatched_workload() -> SelectorSet {
    selector_set(&[
        "unix:uid:1".into(),
        "unix:user:daemon".into(),
        "unix:gid:1".into(),
        "unix:group:daemon".into(),
        "unix:supplementary_gid:4".into(),
        "unix:supplementary_gid:27".into(),
        "unix:supplementary_group:adm".into(),
        "unix:supplementary_group:sudo".into(),
        "unix:path:/usr/sbin/atd".into(),
        "unix:sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
    ])
}

// ---------------------------------------------------------------------------
// SVID signing and JWT validation

/// An in-memory authority (CA and JWT key generated, nothing persisted).
pub fn authority(clock: Arc<dyn Clock>) -> Arc<LocalAuthority> {
    LocalAuthority::load(
        AuthoritySettings {
            trust_domain: spiffe::TrustDomain::new("example.org").expect("trust domain"),
            ca_ttl: Duration::from_secs(24 * 3600),
            jwt_key_ttl: Duration::from_secs(24 * 3600),
            jwt_key_type: Default::default(),
            state_dir: None,
            ca_files: None,
        },
        clock,
    )
    .expect("in-memory authority")
}

/// The workload ID every SVID operation uses.
pub fn workload_id() -> spiffe::SpiffeId {
    spiffe::SpiffeId::new("spiffe://example.org/ns/payments/sa/billing-sa").expect("SPIFFE ID")
}

/// `count` audiences; a JWT is validated against the last one.
pub fn audiences(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| format!("spiffe://example.org/api/{i}"))
        .collect()
}

/// JWT audience counts benchmarked.
pub const AUDIENCE_COUNTS: &[usize] = &[1, 10];

// ---------------------------------------------------------------------------
// the catalog

/// Every operation, in report order.
pub fn catalog() -> Vec<OpSpec> {
    let mut ops = Vec::new();

    for &(name, text) in CGROUP_FIXTURES {
        ops.push(OpSpec::new("cgroup_parse", name, 20_000, move |_| {
            Prepared {
                run: Box::new(move || {
                    let _ = black_box(tessera_attestor::cgroup::parse_cgroup_file(black_box(text)));
                }),
                bytes: Some(text.len() as u64),
                detail: format!("{} lines, {} bytes", text.lines().count(), text.len()),
            }
        }));
    }

    for &(name, target) in PODLIST_SIZES {
        let iterations = (4 << 20) / target as u64;
        ops.push(OpSpec::new("podlist_decode", name, iterations, move |_| {
            let (json, pods) = podlist_json(target);
            let bytes = json.len() as u64;
            Prepared {
                run: Box::new(move || {
                    let list: tessera_attestor::pods::PodList =
                        serde_json::from_slice(black_box(&json)).expect("PodList decodes");
                    black_box(list);
                }),
                bytes: Some(bytes),
                detail: format!("{pods} pods, {bytes} bytes"),
            }
        }));
    }

    for (group, matching) in [
        ("identities_for_k8s", true),
        ("identities_for_unmatched", false),
    ] {
        for &n in ENTRY_COUNTS {
            let iterations = (200_000 / n as u64).max(100);
            ops.push(OpSpec::new(group, n.to_string(), iterations, move |_| {
                let set = entry_set(n);
                let workload = if matching {
                    k8s_workload(n)
                } else {
                    unmatched_workload()
                };
                let detail = format!(
                    "{} entries, {} selectors, {} identities",
                    set.len(),
                    workload.len(),
                    set.identities_for(&workload).len()
                );
                Prepared {
                    run: Box::new(move || {
                        black_box(black_box(&set).identities_for(black_box(&workload)));
                    }),
                    bytes: None,
                    detail,
                }
            }));
        }
    }

    ops.push(OpSpec::new("svid", "issue_x509", 200, |clock| {
        let authority = authority(clock);
        let id = workload_id();
        Prepared {
            run: Box::new(move || {
                black_box(
                    authority
                        .issue_x509(black_box(&id), Duration::from_secs(3600))
                        .expect("issue"),
                );
            }),
            bytes: None,
            detail: "fresh P-256 key + leaf certificate signed by the CA".into(),
        }
    }));
    for &count in AUDIENCE_COUNTS {
        ops.push(OpSpec::new(
            "svid",
            format!("mint_jwt_aud{count}"),
            500,
            move |clock| {
                let authority = authority(clock);
                let id = workload_id();
                let aud = audiences(count);
                Prepared {
                    run: Box::new(move || {
                        black_box(
                            authority
                                .mint_jwt(black_box(&id), black_box(&aud), Duration::from_secs(300))
                                .expect("mint"),
                        );
                    }),
                    bytes: None,
                    detail: format!("ES256 JWT-SVID, {count} audience(s)"),
                }
            },
        ));
    }
    for &count in AUDIENCE_COUNTS {
        ops.push(OpSpec::new(
            "jwt",
            format!("validate_jwt_aud{count}"),
            500,
            move |clock| {
                let authority = authority(clock);
                let aud = audiences(count);
                let token = authority
                    .mint_jwt(&workload_id(), &aud, Duration::from_secs(300))
                    .expect("mint")
                    .token;
                let audience = aud.last().expect("an audience").clone();
                authority
                    .trust_store()
                    .validate_jwt(&token, &audience)
                    .expect("token validates");
                let detail = format!("{} byte token, {count} audience(s)", token.len());
                Prepared {
                    run: Box::new(move || {
                        black_box(
                            authority
                                .trust_store()
                                .validate_jwt(black_box(&token), black_box(&audience))
                                .expect("validate"),
                        );
                    }),
                    bytes: None,
                    detail,
                }
            },
        ));
    }
    // The floor under issue_x509: ring alone, no certificate building.
    ops.push(OpSpec::new("raw", "ring_p256_keygen_sign", 200, |_| {
        use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
        let rng = ring::rand::SystemRandom::new();
        let message = [0x5au8; 400];
        Prepared {
            run: Box::new(move || {
                let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
                    .expect("keygen");
                let key =
                    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
                        .expect("key");
                black_box(key.public_key());
                black_box(key.sign(&rng, black_box(&message)).expect("sign"));
            }),
            bytes: None,
            detail: "ring: P-256 keygen + PKCS#8 parse + one ECDSA signature over 400 bytes".into(),
        }
    }));

    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_agent::clock::SystemClock;

    #[test]
    fn cgroup_fixtures_parse_as_expected() {
        for &(name, text) in CGROUP_FIXTURES {
            let found = tessera_attestor::cgroup::parse_cgroup_file(text).expect(name);
            assert_eq!(found.is_some(), name != "v2-host-process", "{name}");
        }
    }

    #[test]
    fn podlist_sizes_are_close_to_target() {
        for &(name, target) in PODLIST_SIZES {
            let (json, pods) = podlist_json(target);
            assert!(
                json.len().abs_diff(target) * 20 < target,
                "{name}: {}",
                json.len()
            );
            let list: tessera_attestor::pods::PodList = serde_json::from_slice(&json).unwrap();
            assert_eq!(list.items.len(), pods);
            assert_ne!(
                list.items[0].metadata.uid,
                list.items[pods - 1].metadata.uid
            );
        }
    }

    #[test]
    fn entry_sets_match_the_intended_workloads() {
        for &n in ENTRY_COUNTS {
            let set = entry_set(n);
            assert_eq!(set.len(), n);
            let ids = set.identities_for(&k8s_workload(n));
            assert_eq!(ids.len(), 5, "n = {n}: {ids:?}");
            assert_eq!(k8s_workload(n).len(), 10);
            assert!(set.identities_for(&unmatched_workload()).is_empty());
            assert_eq!(unmatched_workload().len(), 10);
        }
    }

    #[test]
    fn every_operation_runs() {
        let ops = catalog();
        let mut names: Vec<_> = ops.iter().map(OpSpec::name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ops.len(), "names are unique");
        for op in &ops {
            for clock in [
                Arc::new(SystemClock) as Arc<dyn Clock>,
                Arc::new(FixedClock::default()),
            ] {
                let mut prepared = op.prepare(clock);
                (prepared.run)();
                (prepared.run)();
            }
        }
    }
}
