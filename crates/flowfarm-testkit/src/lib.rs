//! Test support: every test gets its own Postgres database ([`TestDb`]), so
//! tests run in parallel without seeing each other's rows, and an in-process
//! coordinator over it ([`Harness`]).
//!
//! The server comes from `FLOWFARM_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); `scripts/test.sh` makes
//! sure one is running.

mod harness;

use flowfarm_store::PgStore;
pub use harness::{test_config, Admin, Auth, Harness, Render, Worker};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

/// The admin URL tests create databases through.
pub fn server_url() -> String {
    std::env::var("FLOWFARM_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh, migrated database, dropped when this value is.
pub struct TestDb {
    pub name: String,
    /// URL of the new database.
    pub url: String,
    pub store: PgStore,
}

impl TestDb {
    /// Creates `ff_test_<random>` and applies the migrations.
    ///
    /// # Panics
    /// If Postgres cannot be reached: the message says how to start it.
    pub async fn new() -> TestDb {
        let server = server_url();
        let name = format!("ff_test_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&server)
            .await
            .unwrap_or_else(|e| panic!("cannot reach Postgres at {server} ({e}); run scripts/test.sh, or set FLOWFARM_TEST_DATABASE_URL"));
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("create test database");
        let url = match server.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("FLOWFARM_TEST_DATABASE_URL must end with a database name"),
        };
        let store = PgStore::connect(&url, 8).await.expect("connect to test database");
        store.migrate().await.expect("migrate test database");
        TestDb { name, url, store }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs outside async; use a private runtime on a plain thread.
        let name = self.name.clone();
        let server = server_url();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async {
                    if let Ok(mut admin) = PgConnection::connect(&server).await {
                        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut admin).await;
                    }
                });
            }
        })
        .join();
    }
}
