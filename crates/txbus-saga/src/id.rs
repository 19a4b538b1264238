//! Saga ids.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The longest saga id, in bytes (the stream id `saga-<id>` must fit the store's limit).
pub const MAX_SAGA_ID_BYTES: usize = 128;

/// The id of one saga instance. Its state changes are the stream `saga-<id>`.
///
/// Generated ids are UUIDv7 strings (time-ordered, so listings come out oldest first); a
/// caller may choose its own (a business key such as an order id), which makes starting the
/// saga idempotent: a second start with the same id fails with [`Error::AlreadyStarted`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SagaId(String);

impl SagaId {
    /// A new time-ordered id.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    /// A caller-chosen id: 1 to [`MAX_SAGA_ID_BYTES`] bytes of ASCII letters, digits, `-`
    /// and `_`.
    pub fn new(id: impl Into<String>) -> Result<Self, Error> {
        let id = id.into();
        crate::definition::check_name("saga id", &id, MAX_SAGA_ID_BYTES)?;
        Ok(Self(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The stream that holds this saga's state changes.
    pub fn stream(&self) -> String {
        format!("saga-{}", self.0)
    }
}

impl fmt::Display for SagaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for SagaId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}
