//! Wake-ups for tasks that wait on a value without holding a future for it.
//!
//! A task waiting on a `tokio::sync::watch` receiver keeps a `changed()`
//! future, and with it an intrusive waiter, for as long as it waits. A
//! Workload API stream waits for hours on several of them (the entries, the
//! bundle, each SVID, shutdown) and a node holds tens of thousands of
//! streams, so those futures were a large part of what an idle stream costs.
//! Here a waiting task leaves only its waker: a [`WakerSet`] beside the value
//! keeps one per registered task, and whoever changes the value calls
//! [`WakerSet::wake_all`] after it. The task then looks at the value itself
//! (`watch::Receiver::has_changed`).
//!
//! No wake-up is lost: a task registers first and looks at the value
//! second, and the changer changes the value first and wakes second, so
//! either the task sees the change or the change's wake-up finds the task.

use std::sync::Arc;
use std::task::Waker;

use super::Mutex;

/// The wakers of the tasks waiting for one thing to change.
#[derive(Default)]
pub struct WakerSet {
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    wakers: Vec<Option<Waker>>,
    /// Indices of `wakers` left empty by a dropped [`Registration`].
    free: Vec<usize>,
}

impl WakerSet {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Wakes every registered task. Registrations stay: a task is woken by
    /// every later change too, until its [`Registration`] is dropped.
    pub fn wake_all(&self) {
        for waker in self.slots.lock().wakers.iter().flatten() {
            waker.wake_by_ref();
        }
    }
}

/// One task's place in a [`WakerSet`], left when this is dropped.
pub struct Registration {
    set: Arc<WakerSet>,
    /// Index in the set's wakers; `usize::MAX` until first registered.
    key: usize,
    /// The waker last registered, compared without taking the set's lock:
    /// a task is normally polled with the same waker each time, and a
    /// change wakes many tasks at once, which then register again.
    waker: Option<Waker>,
}

impl Registration {
    /// Not yet registered: [`Registration::register`] does that.
    pub fn new(set: Arc<WakerSet>) -> Self {
        Self {
            set,
            key: usize::MAX,
            waker: None,
        }
    }

    /// Makes `waker` the one the next change wakes (a no-op when it is
    /// already).
    pub fn register(&mut self, waker: &Waker) {
        if self.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            return;
        }
        let mut slots = self.set.slots.lock();
        if self.key == usize::MAX {
            self.key = match slots.free.pop() {
                Some(key) => key,
                None => {
                    slots.wakers.push(None);
                    slots.wakers.len() - 1
                }
            };
        }
        slots.wakers[self.key] = Some(waker.clone());
        drop(slots);
        self.waker = Some(waker.clone());
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.key == usize::MAX {
            return;
        }
        let mut slots = self.set.slots.lock();
        slots.wakers[self.key] = None;
        slots.free.push(self.key);
    }
}

/// A waker that counts its wake-ups, for tests of code that wakes.
#[cfg(test)]
#[derive(Default)]
pub struct WakeCount(pub std::sync::atomic::AtomicUsize);

#[cfg(test)]
impl WakeCount {
    pub fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[cfg(test)]
impl std::task::Wake for WakeCount {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How many tasks are registered.
    fn registered(set: &WakerSet) -> usize {
        let slots = set.slots.lock();
        slots.wakers.len() - slots.free.len()
    }

    fn counter() -> (Arc<WakeCount>, Waker) {
        let c = Arc::new(WakeCount::default());
        (c.clone(), Waker::from(c))
    }

    #[test]
    fn every_registered_task_is_woken_by_every_change_until_it_leaves() {
        let set = WakerSet::new();
        let (a, wa) = counter();
        let (b, wb) = counter();
        let mut ra = Registration::new(set.clone());
        let mut rb = Registration::new(set.clone());
        set.wake_all();
        assert_eq!(a.count(), 0, "not registered yet");
        ra.register(&wa);
        rb.register(&wb);
        ra.register(&wa);
        assert_eq!(registered(&set), 2, "registering again keeps one place");
        set.wake_all();
        set.wake_all();
        assert_eq!(a.count(), 2);
        assert_eq!(b.count(), 2);
        drop(rb);
        set.wake_all();
        assert_eq!(a.count(), 3);
        assert_eq!(b.count(), 2, "left, not woken");
        assert_eq!(registered(&set), 1);
    }

    #[test]
    fn a_new_waker_replaces_the_old_one_and_places_are_reused() {
        let set = WakerSet::new();
        let (old, w_old) = counter();
        let (new, w_new) = counter();
        let mut r = Registration::new(set.clone());
        r.register(&w_old);
        r.register(&w_new);
        set.wake_all();
        assert_eq!(old.count(), 0);
        assert_eq!(new.count(), 1);
        drop(r);
        let mut again = Registration::new(set.clone());
        again.register(&w_old);
        assert_eq!(
            set.slots.lock().wakers.len(),
            1,
            "the freed place is reused"
        );
        set.wake_all();
        assert_eq!(old.count(), 1);
    }
}
