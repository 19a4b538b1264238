//! A relay's checkpoint: the last log position whose messages the broker confirmed, kept in
//! the store's key–value space and advanced with compare-and-set.

use txbus_core::{Bus, Conflict, KvExpect, KvWrite};

use crate::error::Error;

/// The key–value key that holds the checkpoint of the relay named `name`.
pub fn checkpoint_key(name: &str) -> String {
    format!("relay/{name}/checkpoint")
}

/// Reads the checkpoint of the relay named `name`: the log position up to which every
/// message was confirmed by the broker (0 when the relay never confirmed anything).
pub async fn read_checkpoint(bus: &Bus, name: &str) -> Result<u64, Error> {
    Ok(Checkpoint::load(bus, name).await?.position)
}

/// The checkpoint as last read or written, with the version its next write must expect.
#[derive(Debug, Clone)]
pub(crate) struct Checkpoint {
    pub(crate) key: String,
    pub(crate) position: u64,
    /// `None` when the key does not exist yet.
    pub(crate) version: Option<u64>,
}

impl Checkpoint {
    pub(crate) async fn load(bus: &Bus, name: &str) -> Result<Self, Error> {
        let key = checkpoint_key(name);
        Ok(match bus.kv_get(&key).await? {
            None => Self {
                key,
                position: 0,
                version: None,
            },
            Some(entry) => {
                let text = String::from_utf8_lossy(&entry.value).into_owned();
                let position =
                    text.trim()
                        .parse::<u64>()
                        .map_err(|_| Error::CorruptCheckpoint {
                            key: key.clone(),
                            value: text.clone(),
                        })?;
                Self {
                    key,
                    position,
                    version: Some(entry.version),
                }
            }
        })
    }

    /// The write that moves the checkpoint to `position`, valid only if nobody else moved it
    /// since it was read.
    pub(crate) fn advance(&self, position: u64) -> KvWrite {
        KvWrite::put(self.key.clone(), position.to_string().into_bytes()).expect(
            match self.version {
                Some(v) => KvExpect::Version(v),
                None => KvExpect::Absent,
            },
        )
    }
}

/// True when `error` says the checkpoint moved under us: another relay with the same name.
pub(crate) fn is_conflict(error: &txbus_core::Error, key: &str) -> bool {
    matches!(error, txbus_core::Error::Conflict(Conflict::Key { key: k, .. }) if k == key)
}
