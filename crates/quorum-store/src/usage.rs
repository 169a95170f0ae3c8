//! Durable per-token counters and revocation, keyed by `jti`. Every limit is enforced by one
//! conditional UPDATE, so requests racing each other (on any number of connections) can never
//! together go past a limit: the database decides which of them fits.

use sqlx::SqlitePool;

/// Who a token is: what pins its usage row.
#[derive(Debug, Clone)]
pub struct TokenId {
    pub jti: String,
    pub iss: String,
    pub tenant: String,
    pub build: String,
    pub exp: i64,
}

/// Why a call was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Revoked,
    CallsUsedUp {
        max: u64,
    },
    /// Another token (other issuer, tenant or build) already uses this `jti`.
    Foreign,
}

/// Counts one call of `token`, creating its row on first use, unless the token is revoked, has
/// used `max_calls` calls, or its `jti` belongs to another token. Refused calls change nothing.
pub async fn reserve_call(
    pool: &SqlitePool,
    token: &TokenId,
    max_calls: Option<u64>,
) -> Result<Result<(), Refused>, sqlx::Error> {
    let max = max_calls.map(clamp);
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::query(
        "INSERT INTO token_usage (jti, iss, tenant, build, exp) VALUES (?, ?, ?, ?, ?) \
         ON CONFLICT (jti) DO NOTHING",
    )
    .bind(&token.jti)
    .bind(&token.iss)
    .bind(&token.tenant)
    .bind(&token.build)
    .bind(token.exp)
    .execute(&mut *tx)
    .await?;
    let counted = sqlx::query(
        "UPDATE token_usage SET calls = calls + 1 \
         WHERE jti = ? AND iss = ? AND tenant = ? AND build = ? AND revoked = 0 \
         AND (? IS NULL OR calls < ?)",
    )
    .bind(&token.jti)
    .bind(&token.iss)
    .bind(&token.tenant)
    .bind(&token.build)
    .bind(max)
    .bind(max)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if counted == 1 {
        tx.commit().await?;
        return Ok(Ok(()));
    }
    let (iss, tenant, build, revoked): (String, String, String, bool) =
        sqlx::query_as("SELECT iss, tenant, build, revoked FROM token_usage WHERE jti = ?")
            .bind(&token.jti)
            .fetch_one(&mut *tx)
            .await?;
    tx.rollback().await?;
    Ok(Err(
        if iss != token.iss || tenant != token.tenant || build != token.build {
            Refused::Foreign
        } else if revoked {
            Refused::Revoked
        } else {
            Refused::CallsUsedUp {
                max: max_calls.unwrap_or_default(),
            }
        },
    ))
}

/// Counts one more file for `jti` if that keeps it within `max_files`.
pub async fn reserve_file(
    pool: &SqlitePool,
    jti: &str,
    max_files: Option<u64>,
) -> Result<bool, sqlx::Error> {
    let max = max_files.map(clamp);
    let n = sqlx::query(
        "UPDATE token_usage SET files = files + 1 WHERE jti = ? AND (? IS NULL OR files < ?)",
    )
    .bind(jti)
    .bind(max)
    .bind(max)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Adds `n` bytes to `jti`'s count if the total stays within `max_bytes`.
pub async fn reserve_bytes(
    pool: &SqlitePool,
    jti: &str,
    n: u64,
    max_bytes: u64,
) -> Result<bool, sqlx::Error> {
    let n = clamp(n);
    let done =
        sqlx::query("UPDATE token_usage SET bytes = bytes + ? WHERE jti = ? AND bytes + ? <= ?")
            .bind(n)
            .bind(jti)
            .bind(n)
            .bind(clamp(max_bytes))
            .execute(pool)
            .await?
            .rows_affected();
    Ok(done == 1)
}

/// Adjusts `jti`'s byte count by `delta` without any limit: returns an unused reservation
/// (negative) or records bytes of a token without `max_bytes` (positive).
pub async fn adjust_bytes(pool: &SqlitePool, jti: &str, delta: i64) -> Result<(), sqlx::Error> {
    if delta != 0 {
        sqlx::query("UPDATE token_usage SET bytes = MAX(bytes + ?, 0) WHERE jti = ?")
            .bind(delta)
            .bind(jti)
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Revokes `jtis` for `tenant` and `build`; returns the ones now revoked. A token this store has
/// not seen yet is revoked ahead of its first use (a row pinned to this issuer, tenant and build,
/// kept until `keep_until`), so a token leaked before it was ever used is dead too. Ids already
/// pinned to another tenant, build or issuer are left alone.
pub async fn revoke(
    pool: &SqlitePool,
    iss: &str,
    tenant: &str,
    build: &str,
    jtis: &[String],
    keep_until: i64,
) -> Result<Vec<String>, sqlx::Error> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let mut revoked = Vec::new();
    for jti in jtis {
        let seen = sqlx::query(
            "UPDATE token_usage SET revoked = 1 WHERE jti = ? AND iss = ? AND tenant = ? AND build = ?",
        )
        .bind(jti)
        .bind(iss)
        .bind(tenant)
        .bind(build)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let ahead = if seen == 1 {
            0
        } else {
            sqlx::query(
                "INSERT INTO token_usage (jti, iss, tenant, build, exp, revoked) VALUES (?, ?, ?, ?, ?, 1) \
                 ON CONFLICT (jti) DO NOTHING",
            )
            .bind(jti)
            .bind(iss)
            .bind(tenant)
            .bind(build)
            .bind(keep_until)
            .execute(&mut *tx)
            .await?
            .rows_affected()
        };
        if seen == 1 || ahead == 1 {
            revoked.push(jti.clone());
        }
    }
    tx.commit().await?;
    Ok(revoked)
}

/// Forgets tokens that expired before `before`: they are refused on `exp` alone.
pub async fn prune(pool: &SqlitePool, before: i64) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query("DELETE FROM token_usage WHERE exp < ?")
        .bind(before)
        .execute(pool)
        .await?
        .rows_affected())
}

/// Counters are SQLite integers (signed 64 bits); a limit beyond that is no limit.
fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
