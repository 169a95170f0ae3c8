//! Build logs and their redaction (issue 6: "Live logs ... secrets redacted"), through the real
//! HTTP boundary on both database backends. The worker here is an adversary speaking the real
//! protocol: it ships the tokens the controller gave it, whole and split across chunks, and the
//! controller must redact them anyway, in the live log and the stored one.

use crate::bounded;
use crate::support::{Backend, SimWorker, Stack};
use quorum_api::v1::controller::{Assignment, Usage};

on_both_backends!(
    tokens_a_worker_ships_are_redacted_in_the_live_and_the_stored_log,
    a_secret_split_across_chunks_is_redacted_and_offsets_resume,
);

const ONE_JOB: &str = "jobs:\n  build:\n    script: [\"true\"]\n    artifacts: [out.txt]\n";
const OPERATOR_SECRET: &str = "operator-listed-password";
/// Shaped like a JWT, minted by nobody.
const FOREIGN_JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJtZSJ9.c2lnbmF0dXJlLWJ5dGVz";

async fn stack(backend: Backend) -> Stack {
    Stack::start_with(
        backend,
        30,
        quorum_controller::ProjectConfig {
            public: false,
            redact: vec![OPERATOR_SECRET.into()],
            ..Default::default()
        },
    )
    .await
}

/// Sends `chunks` as consecutive log appends, returning the bytes sent.
async fn ship(w: &SimWorker, a: &Assignment, from: u64, chunks: &[&[u8]]) -> u64 {
    let mut offset = from;
    for c in chunks {
        w.client.log(&a.id, offset, c.to_vec()).await.unwrap();
        offset += c.len() as u64;
    }
    offset
}

fn assert_clean(log: &[u8], a: &Assignment) {
    let text = String::from_utf8_lossy(log);
    for (what, secret) in [
        ("the upload token", a.upload_token.as_str()),
        ("the job token", a.job_token.as_str()),
        ("the operator's secret", OPERATOR_SECRET),
        ("a JWT", FOREIGN_JWT),
    ] {
        assert!(!text.contains(secret), "{what} is in the log: {text}");
    }
    // Nor any sizeable piece of a token (its signature part is the secret bit).
    let sig = a.upload_token.rsplit('.').next().unwrap();
    assert!(
        !text.contains(&sig[..16]),
        "part of the upload token: {text}"
    );
}

async fn tokens_a_worker_ships_are_redacted_in_the_live_and_the_stored_log(backend: Backend) {
    let stack = stack(backend).await;
    let a = stack.worker("a1", "alice", false).await;
    stack.worker("b1", "bob", false).await;
    stack.submit(ONE_JOB).await;
    let ta = a.take().await;
    let line = format!(
        "curl -H 'Authorization: Bearer {}' store\njob={} pw={OPERATOR_SECRET} other={FOREIGN_JWT}\ndone\n",
        ta.upload_token, ta.job_token
    );
    let sent = ship(&a, &ta, 0, &[line.as_bytes()]).await;

    // Live: the assignment still runs.
    let (live, complete) = stack.user().log(&ta.id, 0).await.unwrap();
    assert!(!complete, "the assignment still runs");
    assert_clean(&live, &ta);
    assert_eq!(
        String::from_utf8(live.clone()).unwrap(),
        "curl -H 'Authorization: Bearer [redacted]' store\njob=[redacted] pw=[redacted] other=[redacted]\ndone\n"
    );

    // A token's signature alone, and glued to what precedes it, so that its shape is no
    // JWT's: the signature is what the controller kept, and it goes wherever it appears.
    let sig = |t: &str| t.rsplit('.').next().unwrap().to_string();
    let line = format!("sig={}\nglued=x{}\n", sig(&ta.job_token), ta.upload_token);
    ship(&a, &ta, sent, &[line.as_bytes()]).await;
    let (live, _) = stack.user().log(&ta.id, 0).await.unwrap();
    assert_clean(&live, &ta);
    let (claims, _) = ta.upload_token.rsplit_once('.').unwrap();
    let text = String::from_utf8(live.clone()).unwrap();
    assert!(
        text.ends_with(&format!("\nsig=[redacted]\nglued=x{claims}.[redacted]\n")),
        "{text}"
    );

    // Stored: after the worker reported, the same.
    a.succeed(&ta, b"x", Usage::default()).await;
    let (stored, complete) = stack.user().log(&ta.id, 0).await.unwrap();
    assert!(complete, "the assignment has ended");
    assert_eq!(stored, live);

    // The database keeps no token a reader of it could present: the signatures only.
    let kept: Vec<String> = serde_json::from_str(&log_secrets(&stack, &ta.id).await).unwrap();
    assert_eq!(kept, [sig(&ta.job_token), sig(&ta.upload_token)]);
    stack.stop().await;
}

