//! The worker's shared state and its loop per controller: long poll while a job slot is free,
//! start each assignment at once and poll again, back off while the controller is unreachable.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use quorum_api::v1::controller::{EnvironmentFacts, PollRequest};
use quorum_client::controller::WorkerClient;
use quorum_client::trust::TrustedIssuers;
use quorum_git::Mirrors;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::executor::{self, Executor, Limits, ProcessExecutor, SandboxTier};
use crate::retry::Backoff;
use crate::{Config, Hooks, job};

const POLL_WAIT_MS: u64 = 20_000;

pub(crate) struct Worker {
    pub(crate) config: Config,
    pub(crate) trust: TrustedIssuers,
    pub(crate) mirrors: Mirrors,
    pub(crate) executor: Arc<dyn Executor>,
    pub(crate) hooks: Arc<dyn Hooks>,
    pub(crate) environment: EnvironmentFacts,
    /// Declared inputs, verified and cached by digest under `data_dir/inputs`.
    pub(crate) inputs: crate::inputs::InputCache,
    /// One permit per job that may run at once, shared by all controllers.
    pub(crate) slots: Arc<Semaphore>,
    /// How many of each controller's loops (by URL) wait for a free slot.
    waiting: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    pub(crate) jobs: TaskTracker,
    /// The worker's own key, loaded once at start: it signs requests, reports and ledger records.
    pub(crate) key: ed25519_dalek::SigningKey,
    pub(crate) shutdown: CancellationToken,
}

impl Worker {
    pub(crate) fn new(
        config: Config,
        key: ed25519_dalek::SigningKey,
        hooks: Arc<dyn Hooks>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Worker> {
        let executor = choose_executor(&config)?;
        let environment = crate::facts::collect(&*executor);
        Ok(Worker {
            trust: TrustedIssuers::new(config.trusted_issuers.clone()),
            mirrors: Mirrors::new(config.data_dir.join("git")),
            inputs: crate::inputs::InputCache::new(config.data_dir.join("inputs")),
            slots: Arc::new(Semaphore::new(config.max_jobs as usize)),
            waiting: std::sync::Mutex::default(),
            config,
            executor,
            hooks,
            environment,
            jobs: TaskTracker::new(),
            key,
            shutdown,
        })
    }
}

impl Worker {
    /// Whether a controller other than `controller` waits for a slot: then a slot that frees
    /// up goes to whoever waited (the slots are served in order), not to the next offer of the
    /// controller whose job just ended (`job::run`).
    pub(crate) fn others_wait_for_a_slot(&self, controller: &str) -> bool {
        self.waiting
            .lock()
            .expect("slot waiters")
            .iter()
            .any(|(c, n)| c != controller && *n > 0)
    }

    /// Counts `controller`'s loop as waiting for a slot while the guard lives.
    fn wait_for_a_slot(&self, controller: &str) -> SlotWait<'_> {
        *self
            .waiting
            .lock()
            .expect("slot waiters")
            .entry(controller.to_string())
            .or_default() += 1;
        SlotWait {
            worker: self,
            controller: controller.to_string(),
        }
    }
}

/// A controller's loop waiting for a slot ([`Worker::wait_for_a_slot`]).
struct SlotWait<'a> {
    worker: &'a Worker,
    controller: String,
}

impl Drop for SlotWait<'_> {
    fn drop(&mut self) {
        let mut waiting = self.worker.waiting.lock().expect("slot waiters");
        if let Some(n) = waiting.get_mut(&self.controller) {
            *n = n.saturating_sub(1);
        }
    }
}

/// The configured isolation tier, if the host supports it (see `executor::probe`).
fn choose_executor(config: &Config) -> anyhow::Result<Arc<dyn Executor>> {
    match config.sandbox {
        SandboxTier::Process => {
            if config.limits != Limits::default() {
                tracing::warn!(
                    "sandbox = \"process\" does not enforce [limits]; use sandbox = \"namespaces\""
                );
            }
            tracing::warn!(
                "builds run as plain processes of the worker's user (sandbox = \"process\")"
            );
            Ok(Arc::new(ProcessExecutor))
        }
        SandboxTier::Namespaces => {
            match executor::probe(&config.data_dir.join("sandbox"), &config.limits) {
                Ok(sandbox) => {
                    tracing::info!(
                        tier = %sandbox.description(),
                        "builds run in namespace sandboxes"
                    );
                    Ok(Arc::new(sandbox))
                }
                Err(e) if config.allow_weaker_sandbox => {
                    tracing::warn!(
                        error = %e,
                        "THE NAMESPACE SANDBOX IS UNAVAILABLE: builds run UNCONTAINED as plain \
                         processes of the worker's user, without [limits] \
                         (allow_weaker_sandbox = true)"
                    );
                    Ok(Arc::new(ProcessExecutor))
                }
                Err(e) => Err(anyhow::anyhow!(
                    "cannot run builds in a sandbox: {e}; to run them uncontained anyway, set \
                     allow_weaker_sandbox = true in the worker config"
                )),
            }
        }
    }
}

/// Polls one controller until shutdown.
pub(crate) async fn serve(w: Arc<Worker>, client: Arc<WorkerClient>) {
    let span = tracing::info_span!("controller", url = client.base());
    async move {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            // Poll only with a free slot. The slot is not held while polling: with several
            // controllers each would otherwise keep one busy while waiting for work.
            let waiting = w.wait_for_a_slot(client.base());
            let capacity = tokio::select! {
                permit = w.slots.acquire() => {
                    drop(waiting);
                    let _permit = permit.expect("the job slots are never closed");
                    w.slots.available_permits() as u32 + 1
                }
                _ = w.shutdown.cancelled() => return,
            };
            let request = PollRequest {
                wait_ms: POLL_WAIT_MS,
                capacity,
            };
            let polled = tokio::select! {
                polled = client.poll(&request) => polled,
                _ = w.shutdown.cancelled() => return,
            };
            match polled {
                Ok(None) => backoff.reset(),
                Ok(Some(assignment)) => {
                    backoff.reset();
                    // Another controller may have filled the last slot while this poll waited.
                    // `job::run` names each assignment it runs in a span of its own.
                    let task = match w.slots.clone().try_acquire_owned() {
                        Ok(slot) => job::run(w.clone(), client.clone(), assignment, slot).boxed(),
                        Err(_) => {
                            let span = job::span(&assignment);
                            job::refuse(
                                w.clone(),
                                client.clone(),
                                assignment.id,
                                "the worker is at capacity",
                                true,
                            )
                            .instrument(span)
                            .boxed()
                        }
                    };
                    w.jobs.spawn(task);
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot poll the controller");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = w.shutdown.cancelled() => return,
                    }
                }
            }
        }
    }
    .instrument(span)
    .await
}
