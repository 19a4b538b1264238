//! A projection's checkpoint in the key–value space: the position of the last commit it
//! finished, and whether a rebuild is clearing its read model.

use serde::{Deserialize, Serialize};
use txbus_core::{Bus, KvExpect, KvWrite};

use crate::error::Error;

/// The prefix of every checkpoint key.
pub const CHECKPOINT_PREFIX: &str = "projection/";

/// The key of projection `name`'s checkpoint.
pub fn checkpoint_key(name: &str) -> String {
    format!("{CHECKPOINT_PREFIX}{name}/checkpoint")
}

/// The stored form.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Record {
    position: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    clearing: bool,
}

/// A checkpoint as read, with the key's version for the next compare-and-set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    /// The last commit finished (0: none).
    pub position: u64,
    /// A rebuild reset the position and has not finished clearing the read model.
    pub clearing: bool,
    /// The key's version (`None`: never written).
    pub kv_version: Option<u64>,
}

impl Checkpoint {
    /// Reads projection `name`'s checkpoint.
    pub async fn load(bus: &Bus, name: &str) -> Result<Self, Error> {
        let key = checkpoint_key(name);
        let Some(entry) = bus.kv_get(&key).await? else {
            return Ok(Self::default());
        };
        let record: Record = serde_json::from_slice(&entry.value).map_err(|e| Error::Corrupt {
            key,
            reason: e.to_string(),
        })?;
        Ok(Self {
            position: record.position,
            clearing: record.clearing,
            kv_version: Some(entry.version),
        })
    }

    /// The write that moves this checkpoint to `position` (and `clearing`), if nobody else
    /// moved it since it was read.
    pub fn advance(&self, name: &str, position: u64, clearing: bool) -> Result<KvWrite, Error> {
        let value =
            serde_json::to_vec(&Record { position, clearing }).map_err(|e| Error::Encode {
                what: format!("projection {name:?}'s checkpoint"),
                reason: e.to_string(),
            })?;
        let expect = self.kv_version.map_or(KvExpect::Absent, KvExpect::Version);
        Ok(KvWrite::put(checkpoint_key(name), value).expect(expect))
    }
}

/// Reads projection `name`'s checkpoint without running it: the position of the last commit
/// it finished (0: none, or a rebuild started).
pub async fn read_checkpoint(bus: &Bus, name: &str) -> Result<u64, Error> {
    Ok(Checkpoint::load(bus, name).await?.position)
}
