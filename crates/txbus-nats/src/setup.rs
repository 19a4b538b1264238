//! Streams and consumers: created when missing, with settings a relay and an inbox need.

use std::time::Duration;

use async_nats::jetstream::{self, stream::StorageType};

use crate::error::Error;

/// A JetStream stream to create when missing (an existing stream is used as it is).
///
/// ```
/// use std::time::Duration;
/// use txbus_nats::StreamSpec;
/// let spec = StreamSpec::new("TXBUS", ["txbus.>"]).duplicate_window(Duration::from_secs(300));
/// assert_eq!(spec.name(), "TXBUS");
/// ```
#[derive(Debug, Clone)]
pub struct StreamSpec {
    name: String,
    subjects: Vec<String>,
    duplicate_window: Duration,
    max_age: Duration,
    max_messages: i64,
    memory: bool,
}

impl StreamSpec {
    /// A stream named `name` that takes `subjects` (wildcards allowed), stored on disk, with
    /// a two-minute deduplication window (messages with the same `Nats-Msg-Id` within it are
    /// stored once), keeping messages for seven days.
    pub fn new<I, S>(name: impl Into<String>, subjects: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            name: name.into(),
            subjects: subjects.into_iter().map(Into::into).collect(),
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_messages: -1,
            memory: false,
        }
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How long the server remembers message ids to drop repeated publishes (default 2 min).
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// How long messages are kept (default seven days).
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = age;
        self
    }

    /// The most messages kept; the oldest go first (default: no limit but the age).
    pub fn max_messages(mut self, max: i64) -> Self {
        self.max_messages = max;
        self
    }

    /// Keeps messages in memory instead of on disk (lost when the server restarts).
    pub fn in_memory(mut self, memory: bool) -> Self {
        self.memory = memory;
        self
    }

    /// Creates the stream if it does not exist, and returns it.
    pub async fn ensure(
        &self,
        js: &jetstream::Context,
    ) -> Result<jetstream::stream::Stream, Error> {
        js.get_or_create_stream(jetstream::stream::Config {
            name: self.name.clone(),
            subjects: self.subjects.clone(),
            duplicate_window: self.duplicate_window,
            max_age: self.max_age,
            max_messages: self.max_messages,
            storage: if self.memory {
                StorageType::Memory
            } else {
                StorageType::File
            },
            ..Default::default()
        })
        .await
        .map_err(|e| Error::nats(format!("creating stream {}", self.name), e))
    }
}

/// A durable pull consumer with explicit acknowledgements, created when missing.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub(crate) stream: String,
    pub(crate) durable: String,
    pub(crate) filter_subject: Option<String>,
    pub(crate) ack_wait: Duration,
    pub(crate) max_ack_pending: i64,
    pub(crate) batch: usize,
}

impl ConsumerSpec {
    /// The durable consumer `durable` of stream `stream`: every message of the stream,
    /// redelivered 30 s after a delivery that was not acknowledged.
    pub fn new(stream: impl Into<String>, durable: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            durable: durable.into(),
            filter_subject: None,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 1024,
            batch: 256,
        }
    }

    /// Takes only messages whose subject matches `subject` (wildcards allowed).
    pub fn filter_subject(mut self, subject: impl Into<String>) -> Self {
        self.filter_subject = Some(subject.into());
        self
    }

    /// How long the server waits for an acknowledgement before delivering again (default 30 s).
    pub fn ack_wait(mut self, wait: Duration) -> Self {
        self.ack_wait = wait;
        self
    }

    /// Deliveries not yet acknowledged, at most (default 1024): the server's back-pressure.
    pub fn max_ack_pending(mut self, max: i64) -> Self {
        self.max_ack_pending = max;
        self
    }

    /// Messages asked for per pull request (default 256).
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    pub(crate) fn config(&self) -> jetstream::consumer::pull::Config {
        jetstream::consumer::pull::Config {
            durable_name: Some(self.durable.clone()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_ack_pending: self.max_ack_pending,
            filter_subject: self.filter_subject.clone().unwrap_or_default(),
            ..Default::default()
        }
    }
}
