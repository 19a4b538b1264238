//! How a message becomes a table row.

use std::sync::Arc;

use serde_json::{Map, Value};
use txbus_core::{HandlerError, Message};

/// Turns a message into one row: a JSON object whose keys are the table's columns. An error
/// is what the delivery returns (a reject for a message that can never make a row).
pub type RowMapper =
    Arc<dyn Fn(&Message) -> Result<Map<String, Value>, HandlerError> + Send + Sync + 'static>;

/// The default row: `message_id`, `event_type`, `module` (empty when none), `occurred_at`
/// (seconds since the epoch, from the message id's UUIDv7 time) and `payload` (the JSON text),
/// the columns of [`default_table_ddl`].
pub fn default_row(message: &Message) -> Result<Map<String, Value>, HandlerError> {
    let mut row = Map::with_capacity(5);
    row.insert("message_id".into(), Value::String(message.id().to_string()));
    row.insert(
        "event_type".into(),
        Value::String(message.event_type().to_owned()),
    );
    row.insert(
        "module".into(),
        Value::String(message.module().unwrap_or_default().to_owned()),
    );
    row.insert("occurred_at".into(), Value::from(occurred_at_secs(message)));
    row.insert(
        "payload".into(),
        Value::String(message.stored().payload_json.clone()),
    );
    Ok(row)
}

/// When the event was created, in seconds since the epoch: the time in its UUIDv7 message id,
/// or 0 for a caller-chosen id that carries no time.
pub fn occurred_at_secs(message: &Message) -> u64 {
    message
        .id()
        .0
        .get_timestamp()
        .map(|t| t.to_unix().0)
        .unwrap_or(0)
}

/// The `CREATE TABLE IF NOT EXISTS` statement of a table for [`default_row`]: a
/// `ReplacingMergeTree` keyed on `message_id`, so that a row inserted twice (a redelivery)
/// counts once in queries that read it with `FINAL` (or group by `message_id`), and is
/// collapsed for good by background merges.
pub fn default_table_ddl(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (\
         message_id String, \
         event_type String, \
         module String, \
         occurred_at DateTime('UTC'), \
         payload String\
         ) ENGINE = ReplacingMergeTree() \
         PARTITION BY toYYYYMM(occurred_at) \
         ORDER BY message_id"
    )
}
