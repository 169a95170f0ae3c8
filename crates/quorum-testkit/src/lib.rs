//! Support for the integration tests of several crates (a dev-dependency only): a database of
//! the test's own on the PostgreSQL server that `.ci/services.sh` starts and names in
//! `QUORUM_TEST_POSTGRES_URL`.

use sqlx::{Connection as _, Executor as _};

/// The variable naming the test PostgreSQL server (a superuser URL on loopback).
pub const POSTGRES_URL_VAR: &str = "QUORUM_TEST_POSTGRES_URL";

/// The test PostgreSQL server's URL. A test that needs the server fails without it rather than
/// passing without having run.
pub fn postgres_admin_url() -> String {
    std::env::var(POSTGRES_URL_VAR).unwrap_or_else(|_| {
        panic!(
            "{POSTGRES_URL_VAR} is not set: run `source .ci/services.sh` first to start the \
             PostgreSQL server these tests need"
        )
    })
}

/// A fresh, empty database on the test server, dropped (connections and all) with this value.
#[derive(Debug)]
pub struct PgDatabase {
    /// The URL naming this database, with the server's credentials and options.
    pub url: String,
    admin: String,
    name: String,
}

impl PgDatabase {
    /// Creates the database `<prefix>_<random hex>`.
    pub async fn create(prefix: &str) -> PgDatabase {
        let admin = postgres_admin_url();
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("cannot reach {POSTGRES_URL_VAR}: {e}"));
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
        conn.close().await.ok();
        PgDatabase {
            url: with_database(&admin, &name),
            admin,
            name,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop may run inside the test's runtime, which cannot be blocked on: a thread and a
        // runtime of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                    let _ = conn
                        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                        .await;
                }
            });
        })
        .join();
    }
}

/// `admin` (a PostgreSQL URL) naming the database `name` instead of its own, options kept.
fn with_database(admin: &str, name: &str) -> String {
    let (base, query) = match admin.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (admin, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut url = format!("{}/{name}", &base[..host_end]);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    url
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn the_database_is_replaced_and_options_kept() {
        assert_eq!(
            with_database(
                "postgres://u:p@127.0.0.1:5432/postgres?sslmode=disable",
                "t_1"
            ),
            "postgres://u:p@127.0.0.1:5432/t_1?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://u@localhost:1", "t_2"),
            "postgres://u@localhost:1/t_2"
        );
    }
}
