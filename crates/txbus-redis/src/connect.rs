//! Connections to Redis.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;

use crate::error::Error;

/// Opens a multiplexed connection that waits up to `response_timeout` for each reply.
pub(crate) async fn open(
    client: &redis::Client,
    response_timeout: Duration,
) -> Result<MultiplexedConnection, Error> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(response_timeout));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(Error::redis("connecting"))
}

/// Parses a Redis URL (`redis://127.0.0.1:6379/0`).
pub(crate) fn client(url: &str) -> Result<redis::Client, Error> {
    redis::Client::open(url).map_err(Error::redis("parsing the URL"))
}
