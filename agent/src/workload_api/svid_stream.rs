//! FetchX509SVID's and FetchWITSVID's stream, as a struct polled by hand.
//!
//! An SVID stream idles for hours between rotations, and a node holds tens
//! of thousands of them. Written as an `async fn`, an idle stream's state
//! kept room for every step it might await (subscribing, which may issue;
//! sending; the liveness check) and a `changed()` future with its waiter for
//! each receiver it watched. Here the stream keeps only what it needs
//! between messages: its receivers, and one waker registration per thing
//! that can change ([`crate::sync::wakers`]): the node-wide changes
//! ([`ApiState::changes`]: entries, bundle, shutdown) and each SVID's slot.
//! Only subscribing, which runs when the stream opens and when the entries
//! change, is an `async` step, boxed for as long as it runs.
//!
//! What it sends, and when, is as before: the caller's SVIDs (of `wanted`
//! only, when given), default first, at once, again whenever one is renewed,
//! the entries change, or (for a kind that carries it) the bundle the
//! workload sees changes. An identity the fleet authority refuses is left
//! out while others remain.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use tessera_attestor::AttestedPeer;
use tessera_workload_api as pb;
use tokio::sync::watch;
use tonic::Status;

use super::messages::{wit_response, x509_response};
use super::state::{ApiState, Opened, refused_all};
use crate::caller::{no_identity, stream_caller_gone};
use crate::entries::{EntrySet, Identity, federated_domains};
use crate::identity::{SignError, Subscription, TrustBundle, WitSvid, X509Svid};
use crate::metrics::OpenStream;
use crate::sync::wakers::Registration;
use crate::transport::grpc_stream::FirstOutcome;

/// A stream of `K`'s SVIDs; see the module's documentation.
pub(super) struct SvidStream<K: SvidKind> {
    state: Arc<ApiState>,
    peer: Arc<AttestedPeer>,
    entries: watch::Receiver<EntrySet>,
    /// The identities served (after subscribing: those the signer issued).
    identities: Vec<Identity>,
    /// FetchWITSVID's `spiffe_id`: only that identity is served.
    wanted: Option<Arc<spiffe::SpiffeId>>,
    bundle: watch::Receiver<Arc<TrustBundle>>,
    /// One per identity, in the same order.
    svids: Vec<Watched<K::Svid>>,
    node_changes: Registration,
    /// The bundle the last message carried; None before the first message.
    shown: Option<Arc<TrustBundle>>,
    phase: Phase<K::Svid>,
    outcome: FirstOutcome,
    _open: OpenStream,
}

/// One identity's SVID receiver, and the stream's place among those its
/// renewal wakes.
struct Watched<T> {
    rx: watch::Receiver<Option<Arc<T>>>,
    registration: Registration,
}

/// What a poll of the stream returns.
type Next<K> = Poll<Option<Result<<K as SvidKind>::Message, Status>>>;

type Subscribing<T> = Pin<Box<dyn Future<Output = Result<Subscribed<T>, Status>> + Send>>;

struct Subscribed<T> {
    identities: Vec<Identity>,
    svids: Vec<Subscription<T>>,
}

enum Phase<T> {
    /// Subscribing to the identities' SVIDs (issuing any not yet held).
    Subscribing(Subscribing<T>),
    /// Sends a message when one is `due` (the first after subscribing, or
    /// one held back while an SVID had expired), or when something the
    /// workload sees changes; else waits.
    Serving {
        due: bool,
    },
    Ended,
}

impl<K: SvidKind> SvidStream<K> {
    /// `wanted`: FetchWITSVID's `spiffe_id`, or the InvalidArgument status
    /// that is then the stream's one message.
    pub(super) fn new(
        state: Arc<ApiState>,
        opened: Opened,
        wanted: Result<Option<spiffe::SpiffeId>, Status>,
        open: OpenStream,
        outcome: FirstOutcome,
    ) -> Self {
        let (wanted, subscribing) = match wanted {
            Ok(wanted) => {
                let wanted = wanted.map(Arc::new);
                let subscribing =
                    subscribe_all::<K>(state.clone(), opened.identities, wanted.clone());
                (wanted, subscribing)
            }
            Err(status) => (
                None,
                Box::pin(std::future::ready(Err(status))) as Subscribing<_>,
            ),
        };
        let bundle = state.cache.trust_store().subscribe();
        let node_changes = Registration::new(state.changes.clone());
        let phase = Phase::Subscribing(subscribing);
        Self {
            state,
            peer: opened.peer,
            entries: opened.entries,
            identities: Vec::new(),
            wanted,
            bundle,
            svids: Vec::new(),
            node_changes,
            shown: None,
            phase,
            outcome,
            _open: open,
        }
    }

