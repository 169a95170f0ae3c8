//! The offers made to each worker (by the scheduler, trusted rebuilds and spot checks), kept
//! in memory in the order made, so a worker coming for its next job finds it without a read of
//! the database; and each running build's source (repository, commit, `SOURCE_DATE_EPOCH`),
//! which every assignment carries.
//!
//! Only a cache in front of the `assignments` table, never the truth: taking an offer still
//! claims its row on the condition that it is `offered` (so a withdrawn or expired offer found
//! here is skipped). Every offer is made through here once committed, so only offers made
//! before a restart are missing: the workers they are for (read at start) look in the database
//! too, until it has none left for them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An offer as the scheduler made it.
pub struct Offered {
    pub id: String,
    pub build_id: String,
    pub job: String,
    at: Instant,
}

/// What every assignment of a build says about its source.
pub struct BuildSource {
    pub repository: String,
    pub commit: String,
    pub source_date_epoch: i64,
}

#[derive(Default)]
pub struct Offers {
    waiting: Mutex<HashMap<String, VecDeque<Offered>>>,
    /// Workers that may have offers made before this controller started.
    before_start: Mutex<HashSet<String>>,
    sources: Mutex<HashMap<String, Arc<BuildSource>>>,
}

impl Offers {
    /// Remembers the offers of a committed pass, `(id, job, worker)`, in the order made.
    pub fn made<'a>(
        &self,
        build_id: &str,
        offers: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
    ) {
        let at = Instant::now();
        let mut waiting = self.waiting.lock().expect("offers");
        for (id, job, worker) in offers {
            waiting
                .entry(worker.to_string())
                .or_default()
                .push_back(Offered {
                    id: id.to_string(),
                    build_id: build_id.to_string(),
                    job: job.to_string(),
                    at,
                });
        }
    }

    /// The oldest offer made to `worker` less than `max_age` ago; older ones are dropped (the
    /// scheduler withdraws an offer not taken within a lease).
    pub fn next(&self, worker: &str, max_age: Duration) -> Option<Offered> {
        let mut waiting = self.waiting.lock().expect("offers");
        let queue = waiting.get_mut(worker)?;
        let next = std::iter::from_fn(|| queue.pop_front()).find(|o| o.at.elapsed() < max_age);
        if queue.is_empty() {
            waiting.remove(worker);
        }
        next
    }

    /// Drops offers older than `max_age`, those of workers that stopped coming too.
    pub fn prune(&self, max_age: Duration) {
        let mut waiting = self.waiting.lock().expect("offers");
        for queue in waiting.values_mut() {
            queue.retain(|o| o.at.elapsed() < max_age);
        }
        waiting.retain(|_, queue| !queue.is_empty());
    }

    /// Notes the workers that have offers made before this controller started.
    pub fn made_before_start(&self, workers: impl IntoIterator<Item = String>) {
        self.before_start.lock().expect("offers").extend(workers);
    }

    /// Whether `worker` may have offers made before this controller started.
    pub fn maybe_before_start(&self, worker: &str) -> bool {
        self.before_start.lock().expect("offers").contains(worker)
    }

    /// Notes that `worker` has no offers made before this controller started any more.
    pub fn none_before_start(&self, worker: &str) {
        self.before_start.lock().expect("offers").remove(worker);
    }

    /// A build's source, if known here.
    pub fn source(&self, build_id: &str) -> Option<Arc<BuildSource>> {
        self.sources
            .lock()
            .expect("build sources")
            .get(build_id)
            .cloned()
    }

    /// Remembers a build's source, read from the database, for its other assignments.
    pub fn remember_source(&self, build_id: &str, source: BuildSource) -> Arc<BuildSource> {
        let source = Arc::new(source);
        self.sources
            .lock()
            .expect("build sources")
            .insert(build_id.to_string(), source.clone());
        source
    }

    /// Forgets a finished build's source.
    pub fn forget_build(&self, build_id: &str) {
        self.sources.lock().expect("build sources").remove(build_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_come_back_per_worker_in_the_order_made_until_stale() {
        let offers = Offers::default();
        offers.made(
            "b1",
            [("a1", "j1", "w1"), ("a2", "j2", "w2"), ("a3", "j3", "w1")],
        );
        offers.made("b2", [("a4", "j1", "w1")]);
        let lease = Duration::from_secs(30);
        let ids = |w: &str| {
            std::iter::from_fn(|| offers.next(w, lease).map(|o| (o.build_id, o.id)))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ids("w1"),
            [
                ("b1".into(), "a1".into()),
                ("b1".into(), "a3".into()),
                ("b2".into(), "a4".into())
            ]
        );
        assert_eq!(ids("w2"), [("b1".to_string(), "a2".to_string())]);
        assert!(offers.next("w3", lease).is_none());
        offers.made("b1", [("a5", "j5", "w1")]);
        assert!(
            offers.next("w1", Duration::ZERO).is_none(),
            "older than its lease"
        );
        offers.made("b1", [("a6", "j6", "w1")]);
        offers.prune(Duration::ZERO);
        assert!(offers.waiting.lock().unwrap().is_empty());
    }
}
