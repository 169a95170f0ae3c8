//! Take-up tokens minted ahead. Taking an offer hands the worker a job token and an upload
//! token from the IdP; asked for at that moment, they cost every take-up a round trip to the
//! IdP. Instead, the tokens of every new offer are asked for here, in the background, many per
//! request (`POST /take-ups`), as soon as the offer is committed, and wait in memory until the
//! offer is taken. Each worker's first new offer goes to the front of the queue: that worker is
//! woken at once and comes for it within a millisecond or two, and a take-up whose tokens are
//! being minted waits for them ([`Ahead::take_or_wait`]) rather than asking the IdP itself. A
//! build of a thousand jobs used to start with a hundred workers each asking the IdP for their
//! first tokens at once (a hundred requests, each checking the controller's access token),
//! which kept the first take-up waiting about 70 ms after its offer was committed.
//!
//! Only a cache: an offer whose tokens are not here (minting failed, minted too long ago, or a
//! restarted controller) gets them at take-up as before. Tokens minted ahead never leave the
//! controller unless their own offer is taken by the worker they name, checked here when they
//! arrive and again when they are handed out; an offer withdrawn in the meantime leaves its
//! tokens unused, dropped once they are a lease old.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quorum_api::v1::idp::{MAX_TAKE_UPS, TakeUp, TakeUpTokens};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::State;

/// How long a take-up's tokens live: the job's timeout, with room for the offer to wait (a
/// lease), for leases to lapse while it runs, and for the last upload.
pub fn lifetime_secs(timeout_secs: u64, lease_secs: u64) -> i64 {
    (timeout_secs + 4 * lease_secs + 300) as i64
}

#[derive(Default)]
pub struct Ahead {
    queued: Mutex<Queued>,
    queued_wake: Notify,
    /// Minted tokens by assignment id.
    minted: Mutex<HashMap<String, Minted>>,
    /// Told whenever a batch of tokens has arrived or failed.
    minted_wake: Notify,
    /// Take-ups served from here, and those that asked the IdP themselves.
    pub served_ahead: AtomicU64,
    pub served_at_take_up: AtomicU64,
}

/// Take-ups waiting to be minted or being minted.
#[derive(Default)]
struct Queued {
    /// Workers' first new offers, in the order offered: minted before the others.
    first: Vec<TakeUp>,
    /// The rest, in the order offered.
    later: Vec<TakeUp>,
    /// The assignments of every take-up in `first` and `later` or in a request to the IdP.
    minting: HashSet<String>,
}

struct Minted {
    at: Instant,
    worker_audience: String,
    tokens: TakeUpTokens,
}

impl Ahead {
    /// Queues take-ups whose tokens the minter asks for: `first` (workers' first new offers,
    /// which they come for at once) ahead of everything queued, `later` behind.
    pub fn queue(
        &self,
        first: impl IntoIterator<Item = TakeUp>,
        later: impl IntoIterator<Item = TakeUp>,
    ) {
        let mut queued = self.queued.lock().expect("ahead queue");
        let Queued {
            first: q_first,
            later: q_later,
            minting,
        } = &mut *queued;
        let before = q_first.len() + q_later.len();
        for (into, take_ups) in [
            (&mut *q_first, first.into_iter().collect::<Vec<_>>()),
            (&mut *q_later, later.into_iter().collect()),
        ] {
            for t in take_ups {
                minting.insert(t.assignment.clone());
                into.push(t);
            }
        }
        if q_first.len() + q_later.len() > before {
            self.queued_wake.notify_one();
        }
    }

    /// The next request's take-ups, at most `MAX_TAKE_UPS`: first offers alone while there
    /// are any (their workers are waiting for them, and a smaller request returns sooner), then
    /// the others.
    fn next_batch(&self) -> Vec<TakeUp> {
        let mut queued = self.queued.lock().expect("ahead queue");
        let from = if queued.first.is_empty() {
            &mut queued.later
        } else {
            &mut queued.first
        };
        let n = from.len().min(MAX_TAKE_UPS);
        from.drain(..n).collect()
    }

    /// Marks `batch` as no longer being minted (its tokens kept or not) and wakes the
    /// take-ups waiting for it.
    fn done(&self, batch: &[TakeUp]) {
        let mut queued = self.queued.lock().expect("ahead queue");
        for t in batch {
            queued.minting.remove(&t.assignment);
        }
        drop(queued);
        self.minted_wake.notify_waiters();
    }