    /// Yields `item`, recording the stream's outcome (and the first
    /// response's latency) if it is the first.
    fn yielded(&mut self, item: Result<K::Message, Status>) -> Next<K> {
        if let Some(started) = self.outcome.first(&item)
            && item.is_ok()
        {
            self.state
                .callers
                .metrics
                .rpc_seconds
                .get_or_create(&crate::metrics::MethodLabels { method: K::FIRST })
                .observe(started.elapsed().as_secs_f64());
        }
        Poll::Ready(Some(item))
    }

    /// Ends the stream with `status` as its last message.
    fn end_with(&mut self, status: Status) -> Next<K> {
        self.phase = Phase::Ended;
        self.yielded(Err(status))
    }

    /// Whether something this stream shows changed since its last message.
    /// A change of a foreign bundle the workload does not federate with is
    /// taken as seen without a message. None: the agent's bundle is gone
    /// (it is stopping).
    fn changed(&mut self) -> Option<bool> {
        let svid_changed = self
            .svids
            .iter()
            .any(|w| w.rx.has_changed().unwrap_or(false));
        if svid_changed {
            return Some(true);
        }
        if !K::WITH_BUNDLE || !self.bundle.has_changed().ok()? {
            return Some(false);
        }
        let shown = self.shown.as_deref();
        if shown.is_some_and(|shown| same_view(&self.identities, shown, &self.bundle.borrow())) {
            self.shown = Some(self.bundle.borrow_and_update().clone());
            return Some(false);
        }
        Some(true)
    }

    /// The step after subscribing: send when due or changed, else wait.
    /// None when the entries changed: the stream subscribes again.
    fn serve(&mut self, cx: &mut Context<'_>, due: bool) -> Option<Next<K>> {
        // Registered before looking: a change after the look wakes this task.
        self.node_changes.register(cx.waker());
        for watched in &mut self.svids {
            watched.registration.register(cx.waker());
        }
        if self.state.callers.shutdown.is_cancelled() {
            return Some(self.end_with(Status::unavailable("agent is shutting down")));
        }
        match self.entries.has_changed() {
            // The entries' sender is gone: the agent is stopping.
            Err(_) => {
                self.phase = Phase::Ended;
                return Some(Poll::Ready(None));
            }
            Ok(true) => {
                let identities = self
                    .entries
                    .borrow_and_update()
                    .identities_for(&self.peer.selectors);
                self.phase = Phase::Subscribing(subscribe_all::<K>(
                    self.state.clone(),
                    identities,
                    self.wanted.clone(),
                ));
                return None;
            }
            Ok(false) => {}
        }
        let due = match (due, self.changed()) {
            (_, None) => {
                self.phase = Phase::Ended;
                return Some(Poll::Ready(None));
            }
            (due, Some(changed)) => due || changed,
        };
        if !due {
            return Some(Poll::Pending);
        }
        let svids: Vec<Arc<K::Svid>> = self
            .svids
            .iter_mut()
            .filter_map(|w| w.rx.borrow_and_update().clone())
            .collect();
        if svids.len() != self.identities.len() {
            return Some(self.end_with(Status::unavailable(K::NOT_READY)));
        }
        if svids.iter().any(|s| K::expired(&self.state, s)) {
            // Wait for the renewal instead of sending an expired SVID (the
            // wall clock jumped, or the signer was away): its slot wakes
            // this stream.
            self.state.cache.renew_due_now();
            self.phase = Phase::Serving { due: true };
            return Some(Poll::Pending);
        }
        let bundle = self.bundle.borrow_and_update().clone();
        if self.shown.is_some()
            && let Some(status) = stream_caller_gone(&self.peer, K::release_key(&svids, &bundle))
        {
            return Some(self.end_with(status));
        }
        let message = K::message(&self.identities, &svids, &bundle);
        self.shown = Some(bundle);
        self.phase = Phase::Serving { due: false };
        Some(self.yielded(Ok(message)))
    }
}

