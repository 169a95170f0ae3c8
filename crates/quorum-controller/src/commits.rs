//! Grouped writes for the dispatch path: the claims and reports that arrive while one group is
//! being written go into the next together, each kind as one multi-row `UPDATE ... FROM
//! (VALUES ...) ... RETURNING id`. One statement for many workers' writes instead of one each
//! saves a round trip to the database per write (on SQLite, to the connection's thread) and a
//! commit per write, which on SQLite also makes the pool's other connections drop their page
//! caches. Each write still gets its own answer, whether its row changed (its id is among those
//! returned), only once its statement is committed; an assignment named twice in one group
//! waits for the next statement, and if a statement fails, its writes are retried one by one,
//! so one bad write never fails another's.

use std::collections::HashSet;
use std::sync::Arc;

use quorum_service::ApiError;
use sqlx::Row as _;
use tokio::sync::{mpsc, oneshot};

use crate::db::{Pool, WriteGate};

/// Most writes in one group.
const MOST: usize = 64;

/// One value bound to a write's statement.
pub(crate) enum Arg {
    Text(String),
    OptText(Option<String>),
    Int(i64),
}

/// A kind of write: `UPDATE {table} SET {set} FROM (VALUES ...) AS v WHERE {table}.id =
/// v.column1 AND {filter}`, where `set` and `filter` name a write's values as `v.column2`,
/// `v.column3`, ... in the order of its `args`.
pub(crate) struct Kind {
    pub table: &'static str,
    pub set: &'static str,
    pub filter: &'static str,
}

/// One row's write: the kind, the row's id and its values.
pub(crate) struct Write {
    pub kind: &'static Kind,
    pub id: String,
    pub args: Vec<Arg>,
}

struct Queued {
    write: Write,
    done: oneshot::Sender<Result<bool, String>>,
}

/// Where handlers hand their writes (`State::commits`).
pub(crate) struct Commits {
    queue: mpsc::UnboundedSender<Queued>,
}

impl Commits {
    /// Starts the committer for `pool`; it ends when this is dropped.
    pub fn start(pool: &Pool, gate: Arc<WriteGate>) -> Commits {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(committer(pool.clone(), gate, rx));
        Commits { queue }
    }

    /// Runs `write` (in a statement shared with others of its kind) and returns whether its
    /// row changed.
    pub async fn execute(&self, write: Write) -> Result<bool, ApiError> {
        let (done, answer) = oneshot::channel();
        self.queue
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
        let mut pending = vec![first];
        while pending.len() < MOST {
            match rx.try_recv() {
                Ok(q) => pending.push(q),
                Err(_) => break,
            }
        }
        while !pending.is_empty() {
            // One statement per kind, each row at most once in it; the rest go next round.
            let kind = pending[0].write.kind;
            let mut ids = HashSet::new();
            let (now, later): (Vec<Queued>, Vec<Queued>) = pending
                .into_iter()
                .partition(|q| std::ptr::eq(q.write.kind, kind) && ids.insert(q.write.id.clone()));
            pending = later;
            let writes: Vec<&Write> = now.iter().map(|q| &q.write).collect();
            let results = match together(&pool, kind, &writes).await {
                Ok(changed) => writes.iter().map(|w| Ok(changed.contains(&w.id))).collect(),
                Err(e) => {
                    if now.len() > 1 {
                        tracing::warn!(error = %e, writes = now.len(), "a grouped write failed; writing one by one");
                    }
                    let mut results = Vec::with_capacity(now.len());
                    for w in &writes {
                        let r = together(&pool, kind, &[w]).await;
                        results.push(
                            r.map(|changed| changed.contains(&w.id))
                                .map_err(|e| e.to_string()),
                        );
                    }
                    results
                }
            };
            for (q, r) in now.into_iter().zip(results) {
                let _ = q.done.send(r);
            }
        }
        drop(turn);
    }
}

/// `writes`, all of `kind`, in one statement; the ids of the rows it changed.
async fn together(
    pool: &Pool,
    kind: &Kind,
    writes: &[&Write],
) -> Result<HashSet<String>, sqlx::Error> {
    // Written for a power of two of rows, the last repeated: one statement text per size.
    let writes: Vec<&Write> = crate::db::padded(writes).collect();
    let sql = statement(pool, kind, writes.len(), 1 + writes[0].args.len());
    let mut q = sqlx::query(&sql);
    for w in &writes {
        q = q.bind(w.id.as_str());
        for arg in &w.args {
            q = match arg {
                Arg::Text(v) => q.bind(v.as_str()),
                Arg::OptText(v) => q.bind(v.as_deref()),
                Arg::Int(v) => q.bind(*v),
            };
        }
    }
    Ok(q.fetch_all(pool)
        .await?
        .iter()
        .map(|r| r.get::<String, _>(0))
        .collect())
}

/// The statement for `rows` writes of `kind`, each `width` values (the id first).
pub(crate) fn statement(pool: &Pool, kind: &Kind, rows: usize, width: usize) -> String {
    let rows = crate::db::value_rows(rows, 1, width, |p| {
        format!("({})", crate::db::placeholders(p, width))
    });
    let Kind { table, set, filter } = kind;
    // The filter is joined to `v` (`v.column1`, the id, is never NULL) so that the planner
    // cannot take it for a restriction of the table alone. As one, `state = 'offered'` was
    // estimated from statistics gathered when few rows were offered, at one row, and
    // PostgreSQL then compared every offered row with every value row (64,000 comparisons for
    // 64 writes with a thousand offers) instead of looking each id up in the primary key.
    crate::db::for_pool(
        pool,
        format!(
            "UPDATE {table} SET {set} FROM (VALUES {rows}) AS v \
             WHERE {table}.id = v.column1 AND ({filter} OR v.column1 IS NULL) RETURNING {table}.id"
        ),
    )
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

    /// Sets a row's `n` from 0 to 1.
    const BUMP: Kind = Kind {
        table: "t",
        set: "n = t.n + 1",
        filter: "t.n = 0",
    };

    fn bump(id: &str) -> Write {
        Write {
            kind: &BUMP,
            id: id.to_string(),
            args: vec![],
        }
    }

    /// Many writes at once share transactions, yet each gets its own answer: of two claims of
    /// one row only one changes it, and every row is changed exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_each_get_their_own_answer() {
        let dir = tempfile::tempdir().unwrap();
        let (pool, gate) = pool(dir.path()).await;
        let commits = Arc::new(Commits::start(&pool, gate.clone()));
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
            let (id, done) = t.await.unwrap();
            *changed.entry(id).or_insert(0) += u32::from(done);
        }
        assert_eq!(changed.len(), 40);
        assert!(changed.values().all(|&n| n == 1), "{changed:?}");
        let total: i64 = sqlx::query_scalar("SELECT SUM(n) FROM t")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(total, 40);
    }

    /// Sets a row's `n` to the write's value.
    const SET: Kind = Kind {
        table: "t",
        set: "n = v.column2",
        filter: "1 = 1",
    };

    /// A write that fails fails alone: the writes grouped with it in one statement are written
    /// one by one instead, and each caller hears its own outcome.
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
            // `n` is NOT NULL: the fifth write's NULL fails the statement of all ten.
            let write = Write {
                kind: &SET,
                id: format!("r{i}"),
                args: vec![Arg::OptText((i != 5).then(|| "1".to_string()))],
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
                assert!(r.unwrap(), "write {i}");
            }
        }
        let total: i64 = sqlx::query_scalar("SELECT SUM(n) FROM t")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(total, 9);
    }
}