    /// Like [`Ahead::take`], but if `assignment`'s tokens are queued or being minted, waits for
    /// them, at most `wait`. `None` when they are not coming: the caller asks the IdP itself.
    pub async fn take_or_wait(
        &self,
        assignment: &str,
        worker_audience: &str,
        max_age: Duration,
        wait: Duration,
    ) -> Option<TakeUpTokens> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so a batch that lands in between still wakes us.
            let arrived = self.minted_wake.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(tokens) = self.take(assignment, worker_audience, max_age) {
                return Some(tokens);
            }
            let coming = self
                .queued
                .lock()
                .expect("ahead queue")
                .minting
                .contains(assignment);
            if !coming || tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return None;
            }
        }
    }

    /// The tokens minted for `assignment`, if they were minted for `worker_audience` within
    /// `max_age`. Taken out: an assignment's tokens are handed out once.
    pub fn take(
        &self,
        assignment: &str,
        worker_audience: &str,
        max_age: Duration,
    ) -> Option<TakeUpTokens> {
        let minted = self
            .minted
            .lock()
            .expect("ahead tokens")
            .remove(assignment)?;
        (minted.worker_audience == worker_audience && minted.at.elapsed() < max_age)
            .then_some(minted.tokens)
    }

    /// How many take-ups' tokens wait here to be handed out.
    pub fn waiting(&self) -> usize {
        self.minted.lock().expect("ahead tokens").len()
    }

    /// Counts a take-up served from tokens minted ahead, or one that asked the IdP itself.
    pub fn served(&self, ahead: bool) {
        let counter = if ahead {
            &self.served_ahead
        } else {
            &self.served_at_take_up
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Keeps `tokens` of `take_ups` (in the same order) whose claims name the take-up they were
    /// asked for, and drops what is older than `max_age`.
    fn keep(&self, take_ups: &[TakeUp], tokens: Vec<TakeUpTokens>, max_age: Duration) {
        let now = Instant::now();
        let mut minted = self.minted.lock().expect("ahead tokens");
        minted.retain(|_, m| now.duration_since(m.at) < max_age);
        for (t, tokens) in take_ups.iter().zip(tokens) {
            if !names(&tokens, t) {
                tracing::error!(assignment = %t.assignment, "the IdP answered take-up tokens for another take-up; dropped");
                continue;
            }
            minted.insert(
                t.assignment.clone(),
                Minted {
                    at: now,
                    worker_audience: t.audience.clone(),
                    tokens,
                },
            );
        }
    }
}

/// Whether both tokens are for take-up `t`: the job token's audience is its worker, and both
/// are scoped to its build, job and assignment. Read without verifying: the controller asked
/// its own IdP for them; this only guards against handing a worker another's tokens.
fn names(tokens: &TakeUpTokens, t: &TakeUp) -> bool {
    let scoped = |token: &str, audience: Option<&str>| {
        let Ok(peeked) = quorum_token::peek(token) else {
            return false;
        };
        let claims = &peeked.claims;
        let scope = &claims["scope"];
        audience.is_none_or(|aud| claims["aud"] == aud)
            && scope["build"] == t.build.as_str()
            && scope["job"] == t.job.as_str()
            && scope["assignment"] == t.assignment.as_str()
    };
    scoped(&tokens.job.access_token, Some(&t.audience)) && scoped(&tokens.upload.access_token, None)
}

/// Mints queued take-ups until `shutdown`, up to `MAX_TAKE_UPS` per request. A refused or
/// failed request is logged and its take-ups are left to be minted when taken.
pub async fn run(state: Arc<State>, shutdown: CancellationToken) {
    let max_age = Duration::from_secs(state.lease_secs);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = state.ahead.queued_wake.notified() => {}
        }
        loop {
            let batch = state.ahead.next_batch();
            if batch.is_empty() {
                break;
            }
            let minted = async {
                let access = state.access_token().await?;
                anyhow::Ok(
                    state
                        .idp
                        .exchange_take_ups(&access, &state.store_audience, batch.clone())
                        .await?,
                )
            };
            let started = Instant::now();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = minted => match r {
                    Ok(tokens) => {
                        tracing::debug!(count = batch.len(), elapsed = ?started.elapsed(), "take-up tokens minted ahead");
                        state.ahead.keep(&batch, tokens, max_age)
                    }
                    Err(e) => tracing::warn!(count = batch.len(), error = %format!("{e:#}"), "cannot mint take-up tokens ahead; they are minted when taken"),
                },
            }
            state.ahead.done(&batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use quorum_api::v1::idp::TokenResponse;
    use quorum_token::{Claims, IssuerKey, Scope};

    use super::*;

    fn take_up(worker: &str, assignment: &str) -> TakeUp {
        TakeUp {
            audience: format!("worker:{worker}"),
            build: "b".into(),
            job: format!("job-{assignment}"),
            assignment: assignment.into(),
            lifetime_secs: 600,
            upload_constraints: Default::default(),
        }
    }

    /// Tokens as the IdP would mint them for `t`.
    fn tokens_for(t: &TakeUp) -> TakeUpTokens {
        let key = IssuerKey::new(ed25519_dalek::SigningKey::from_bytes(&[7; 32]));
        let token = |typ, aud: &str| {
            let claims = Claims {
                iss: "http://idp".into(),
                sub: "ctl".into(),
                aud: aud.into(),
                exp: 2_000_000_000,
                nbf: 0,
                iat: 0,
                jti: format!("{}-{typ}", t.assignment),
                tenant: "t".into(),
                scope: Some(Scope {
                    controller: "ctl".into(),
                    build: t.build.clone(),
                    job: Some(t.job.clone()),
                    assignment: Some(t.assignment.clone()),
                    max_files: None,
                    max_bytes: None,
                    max_calls: None,
                    source_cidrs: vec![],
                }),
            };
            TokenResponse {
                access_token: quorum_token::mint(typ, &claims, &key),
                issued_token_type: typ.into(),
                token_type: "Bearer".into(),
                expires_in: 600,
            }
        };
        TakeUpTokens {
            job: token(quorum_token::TYP_JOB, &t.audience),
            upload: token(quorum_token::TYP_UPLOAD, "store"),
        }
    }

    #[test]
    fn tokens_go_only_to_their_own_worker_once_and_while_fresh() {
        let ahead = Ahead::default();
        let asked = [
            take_up("w1", "a1"),
            take_up("w2", "a2"),
            take_up("w1", "a3"),
        ];
        let minted = asked.iter().map(tokens_for).collect();
        let lease = Duration::from_secs(30);
        ahead.keep(&asked, minted, lease);
        assert_eq!(ahead.waiting(), 3);
        // Another worker asking for w1's assignment gets nothing, and the tokens are gone.
        assert!(ahead.take("a1", "worker:w2", lease).is_none());
        assert!(ahead.take("a1", "worker:w1", lease).is_none());
        let a2 = ahead.take("a2", "worker:w2", lease).expect("a2's tokens");
        assert_eq!(a2, tokens_for(&asked[1]));
        assert!(
            ahead.take("a2", "worker:w2", lease).is_none(),
            "handed out once"
        );
        // Tokens older than the offer's lease are not handed out.
        assert!(ahead.take("a3", "worker:w1", Duration::ZERO).is_none());
        assert_eq!(ahead.waiting(), 0);
    }

    /// A take-up whose tokens are being minted waits for them, and only for them: it gets them
    /// once they land, hears at once when their request failed, and does not wait at all for
    /// tokens nobody is minting. Workers' first offers are asked for before everything queued.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_take_up_waits_for_its_tokens_being_minted_and_no_longer() {
        let ahead = Arc::new(Ahead::default());
        let lease = Duration::from_secs(30);
        let long = Duration::from_secs(60);
        ahead.queue([], [take_up("w1", "a2"), take_up("w2", "a3")]);
        ahead.queue([take_up("w1", "a1")], []);
        let batch = ahead.next_batch();
        let named: Vec<&str> = batch.iter().map(|t| t.assignment.as_str()).collect();
        assert_eq!(named, ["a1"], "first offers go alone, ahead of the rest");
        let waiter = {
            let ahead = ahead.clone();
            tokio::spawn(async move { ahead.take_or_wait("a1", "worker:w1", lease, long).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !waiter.is_finished(),
            "it waits while its tokens are minted"
        );
        let tokens: Vec<TakeUpTokens> = batch.iter().map(tokens_for).collect();
        ahead.keep(&batch, tokens.clone(), lease);
        ahead.done(&batch);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken when its tokens land")
            .unwrap();
        assert_eq!(got, Some(tokens[0].clone()));

        // The next request fails: its waiters are told at once and ask the IdP themselves.
        let batch = ahead.next_batch();
        assert_eq!(batch.len(), 2);
        let waiter = {
            let ahead = ahead.clone();
            tokio::spawn(async move { ahead.take_or_wait("a3", "worker:w2", lease, long).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        ahead.done(&batch);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("told at once that nothing is coming")
            .unwrap();
        assert_eq!(got, None);

        // Nothing queued for it: no wait at all.
        let started = std::time::Instant::now();
        assert_eq!(
            ahead.take_or_wait("a9", "worker:w1", lease, long).await,
            None
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn tokens_that_name_another_take_up_are_dropped() {
        let ahead = Ahead::default();
        let asked = [
            take_up("w1", "a1"),
            take_up("w2", "a2"),
            take_up("w3", "a3"),
        ];
        // An answer in the wrong order: a1's tokens for a2 and a2's for a1.
        let mut minted: Vec<TakeUpTokens> = asked.iter().map(tokens_for).collect();
        minted.swap(0, 1);
        // a3's upload token scoped to another job.
        let mut other_job = take_up("w3", "a3");
        other_job.job = "another".into();
        minted[2].upload = tokens_for(&other_job).upload;
        ahead.keep(&asked, minted, Duration::from_secs(30));
        assert_eq!(ahead.waiting(), 0);
        assert!(
            ahead
                .take("a1", "worker:w1", Duration::from_secs(30))
                .is_none()
        );
    }
}