impl<K: SvidKind> Stream for SvidStream<K> {
    type Item = Result<K::Message, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Every field is Unpin (the subscribing future is boxed).
        let this = self.get_mut();
        loop {
            match &mut this.phase {
                Phase::Ended => return Poll::Ready(None),
                Phase::Subscribing(subscribing) => match subscribing.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(status)) => return this.end_with(status),
                    Poll::Ready(Ok(subscribed)) => {
                        this.identities = subscribed.identities;
                        this.svids = subscribed
                            .svids
                            .into_iter()
                            .map(|s| Watched {
                                rx: s.rx,
                                registration: Registration::new(s.changes),
                            })
                            .collect();
                        this.phase = Phase::Serving { due: true };
                    }
                },
                Phase::Serving { due } => {
                    let due = *due;
                    if let Some(poll) = this.serve(cx, due) {
                        return poll;
                    }
                }
            }
        }
    }
}

/// Subscribes to the SVIDs of `identities` (of `wanted` only, when given),
/// issuing any not yet held. Leaves out those the fleet authority refuses,
/// and fails only if none remain.
fn subscribe_all<K: SvidKind>(
    state: Arc<ApiState>,
    mut identities: Vec<Identity>,
    wanted: Option<Arc<spiffe::SpiffeId>>,
) -> Subscribing<K::Svid> {
    Box::pin(async move {
        if let Some(wanted) = &wanted {
            identities.retain(|i| i.spiffe_id == **wanted);
        }
        if identities.is_empty() {
            return Err(no_identity());
        }
        let mut svids = Vec::with_capacity(identities.len());
        let mut refused = Vec::new();
        let mut entitled = Vec::with_capacity(identities.len());
        for ident in identities {
            match K::subscribe(&state, &ident).await {
                Ok(subscription) => {
                    svids.push(subscription);
                    entitled.push(ident);
                }
                // The fleet authority will not sign this one for this node:
                // serve the others rather than fail them all.
                Err(SignError::Refused(why)) => {
                    tracing::warn!(spiffe_id = %ident.spiffe_id, reason = %why, "the fleet authority refuses an identity the caller matches; serving its others");
                    refused.push(why);
                }
                Err(SignError::Unsupported(why)) => return Err(Status::unimplemented(why)),
                Err(e) => {
                    return Err(Status::unavailable(format!(
                        "could not issue {}: {e}",
                        K::NAME
                    )));
                }
            }
        }
        if entitled.is_empty() {
            return Err(refused_all(&refused));
        }
        Ok(Subscribed {
            identities: entitled,
            svids,
        })
    })
}

/// Whether a workload holding `identities` sees the same in `old` and
/// `new`: its own trust domain's bundle and the foreign bundles it
/// federates with (compared by identity: a foreign bundle is replaced whole
/// when its keys change).
fn same_view(identities: &[Identity], old: &TrustBundle, new: &TrustBundle) -> bool {
    old.sequence == new.sequence
        && federated_domains(identities).all(|d| {
            match (old.federated.get(d), new.federated.get(d)) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
        })
}

/// One kind of SVID a stream serves ([`SvidStream`]): how an identity is
/// subscribed to it, when one has expired, and the message that carries
/// them.
pub(super) trait SvidKind: 'static {
    type Svid: Send + Sync + 'static;
    type Message: Send + 'static;
    /// Names the kind in errors (`could not issue X509-SVID: ...`).
    const NAME: &'static str;
    /// The message when an identity has none yet.
    const NOT_READY: &'static str;
    /// The metric label of the first response's latency.
    const FIRST: &'static str;
    /// The message carries the trust bundle: a bundle change wakes the
    /// stream.
    const WITH_BUNDLE: bool;

    fn subscribe(
        state: &ApiState,
        ident: &Identity,
    ) -> impl Future<Output = Result<Subscription<Self::Svid>, SignError>> + Send;
    fn expired(state: &ApiState, svid: &Self::Svid) -> bool;
    /// See [`release_key`].
    fn release_key(svids: &[Arc<Self::Svid>], bundle: &TrustBundle) -> u64;
    fn message(
        identities: &[Identity],
        svids: &[Arc<Self::Svid>],
        bundle: &TrustBundle,
    ) -> Self::Message;
}

