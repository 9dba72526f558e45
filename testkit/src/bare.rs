//! A bare connection pool, as an application without pgfleet would have it: deadpool's
//! managed pool around `tokio_postgres::Config::connect`. Benchmarks and tests compare
//! pgfleet's leases against it (same pool library, same size).

use deadpool::managed::{Manager, Metrics, RecycleError, RecycleResult};

/// Connects with `tokio_postgres` (no TLS) and drops closed connections on recycle.
#[derive(Debug)]
pub struct BareManager(pub tokio_postgres::Config);

impl Manager for BareManager {
    type Type = tokio_postgres::Client;
    type Error = tokio_postgres::Error;

    async fn create(&self) -> Result<Self::Type, Self::Error> {
        let (client, conn) = self.0.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    async fn recycle(&self, c: &mut Self::Type, _: &Metrics) -> RecycleResult<Self::Error> {
        if c.is_closed() {
            return Err(RecycleError::message("closed"));
        }
        Ok(())
    }
}

/// A bare pool.
pub type BarePool = deadpool::managed::Pool<BareManager>;

/// A bare pool of at most `size` connections to `url` (connections open lazily).
///
/// # Errors
///
/// A message when the URL does not parse or the pool cannot be built.
pub fn bare_pool(url: &str, size: usize) -> Result<BarePool, String> {
    let config: tokio_postgres::Config = url.parse().map_err(|_| "bad URL".to_string())?;
    deadpool::managed::Pool::builder(BareManager(config))
        .max_size(size)
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .map_err(|e| e.to_string())
}
