//! In-memory caching shared by the `say` synthesizer ([`crate::tts`]) and the `play` fetcher
//! ([`crate::play`]): an LRU bounded by the total weight of its values, and single-flight
//! deduplication of concurrent misses.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::future::{BoxFuture, Either, FutureExt, Ready, Shared};
use sautikit_actors::synth::Audio;
use tokio::task::JoinError;

/// Poison only means another thread panicked mid-operation; every critical section on these
/// caches leaves them consistent, so carrying on is safe.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a value costs against a [`WeightedLru`]'s budget.
pub trait Weigh {
    fn weight(&self) -> usize;
}

/// Audio weighs its samples: what it holds in memory.
impl Weigh for Audio {
    fn weight(&self) -> usize {
        self.len()
    }
}

impl<T: Weigh + ?Sized> Weigh for Arc<T> {
    fn weight(&self) -> usize {
        (**self).weight()
    }
}

/// Least-recently-used map bounded by the total weight of its values rather than their number,
/// since one prompt can be half a second and another ten minutes.
pub struct WeightedLru<K, V> {
    budget: usize,
    /// Total weight held. Every user weighs audio in samples, and their tests read it by this
    /// name.
    pub(crate) used_samples: usize,
    tick: u64,
    entries: HashMap<K, Slot<V>>,
    /// Last use → key; the first entry is the next to evict.
    order: BTreeMap<u64, K>,
}

struct Slot<V> {
    value: V,
    /// Weighed once on insertion, so the total stays right whatever the value does later.
    weight: usize,
    last_use: u64,
}

impl<K: Eq + Hash + Clone, V: Clone + Weigh> WeightedLru<K, V> {
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            used_samples: 0,
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// The value, now the most recently used.
    pub fn get<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let slot = self.entries.get_mut(key)?;
        self.tick += 1;
        if let Some(owned) = self.order.remove(&slot.last_use) {
            self.order.insert(self.tick, owned);
        }
        slot.last_use = self.tick;
        Some(slot.value.clone())
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let slot = self.entries.remove(key)?;
        self.order.remove(&slot.last_use);
        self.used_samples -= slot.weight;
        Some(slot.value)
    }

    /// Replaces any value under `key`, evicting the least recently used until it fits.
    pub fn insert(&mut self, key: K, value: V) {
        self.remove(&key);
        let weight = value.weight();
        // A value bigger than the whole budget would evict everything and still not fit: its
        // user serves it from the next tier each time instead.
        if weight > self.budget {
            return;
        }
        while self.used_samples + weight > self.budget {
            let Some((_, victim)) = self.order.pop_first() else {
                break;
            };
            if let Some(old) = self.entries.remove(&victim) {
                self.used_samples -= old.weight;
            }
        }
        self.tick += 1;
        self.used_samples += weight;
        self.order.insert(self.tick, key.clone());
        self.entries.insert(
            key,
            Slot {
                value,
                weight,
                last_use: self.tick,
            },
        );
    }
}

/// The shared result of one flight.
pub type Flight<V> = Shared<BoxFuture<'static, V>>;