async fn a_secret_split_across_chunks_is_redacted_and_offsets_resume(backend: Backend) {
    let stack = stack(backend).await;
    let a = stack.worker("a1", "alice", false).await;
    stack.worker("b1", "bob", false).await;
    stack.submit(ONE_JOB).await;
    let ta = a.take().await;
    let token = ta.upload_token.as_bytes();
    let cut = token.len() / 2;

    // The token split in two chunks: the first half is held back, not shown.
    let sent = ship(&a, &ta, 0, &[b"first line\ntoken=", &token[..cut]]).await;
    let (first, _) = stack.user().log(&ta.id, 0).await.unwrap();
    assert_eq!(first, b"first line\ntoken=");
    let sent = ship(&a, &ta, sent, &[&token[cut..], b" after\n"]).await;
    // A reader following the log resumes at the offset of what it has seen.
    let (rest, _) = stack.user().log(&ta.id, first.len() as u64).await.unwrap();
    assert_eq!(rest, b"[redacted] after\n");

    // A resend of a received range is harmless even though it was redacted; a gap is refused.
    a.client
        .log(&ta.id, 0, b"first line\ntoken=".to_vec())
        .await
        .unwrap();
    let gap = a
        .client
        .log(&ta.id, sent + 10, b"lost".to_vec())
        .await
        .unwrap_err();
    assert!(gap.to_string().contains("does not follow"), "{gap}");

    // A secret split across several small chunks, and the log ending in the start of one.
    let jwt = FOREIGN_JWT.as_bytes();
    let pieces: Vec<&[u8]> = jwt.chunks(7).collect();
    let mut sent = ship(&a, &ta, sent, &[b"jwt: "]).await;
    sent = ship(&a, &ta, sent, &pieces).await;
    // The log ends inside the token's signature.
    ship(&a, &ta, sent, &[b"\nlast: ", &token[..token.len() - 20]]).await;
    a.succeed(&ta, b"x", Usage::default()).await;

    let (all, complete) = stack.user().log(&ta.id, 0).await.unwrap();
    assert!(complete);
    assert_clean(&all, &ta);
    assert_eq!(
        String::from_utf8(all.clone()).unwrap(),
        "first line\ntoken=[redacted] after\njwt: [redacted]\nlast: [redacted]"
    );
    // Every suffix read by offset is the same bytes as the whole log's suffix.
    for offset in [0, 5, first.len(), all.len() - 3, all.len()] {
        let (tail, _) = stack.user().log(&ta.id, offset as u64).await.unwrap();
        assert_eq!(tail, &all[offset..], "read from {offset}");
    }
    stack.stop().await;
}

/// The assignment's `log_secrets` column, read from the controller's database.
async fn log_secrets(stack: &Stack, assignment: &str) -> String {
    let pool = stack.database().await;
    let kept = sqlx::query_scalar("SELECT log_secrets FROM assignments WHERE id = $1")
        .bind(assignment)
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    kept
}
