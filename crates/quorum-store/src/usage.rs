//! Durable per-token counters and revocation, keyed by `jti`. Every limit is enforced by one
//! conditional UPDATE, so requests racing each other (on any number of connections) can never
//! together go past a limit: the database decides which of them fits.

use crate::db::Db;

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
    db: &Db,
    token: &TokenId,
    max_calls: Option<u64>,
) -> Result<Result<(), Refused>, sqlx::Error> {
    let max = max_calls.map(clamp);
    let mut tx = db.write().await?;
    sqlx::query(
        "INSERT INTO token_usage (jti, iss, tenant, build, exp) VALUES ($1, $2, $3, $4, $5) \
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
         WHERE jti = $1 AND iss = $2 AND tenant = $3 AND build = $4 AND revoked = 0 \
         AND ($5 IS NULL OR calls < $5)",
    )
    .bind(&token.jti)
    .bind(&token.iss)
    .bind(&token.tenant)
    .bind(&token.build)
    .bind(max)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if counted == 1 {
        tx.commit().await?;
        return Ok(Ok(()));
    }
    let (iss, tenant, build, revoked): (String, String, String, i64) =
        sqlx::query_as("SELECT iss, tenant, build, revoked FROM token_usage WHERE jti = $1")
            .bind(&token.jti)
            .fetch_one(&mut *tx)
            .await?;
    tx.rollback().await?;
    Ok(Err(
        if iss != token.iss || tenant != token.tenant || build != token.build {
            Refused::Foreign
        } else if revoked != 0 {
            Refused::Revoked
        } else {
            Refused::CallsUsedUp {
                max: max_calls.unwrap_or_default(),
            }
        },
    ))
}

/// Counts one more file for `jti` if that keeps it within `max_files`.
pub async fn reserve_file(db: &Db, jti: &str, max_files: Option<u64>) -> Result<bool, sqlx::Error> {
    let max = max_files.map(clamp);
    let n = sqlx::query(
        "UPDATE token_usage SET files = files + 1 WHERE jti = $1 AND ($2 IS NULL OR files < $2)",
    )
    .bind(jti)
    .bind(max)
    .execute(db.pool())
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Adds `n` bytes to `jti`'s count if the total stays within `max_bytes`.
pub async fn reserve_bytes(
    db: &Db,
    jti: &str,
    n: u64,
    max_bytes: u64,
) -> Result<bool, sqlx::Error> {
    let n = clamp(n);
    let done = sqlx::query(
        "UPDATE token_usage SET bytes = bytes + $1 WHERE jti = $2 AND bytes + $1 <= $3",
    )
    .bind(n)
    .bind(jti)
    .bind(clamp(max_bytes))
    .execute(db.pool())
    .await?
    .rows_affected();
    Ok(done == 1)
}

/// Counts a batch of `files` blobs and `bytes` bytes against the token in `limits`, inside the
/// transaction that keeps them, if both counters stay within their limits; otherwise refuses
/// the whole batch, naming the limit it would pass, and counts nothing.
pub async fn count_batch(
    tx: &mut crate::db::Tx,
    limits: &crate::auth::Limits,
    files: u64,
    bytes: u64,
) -> Result<(), crate::error::Error> {
    let counted = sqlx::query(
        "UPDATE token_usage SET files = files + $1, bytes = bytes + $2 WHERE jti = $3 \
         AND ($4 IS NULL OR files + $1 <= $4) AND ($5 IS NULL OR bytes + $2 <= $5)",
    )
    .bind(clamp(files))
    .bind(clamp(bytes))
    .bind(&limits.jti)
    .bind(limits.max_files.map(clamp))
    .bind(limits.max_bytes.map(clamp))
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if counted == 1 {
        return Ok(());
    }
    let (used_files, used_bytes) = counts(tx, &limits.jti).await?;
    Err(batch_over(limits, used_files, used_bytes, files, bytes))
}

/// The error for a batch of `files` and `bytes` that the token's counters cannot take.
pub fn batch_over(
    limits: &crate::auth::Limits,
    used_files: u64,
    used_bytes: u64,
    files: u64,
    bytes: u64,
) -> crate::error::Error {
    use axum::http::StatusCode;
    use quorum_service::ApiError;
    match (limits.max_files, limits.max_bytes) {
        (Some(max), _) if used_files.saturating_add(files) > max => ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "token has uploaded {used_files} of its max_files ({max}) files; a batch of {files} more goes over; nothing of the batch was stored"
            ),
        ),
        (_, Some(max)) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "token has uploaded {used_bytes} of its max_bytes ({max}) bytes; a batch of {bytes} more goes over; nothing of the batch was stored"
            ),
        ),
        _ => ApiError::internal("token counters refused a batch without limits"),
    }
    .into()
}

/// Files and bytes counted for `jti` so far.
pub async fn counts(conn: &mut sqlx::AnyConnection, jti: &str) -> Result<(u64, u64), sqlx::Error> {
    let (files, bytes): (i64, i64) =
        sqlx::query_as("SELECT files, bytes FROM token_usage WHERE jti = $1")
            .bind(jti)
            .fetch_one(conn)
            .await?;
    Ok((files.max(0) as u64, bytes.max(0) as u64))
}

/// Adjusts `jti`'s byte count by `delta` without any limit: returns an unused reservation
/// (negative) or records bytes of a token without `max_bytes` (positive).
pub async fn adjust_bytes(db: &Db, jti: &str, delta: i64) -> Result<(), sqlx::Error> {
    if delta != 0 {
        sqlx::query(
            "UPDATE token_usage SET bytes = CASE WHEN bytes + $1 < 0 THEN 0 ELSE bytes + $1 END \
             WHERE jti = $2",
        )
        .bind(delta)
        .bind(jti)
        .execute(db.pool())
        .await?;
    }
    Ok(())
}

/// Revokes `jtis` for `tenant` and `build`; returns the ones now revoked. A token this store has
/// not seen yet is revoked ahead of its first use (a row pinned to this issuer, tenant and build,
/// kept until `keep_until`), so a token leaked before it was ever used is dead too. Ids already
/// pinned to another tenant, build or issuer are left alone.
pub async fn revoke(
    db: &Db,
    iss: &str,
    tenant: &str,
    build: &str,
    jtis: &[String],
    keep_until: i64,
) -> Result<Vec<String>, sqlx::Error> {
    let mut tx = db.write().await?;
    let mut revoked = Vec::new();
    for jti in jtis {
        let seen = sqlx::query(
            "UPDATE token_usage SET revoked = 1 WHERE jti = $1 AND iss = $2 AND tenant = $3 AND build = $4",
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
                "INSERT INTO token_usage (jti, iss, tenant, build, exp, revoked) VALUES ($1, $2, $3, $4, $5, 1) \
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
pub async fn prune(db: &Db, before: i64) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query("DELETE FROM token_usage WHERE exp < $1")
        .bind(before)
        .execute(db.pool())
        .await?
        .rows_affected())
}

/// Counters are database integers (signed 64 bits); a limit beyond that is no limit.
fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
