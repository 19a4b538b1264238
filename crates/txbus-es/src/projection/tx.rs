//! The writes a read model stages for one page of the log, committed with its checkpoint.

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;
use serde::Serialize;
use txbus_core::{Bus, KvWrite};

use crate::error::{BoxError, Error};

/// What a [`ReadModel`](super::ReadModel) reads and writes while projecting one page.
///
/// Reads see the page's staged writes first, then the store (and are cached for the page).
/// Writes must stay under the read model's prefix. Nothing is written until the runner
/// commits the page: its writes and the new checkpoint, atomically.
pub struct ReadModelTx<'a> {
    bus: &'a Bus,
    projection: &'a str,
    prefix: &'a str,
    /// Known values: read from the store or staged (`None`: absent or deleted).
    values: BTreeMap<String, Option<Vec<u8>>>,
    /// Keys written in this page.
    dirty: BTreeSet<String>,
}

impl std::fmt::Debug for ReadModelTx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadModelTx")
            .field("projection", &self.projection)
            .field("prefix", &self.prefix)
            .field("staged", &self.dirty.len())
            .finish()
    }
}

impl<'a> ReadModelTx<'a> {
    pub(crate) fn new(bus: &'a Bus, projection: &'a str, prefix: &'a str) -> Self {
        Self {
            bus,
            projection,
            prefix,
            values: BTreeMap::new(),
            dirty: BTreeSet::new(),
        }
    }

    /// The read model's prefix.
    pub fn prefix(&self) -> &str {
        self.prefix
    }

    /// The projection's name.
    pub fn projection(&self) -> &str {
        self.projection
    }

    /// Reads a key (any key: other read models too), as staged in this page or as stored.
    pub async fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        if let Some(v) = self.values.get(key) {
            return Ok(v.clone());
        }
        let value = self.bus.kv_get(key).await?.map(|e| e.value);
        self.values.insert(key.to_owned(), value.clone());
        Ok(value)
    }

    /// Reads a key holding JSON.
    pub async fn get_json<T: DeserializeOwned>(
        &mut self,
        key: &str,
    ) -> Result<Option<T>, BoxError> {
        match self.get(key).await? {
            None => Ok(None),
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(|e| {
                format!("read model key {key:?} does not hold the expected JSON: {e}")
            })?)),
        }
    }

    fn check(&self, key: &str) -> Result<(), Error> {
        if key.starts_with(self.prefix) {
            Ok(())
        } else {
            Err(Error::OutsidePrefix {
                projection: self.projection.to_owned(),
                key: key.to_owned(),
                prefix: self.prefix.to_owned(),
            })
        }
    }

    /// Stages a write of `value` to `key` (under the prefix).
    pub fn put(&mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Result<(), Error> {
        let key = key.into();
        self.check(&key)?;
        self.dirty.insert(key.clone());
        self.values.insert(key, Some(value.into()));
        Ok(())
    }

    /// Stages a write of `value` as JSON.
    pub fn put_json<T: Serialize + ?Sized>(
        &mut self,
        key: impl Into<String>,
        value: &T,
    ) -> Result<(), Error> {
        let key = key.into();
        let bytes = serde_json::to_vec(value).map_err(|e| Error::Encode {
            what: format!("read model key {key:?}"),
            reason: e.to_string(),
        })?;
        self.put(key, bytes)
    }

    /// Stages the deletion of `key` (under the prefix).
    pub fn delete(&mut self, key: impl Into<String>) -> Result<(), Error> {
        let key = key.into();
        self.check(&key)?;
        self.dirty.insert(key.clone());
        self.values.insert(key, None);
        Ok(())
    }

    /// How many keys this page writes so far.
    pub fn staged(&self) -> usize {
        self.dirty.len()
    }

    /// The staged writes, one per key.
    pub(crate) fn into_writes(mut self) -> Vec<KvWrite> {
        self.dirty
            .into_iter()
            .map(|key| match self.values.remove(&key).flatten() {
                Some(value) => KvWrite::put(key, value),
                None => KvWrite::delete(key),
            })
            .collect()
    }
}
