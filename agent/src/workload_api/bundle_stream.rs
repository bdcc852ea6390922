//! FetchX509Bundles', FetchJWTBundles' and FetchWITBundles' stream, polled
//! by hand like the SVID streams ([`super::svid_stream`] says why): a JWT
//! source holds one of these for as long as it runs.
//!
//! What it sends: the own trust domain's bundle and those of the foreign
//! domains the caller's entries federate with, at once and again whenever
//! that changes. Entitled at open (a caller with no identity gets no bundle
//! either); re-matched only when the entries change. Identical consecutive
//! messages are not re-sent.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use tessera_attestor::AttestedPeer;
use tokio::sync::watch;
use tonic::Status;

use super::state::{ApiState, Opened};
use crate::caller::{no_identity, stream_caller_gone};
use crate::entries::{EntrySet, Identity};
use crate::identity::TrustBundle;
use crate::metrics::OpenStream;
use crate::sync::wakers::Registration;
use crate::transport::grpc_stream::FirstOutcome;

/// A bundle stream of the messages `B` builds from the own trust domain's
/// SPIFFE ID, the caller's identities and the bundle.
pub(super) struct BundleStream<M, B> {
    state: Arc<ApiState>,
    peer: Arc<AttestedPeer>,
    entries: watch::Receiver<EntrySet>,
    identities: Vec<Identity>,
    bundle: watch::Receiver<Arc<TrustBundle>>,
    build: B,
    /// The last message sent; None before the first.
    last: Option<M>,
    /// Entries, bundle, shutdown.
    node_changes: Registration,
    ended: bool,
    outcome: FirstOutcome,
    _open: OpenStream,
}

impl<M, B> BundleStream<M, B>
where
    M: Clone + PartialEq,
    B: Fn(&str, &[Identity], &TrustBundle) -> M,
{
    pub(super) fn new(
        state: Arc<ApiState>,
        opened: Opened,
        build: B,
        open: OpenStream,
        outcome: FirstOutcome,
    ) -> Self {
        Self {
            bundle: state.cache.trust_store().subscribe(),
            node_changes: Registration::new(state.changes.clone()),
            state,
            peer: opened.peer,
            entries: opened.entries,
            identities: opened.identities,
            build,
            last: None,
            ended: false,
            outcome,
            _open: open,
        }
    }

    fn yielded(&mut self, item: Result<M, Status>) -> Poll<Option<Result<M, Status>>> {
        self.outcome.first(&item);
        Poll::Ready(Some(item))
    }

    fn end_with(&mut self, status: Status) -> Poll<Option<Result<M, Status>>> {
        self.ended = true;
        self.yielded(Err(status))
    }
}

impl<M, B> Stream for BundleStream<M, B>
where
    M: Clone + PartialEq + Unpin,
    B: Fn(&str, &[Identity], &TrustBundle) -> M + Unpin,
{
    type Item = Result<M, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        // Registered before looking: a change after the look wakes this task.
        this.node_changes.register(cx.waker());
        if this.state.callers.shutdown.is_cancelled() {
            return this.end_with(Status::unavailable("agent is shutting down"));
        }
        // Either sender gone: the agent is stopping.
        let (Ok(entries_changed), Ok(bundle_changed)) =
            (this.entries.has_changed(), this.bundle.has_changed())
        else {
            this.ended = true;
            return Poll::Ready(None);
        };
        if this.last.is_some() {
            if !entries_changed && !bundle_changed {
                return Poll::Pending;
            }
            if let Some(status) = stream_caller_gone(&this.peer, 0) {
                return this.end_with(status);
            }
        }
        if entries_changed {
            this.identities = this
                .entries
                .borrow_and_update()
                .identities_for(&this.peer.selectors);
            if this.identities.is_empty() {
                return this.end_with(no_identity());
            }
        }
        let td = this.state.cache.trust_store().trust_domain().id_string();
        let message = (this.build)(&td, &this.identities, &this.bundle.borrow_and_update());
        if this.last.as_ref() == Some(&message) {
            return Poll::Pending;
        }
        this.last = Some(message.clone());
        this.yielded(Ok(message))
    }
}
