//! Group commit for the dispatch path's writes on SQLite: the claims and reports that arrive
//! while one transaction is being written go into the next one together. Every commit on
//! SQLite appends to the WAL and makes the pool's other connections drop their page caches,
//! so one commit for many workers' writes instead of one each is less work for every reader
//! too. Each write is still its own statement with its own result (rows changed), answered
//! only after its transaction commits; if a batch fails, its writes are retried one by one,
//! so one bad write never fails another's. On PostgreSQL (row locks, no shared cache to drop,
//! and a transaction costs two more round trips) writes go straight to the pool.

use std::sync::Arc;

use quorum_service::ApiError;
use tokio::sync::{mpsc, oneshot};

use crate::db::{Pool, WriteGate};

/// Most writes in one transaction.
const MOST: usize = 64;

/// One value bound to a write's statement.
pub(crate) enum Arg {
    Text(String),
    OptText(Option<String>),
    Int(i64),
}

/// One statement and its values, in order.
pub(crate) struct Write {
    pub sql: &'static str,
    pub args: Vec<Arg>,
}

struct Queued {
    write: Write,
    done: oneshot::Sender<Result<u64, String>>,
}

/// Where handlers hand their writes (`State::commits`).
pub(crate) struct Commits {
    pool: Pool,
    gate: Arc<WriteGate>,
    queue: Option<mpsc::UnboundedSender<Queued>>,
}

impl Commits {
    /// Starts the committer for `pool` when it is SQLite; it ends when this is dropped.
    pub fn start(pool: &Pool, gate: Arc<WriteGate>) -> Commits {
        let queue = crate::db::is_sqlite(pool).then(|| {
            let (queue, rx) = mpsc::unbounded_channel();
            tokio::spawn(committer(pool.clone(), gate.clone(), rx));
            queue
        });
        Commits {
            pool: pool.clone(),
            gate,
            queue,
        }
    }

    /// Runs `write` (in a shared transaction on SQLite) and returns the rows it changed.
    pub async fn execute(&self, write: Write) -> Result<u64, ApiError> {
        let Some(queue) = &self.queue else {
            let _turn = self.gate.enter().await;
            return one(&self.pool, &write).await.map_err(ApiError::internal);
        };
        let (done, answer) = oneshot::channel();
        queue
            .send(Queued { write, done })
            .map_err(|_| ApiError::internal("the controller is stopping"))?;
        answer
            .await
            .map_err(|_| ApiError::internal("the controller is stopping"))?
            .map_err(ApiError::internal)
    }
}

async fn committer(pool: Pool, gate: Arc<WriteGate>, mut rx: mpsc::UnboundedReceiver<Queued>) {
    while let Some(first) = rx.recv().await {
        let turn = gate.enter().await;
        // What arrived while this one waited for the gate goes along with it.
        let mut batch = vec![first];
        while batch.len() < MOST {
            match rx.try_recv() {
                Ok(q) => batch.push(q),
                Err(_) => break,
            }
        }
        let results = match together(&pool, &batch).await {
            Ok(results) => results,
            Err(e) => {
                tracing::warn!(error = %e, writes = batch.len(), "a group commit failed; writing one by one");
                let mut results = Vec::with_capacity(batch.len());
                for q in &batch {
                    results.push(one(&pool, &q.write).await.map_err(|e| e.to_string()));
                }
                results
            }
        };
        drop(turn);
        for (q, r) in batch.into_iter().zip(results) {
            let _ = q.done.send(r);
        }
    }
}

fn query(write: &Write) -> sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments<'_>> {
    let mut q = sqlx::query(write.sql);
    for arg in &write.args {
        q = match arg {
            Arg::Text(v) => q.bind(v.as_str()),
            Arg::OptText(v) => q.bind(v.as_deref()),
            Arg::Int(v) => q.bind(*v),
        };
    }
    q
}

async fn one(pool: &Pool, write: &Write) -> Result<u64, sqlx::Error> {
    Ok(query(write).execute(pool).await?.rows_affected())
}

/// Every write of `batch` in one transaction; an error in any rolls all back.
async fn together(pool: &Pool, batch: &[Queued]) -> Result<Vec<Result<u64, String>>, sqlx::Error> {
    if let [single] = batch {
        return Ok(vec![Ok(one(pool, &single.write).await?)]);
    }
    let mut tx = pool.begin().await?;
    let mut results = Vec::with_capacity(batch.len());
    for q in batch {
        results.push(Ok(query(&q.write).execute(&mut *tx).await?.rows_affected()));
    }
    tx.commit().await?;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pool(dir: &std::path::Path) -> (Pool, Arc<WriteGate>) {
        let pool = crate::db::open(dir, None).await.unwrap();
        sqlx::query("CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER NOT NULL)")
            .execute(&pool)
            .await
            .unwrap();
        for i in 0..40 {
            sqlx::query("INSERT INTO t (id, n) VALUES ($1, 0)")
                .bind(format!("r{i}"))
                .execute(&pool)
                .await
                .unwrap();
        }
        let gate = Arc::new(WriteGate::new(&pool));
        (pool, gate)
    }

    fn bump(id: &str) -> Write {
        Write {
            sql: "UPDATE t SET n = n + 1 WHERE id = $1 AND n = 0",
            args: vec![Arg::Text(id.to_string())],
        }
    }

    /// Many writes at once share transactions, yet each gets its own answer: of two claims of
    /// one row only one changes it, and every row is changed exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_each_get_their_own_answer() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, gate) = pool(dir.path()).await;
        let commits = Arc::new(Commits::start(&pool, gate.clone()));
        assert!(commits.queue.is_some(), "SQLite writes are grouped");
        let tasks: Vec<_> = (0..80)
            .map(|i| {
                let commits = commits.clone();
                tokio::spawn(async move {
                    let id = format!("r{}", i % 40);
                    (id.clone(), commits.execute(bump(&id)).await.unwrap())
                })
            })
            .collect();
        let mut changed = std::collections::BTreeMap::new();
        for t in tasks {
            let (id, rows) = t.await.unwrap();
            *changed.entry(id).or_insert(0) += rows;
        }
        assert_eq!(changed.len(), 40);
        assert!(changed.values().all(|&n| n == 1), "{changed:?}");
        let total: i64 = sqlx::query_scalar("SELECT SUM(n) FROM t")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(total, 40);
    }

    /// A write that fails fails alone: the writes committed with it in the same batch are
    /// written one by one instead, and each caller hears its own outcome.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_failing_write_does_not_fail_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, gate) = pool(dir.path()).await;
        let commits = Arc::new(Commits::start(&pool, gate.clone()));
        // Hold the gate so that every write below queues up and goes into one batch.
        let turn = gate.enter().await;
        let mut tasks = Vec::new();
        for i in 0..10 {
            let commits = commits.clone();
            let write = if i == 5 {
                Write {
                    sql: "UPDATE t SET missing_column = 1 WHERE id = $1",
                    args: vec![Arg::Text("r5".into())],
                }
            } else {
                bump(&format!("r{i}"))
            };
            tasks.push(tokio::spawn(async move { commits.execute(write).await }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        drop(turn);
        for (i, t) in tasks.into_iter().enumerate() {
            let r = t.await.unwrap();
            if i == 5 {
                let e = r.expect_err("the bad write fails");
                assert_eq!(e.status, axum::http::StatusCode::INTERNAL_SERVER_ERROR);
            } else {
                assert_eq!(r.unwrap(), 1, "write {i}");
            }
        }
        let total: i64 = sqlx::query_scalar("SELECT SUM(n) FROM t")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(total, 9);
    }
}
