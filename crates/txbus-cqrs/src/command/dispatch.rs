//! A command on its way through the middleware to its handler, and the reply on its way back.
//!
//! Middleware sees commands without knowing their types: their name, id, idempotency key,
//! serialized form and validation, and replies as serialized JSON.

use std::any::Any;

use serde::Serialize;
use uuid::Uuid;

use super::Command;

/// What middleware can ask of any command.
pub(crate) trait AnyCommand: Send + Sync {
    fn as_any(&self) -> &dyn Any;
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
    fn to_json(&self) -> serde_json::Result<Vec<u8>>;
    fn validate(&self) -> Result<(), String>;
}

impl<C: Command> AnyCommand for C {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }

    fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(self)
    }

    fn validate(&self) -> Result<(), String> {
        Command::validate(self)
    }
}

/// A command in flight, its type erased.
pub struct Dispatch {
    pub(crate) id: Uuid,
    pub(crate) name: &'static str,
    pub(crate) key: Option<String>,
    pub(crate) command: Box<dyn AnyCommand>,
}

impl std::fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatch")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Dispatch {
    /// The command's id: a UUIDv7 given when it was sent.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The command's name ([`Command::NAME`]).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The idempotency key it carries, if any.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The command serialized as JSON.
    pub fn to_json(&self) -> Result<Vec<u8>, super::Error> {
        self.command
            .to_json()
            .map_err(|source| super::Error::Codec {
                name: self.name,
                source,
            })
    }

    /// Runs the command's own checks ([`Command::validate`]).
    pub fn validate(&self) -> Result<(), String> {
        self.command.validate()
    }

    /// The command, if it is a `C`.
    pub fn downcast_ref<C: Command>(&self) -> Option<&C> {
        self.command.as_any().downcast_ref()
    }
}

/// What middleware can ask of any output.
pub(crate) trait AnyOutput: Send {
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
    fn to_json(&self) -> serde_json::Result<Vec<u8>>;
}

impl<T: Serialize + Send + 'static> AnyOutput for T {
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }

    fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(self)
    }
}

/// A command's reply: the output its handler returned, or one stored by an earlier run and
/// replayed as JSON.
pub struct Reply(pub(crate) ReplyInner);

pub(crate) enum ReplyInner {
    Output(Box<dyn AnyOutput>),
    Stored(Vec<u8>),
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            ReplyInner::Output(_) => f.write_str("Reply::Output"),
            ReplyInner::Stored(json) => f
                .debug_tuple("Reply::Stored")
                .field(&String::from_utf8_lossy(json))
                .finish(),
        }
    }
}

impl Reply {
    /// A reply from stored JSON (a replay): the sender reads it back as the command's output.
    pub fn stored(json: Vec<u8>) -> Self {
        Self(ReplyInner::Stored(json))
    }

    /// True when the reply was replayed from a stored run rather than produced now.
    pub fn is_replay(&self) -> bool {
        matches!(self.0, ReplyInner::Stored(_))
    }

    /// The output as JSON.
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        match &self.0 {
            ReplyInner::Output(output) => output.to_json(),
            ReplyInner::Stored(json) => Ok(json.clone()),
        }
    }
}