pub(super) struct X509Kind;

impl SvidKind for X509Kind {
    type Svid = X509Svid;
    type Message = pb::X509svidResponse;
    const NAME: &'static str = "X509-SVID";
    const NOT_READY: &'static str = "SVID not yet available";
    const FIRST: &'static str = "FetchX509SVID.first";
    const WITH_BUNDLE: bool = true;

    async fn subscribe(
        state: &ApiState,
        ident: &Identity,
    ) -> Result<Subscription<X509Svid>, SignError> {
        state
            .cache
            .subscribe(&ident.spiffe_id, ident.x509_ttl)
            .await
    }

    fn expired(state: &ApiState, svid: &X509Svid) -> bool {
        state.cache.is_expired(svid)
    }

    fn release_key(svids: &[Arc<X509Svid>], bundle: &TrustBundle) -> u64 {
        release_key(svids, bundle)
    }

    fn message(
        identities: &[Identity],
        svids: &[Arc<X509Svid>],
        bundle: &TrustBundle,
    ) -> pb::X509svidResponse {
        x509_response(identities, svids, bundle)
    }
}

pub(super) struct WitKind;

impl SvidKind for WitKind {
    type Svid = WitSvid;
    type Message = pb::WitsvidResponse;
    const NAME: &'static str = "WIT-SVID";
    const NOT_READY: &'static str = "WIT-SVID not yet available";
    const FIRST: &'static str = "FetchWITSVID.first";
    const WITH_BUNDLE: bool = false;

    async fn subscribe(
        state: &ApiState,
        ident: &Identity,
    ) -> Result<Subscription<WitSvid>, SignError> {
        state
            .cache
            .subscribe_wit(&ident.spiffe_id, ident.wit_ttl)
            .await
    }

    fn expired(state: &ApiState, wit: &WitSvid) -> bool {
        state.cache.has_passed(wit.not_after)
    }

    fn release_key(wits: &[Arc<WitSvid>], _: &TrustBundle) -> u64 {
        wit_release_key(wits)
    }

    fn message(
        identities: &[Identity],
        wits: &[Arc<WitSvid>],
        _: &TrustBundle,
    ) -> pb::WitsvidResponse {
        wit_response(identities, wits)
    }
}

/// What an X509-SVID update releases, as a key for
/// [`AttestedPeer::check_alive_to_release`]: a digest of the private keys and
/// the bundle's sequence. A rotation pushed to many streams of one connection
/// is then checked once on that connection, not once per stream.
fn release_key(svids: &[Arc<X509Svid>], bundle: &TrustBundle) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bundle.sequence.hash(&mut h);
    for svid in svids {
        svid.key_pkcs8.hash(&mut h);
    }
    h.finish().max(1)
}

/// What a WIT-SVID update releases (see [`release_key`]): a digest of the
/// private keys.
fn wit_release_key(wits: &[Arc<WitSvid>]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for wit in wits {
        wit.key_jwk.hash(&mut h);
    }
    h.finish().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an idle stream keeps, besides its transport, is this struct
    /// (boxed) and its receivers' and registrations' small vectors. Written
    /// as an `async fn` it was over a kilobyte; a future or a buffer added
    /// to it shows here first.
    #[test]
    fn an_idle_stream_keeps_a_few_hundred_bytes() {
        let size = std::mem::size_of::<SvidStream<X509Kind>>();
        assert!(size <= 256, "SvidStream is {size} bytes");
        assert!(std::mem::size_of::<Watched<X509Svid>>() <= 64);
    }
}
