//! UUIDs as PostgreSQL's `uuid` type.
//!
//! sqlx's own `uuid` feature cannot be enabled in this workspace: through its weak
//! `sqlx-sqlite?/uuid` feature, Cargo's resolver pulls `libsqlite3-sys` into the lock file, and
//! that clashes with the one `rusqlite` links. This wrapper does the same encoding: 16 raw bytes
//! in binary format.

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::types::Oid;
use sqlx::postgres::{
    PgArgumentBuffer, PgHasArrayType, PgTypeInfo, PgValueFormat, PgValueRef, Postgres,
};
use sqlx::{Decode, Encode, Type};
use uuid::Uuid;

/// The built-in OIDs of `uuid` and `uuid[]`.
const UUID: Oid = Oid(2950);
const UUID_ARRAY: Oid = Oid(2951);

/// A UUID bound to or read from a `uuid` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct PgUuid(pub(crate) Uuid);

impl Type<Postgres> for PgUuid {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(UUID)
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        ty.oid() == Some(UUID)
    }
}

impl PgHasArrayType for PgUuid {
    fn array_type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(UUID_ARRAY)
    }

    fn array_compatible(ty: &PgTypeInfo) -> bool {
        ty.oid() == Some(UUID_ARRAY)
    }
}

impl Encode<'_, Postgres> for PgUuid {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        buf.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }
}

impl Decode<'_, Postgres> for PgUuid {
    fn decode(value: PgValueRef<'_>) -> Result<Self, BoxDynError> {
        let uuid = match value.format() {
            PgValueFormat::Binary => Uuid::from_slice(value.as_bytes()?)?,
            PgValueFormat::Text => value.as_str()?.parse()?,
        };
        Ok(Self(uuid))
    }
}