/// Concurrent requests for one key share a single piece of work (a flight). The work runs as its
/// own task, so a caller hanging up does not waste it, and leaves the map however it ends,
/// panics included, so a failed key is retried by the next request rather than answered from a
/// dead flight forever. Results are not kept: that is the caller's cache.
pub struct SingleFlight<K, V> {
    flights: Arc<Mutex<HashMap<K, Flight<V>>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self {
            flights: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn new() -> Self {
        Self::default()
    }

    /// The result for `key`: what `cached` finds, else the flight under way for `key`, else a
    /// new flight running `work()`. `task_failed` answers for a task that panicked or was
    /// cancelled.
    ///
    /// `cached` is consulted under the map's lock: a flight that stores its result in the
    /// caller's cache before it ends leaves no gap between a caller's first look there and
    /// joining (or starting) a flight.
    pub fn join<Fut>(
        &self,
        key: K,
        cached: impl FnOnce() -> Option<V>,
        work: impl FnOnce() -> Fut,
        task_failed: impl FnOnce(JoinError) -> V + Send + 'static,
    ) -> Either<Ready<V>, Flight<V>>
    where
        Fut: Future<Output = V> + Send + 'static,
    {
        let mut flights = lock(&self.flights);
        if let Some(value) = cached() {
            return Either::Left(futures::future::ready(value));
        }
        if let Some(flight) = flights.get(&key) {
            return Either::Right(flight.clone());
        }
        let work = work();
        let map = self.flights.clone();
        let guard_key = key.clone();
        let task = tokio::spawn(async move {
            // Made on the task's first poll, not here: a task dropped unpolled must not take
            // the map's lock while this thread holds it.
            let _guard = FlightGuard {
                flights: map,
                key: guard_key,
            };
            work.await
        });
        let flight: Flight<V> = async move { task.await.unwrap_or_else(task_failed) }
            .boxed()
            .shared();
        flights.insert(key, flight.clone());
        Either::Right(flight)
    }
}

/// Removes its flight from the map when the task ends, by return, panic or cancellation.
struct FlightGuard<K: Eq + Hash, V> {
    flights: Arc<Mutex<HashMap<K, Flight<V>>>>,
    key: K,
}

impl<K: Eq + Hash, V> Drop for FlightGuard<K, V> {
    fn drop(&mut self) {
        lock(&self.flights).remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct Blob(usize);

    impl Weigh for Blob {
        fn weight(&self) -> usize {
            self.0
        }
    }

    #[test]
    fn evicts_least_recently_used_by_weight() {
        let mut lru = WeightedLru::new(10);
        lru.insert("a", Blob(4));
        lru.insert("b", Blob(4));
        assert_eq!(lru.get("a"), Some(Blob(4))); // b is now the oldest
        lru.insert("c", Blob(4));
        assert_eq!(lru.get("b"), None);
        assert!(lru.get("a").is_some() && lru.get("c").is_some());
        assert_eq!(lru.used_samples, 8);
        // One heavy value evicts as many light ones as it needs.
        lru.insert("d", Blob(9));
        assert!(lru.get("a").is_none() && lru.get("c").is_none());
        assert_eq!(lru.used_samples, 9);
        // Replacing a key replaces its weight.
        lru.insert("d", Blob(2));
        assert_eq!(lru.used_samples, 2);
        assert_eq!(lru.remove("d"), Some(Blob(2)));
        assert_eq!(lru.used_samples, 0);
        assert_eq!(lru.remove("d"), None);
    }

    #[test]
    fn oversize_values_are_not_kept() {
        let mut lru = WeightedLru::new(10);
        lru.insert(1, Blob(6));
        lru.insert(2, Blob(11));
        assert_eq!(lru.get(&2), None);
        assert_eq!(
            lru.get(&1),
            Some(Blob(6)),
            "an oversize value evicts nothing"
        );
        assert_eq!(lru.used_samples, 6);
        // Nor does an oversize replacement leave the old value behind.
        lru.insert(1, Blob(11));
        assert_eq!(lru.get(&1), None);
        assert_eq!(lru.used_samples, 0);
        lru.insert(3, Blob(10));
        assert_eq!(lru.get(&3), Some(Blob(10)), "exactly the budget fits");
    }

    #[test]
    fn arcs_weigh_their_contents() {
        let mut lru = WeightedLru::new(10);
        lru.insert("a", Arc::new(Audio::from(vec![0i16; 7])));
        assert_eq!(lru.used_samples, 7);
    }

    type Flights = SingleFlight<&'static str, Result<usize, String>>;

    fn failed(e: JoinError) -> Result<usize, String> {
        Err(format!("task failed: {e}"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_one_run() {
        let flights = Arc::new(Flights::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let results = futures::future::join_all((0..16).map(|_| {
            let flights = flights.clone();
            let runs = runs.clone();
            tokio::spawn(async move {
                let flight = flights.join(
                    "k",
                    || None,
                    || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok(42)
                    },
                    failed,
                );
                flight.await
            })
        }))
        .await;
        for r in results {
            assert_eq!(r.expect("caller"), Ok(42));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(
            lock(&flights.flights).is_empty(),
            "a finished flight leaves"
        );
    }

    #[tokio::test]
    async fn cached_value_answers_without_a_flight() {
        let flights = Flights::new();
        let got = flights
            .join("k", || Some(Ok(7)), || async { Ok(1) }, failed)
            .await;
        assert_eq!(got, Ok(7));
        assert!(lock(&flights.flights).is_empty());
    }

    #[tokio::test]
    async fn failed_and_panicked_flights_are_retried() {
        let flights = Flights::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let run = |outcome: &'static str| {
            let runs = runs.clone();
            move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                match outcome {
                    "panic" => panic!("flight panicked"),
                    "error" => Err("origin down".to_owned()),
                    _ => Ok(1),
                }
            }
        };
        let e = flights
            .join("k", || None, run("panic"), failed)
            .await
            .expect_err("panicked");
        assert!(e.starts_with("task failed"), "{e}");
        assert_eq!(
            flights.join("k", || None, run("error"), failed).await,
            Err("origin down".to_owned())
        );
        assert_eq!(flights.join("k", || None, run("ok"), failed).await, Ok(1));
        assert_eq!(runs.load(Ordering::SeqCst), 3, "each failure was retried");
        assert!(lock(&flights.flights).is_empty());
    }
}
