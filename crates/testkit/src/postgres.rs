//! PostgreSQL for tests: the lab's server ([`steadfast_lab::Postgres`]:
//! its own cluster on a free loopback port, never the machine's), with a
//! test's manners: one that will not start fails the test with its log.

use std::ops::{Deref, DerefMut};

pub use steadfast_lab::have_postgres;

/// A PostgreSQL server of the test's own; killed when dropped.
pub struct Postgres(steadfast_lab::Postgres);

impl Postgres {
    /// A fresh cluster, started and accepting connections. Panics when it
    /// does not start (CI: a test that needs it fails, never skips).
    pub async fn start() -> Postgres {
        Postgres(steadfast_lab::Postgres::start().await.unwrap_or_else(|e| panic!("{e}")))
    }

    /// A fresh cluster that takes TCP clients over TLS only
    /// ([`steadfast_lab::Postgres::start_tls`]).
    pub async fn start_tls(
        cert: &std::path::Path,
        key: &std::path::Path,
        client_ca: Option<&std::path::Path>,
    ) -> Postgres {
        Postgres(steadfast_lab::Postgres::start_tls(cert, key, client_ca).await.unwrap_or_else(|e| panic!("{e}")))
    }

    /// Starts the server again after [`steadfast_lab::Postgres::kill9`].
    pub async fn spawn(&mut self) {
        self.0.spawn().await.unwrap_or_else(|e| panic!("{e}"));
    }

    /// A client for the test's own queries (its connection runs on a
    /// task of the test's runtime).
    pub async fn connect(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to the test's PostgreSQL at {}: {e}", self.url()));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }
}

impl Deref for Postgres {
    type Target = steadfast_lab::Postgres;

    fn deref(&self) -> &steadfast_lab::Postgres {
        &self.0
    }
}

impl DerefMut for Postgres {
    fn deref_mut(&mut self) -> &mut steadfast_lab::Postgres {
        &mut self.0
    }
}
