//! One AMQP connection and channel, made on demand and made again after a failure.

use lapin::{Channel, Connection, ConnectionProperties};

use crate::error::Error;

/// A connection with its one channel.
pub(crate) struct Link {
    pub(crate) connection: Connection,
    pub(crate) channel: Channel,
}

impl Link {
    /// Connects to `uri` and opens a channel.
    pub(crate) async fn open(uri: &str, name: &str) -> Result<Self, Error> {
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let connection = Connection::connect(uri, properties)
            .await
            .map_err(Error::amqp("connecting"))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(Error::amqp("opening a channel"))?;
        Ok(Self {
            connection,
            channel,
        })
    }

    /// True while both the connection and the channel work.
    pub(crate) fn is_usable(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    /// Closes politely, ignoring failures (the link is being replaced or dropped).
    pub(crate) async fn close(self) {
        let _ = self.connection.close(200, "closing".into()).await;
    }
}
