//! Turning fuzz bytes into structured input: JSON values, names that are often valid and
//! sometimes not, header maps.

use arbitrary::{Result, Unstructured};
use serde_json::{Map, Number, Value};

/// Names that parts of txbus give meaning to, so that fuzzed input reaches past the first
/// check more often than random text would.
const WORDS: &[&str] = &[
    "user.created",
    "audit.user-created",
    "s.obj",
    "s.str",
    "user",
    "audit",
    "a",
    "",
    " ",
    "a b",
    "x\n",
    "é",
    "txbus.x",
    "Txbus-Message-Id",
];

/// A short string: one of [`WORDS`], or arbitrary text.
pub fn name(u: &mut Unstructured<'_>) -> Result<String> {
    if u.ratio(3, 4)? {
        Ok((*u.choose(WORDS)?).to_owned())
    } else {
        u.arbitrary()
    }
}

/// A JSON value up to `depth` levels deep (arrays and objects), with arbitrary numbers and
/// strings; sometimes deeper than the bus accepts.
pub fn json(u: &mut Unstructured<'_>, depth: usize) -> Result<Value> {
    let pick = if depth == 0 {
        u.int_in_range(0..=4)?
    } else {
        u.int_in_range(0..=7)?
    };
    Ok(match pick {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::Number(Number::from(u.arbitrary::<i64>()?)),
        3 => Number::from_f64(u.arbitrary()?).map_or(Value::Null, Value::Number),
        4 => Value::String(u.arbitrary()?),
        5 | 6 => {
            let n = u.int_in_range(0..=4)?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(json(u, depth - 1)?);
            }
            Value::Array(items)
        }
        _ => {
            let n = u.int_in_range(0..=4)?;
            let mut map = Map::new();
            for _ in 0..n {
                let k = name(u)?;
                map.insert(k, json(u, depth - 1)?);
            }
            Value::Object(map)
        }
    })
}

/// A value nested `n` levels deep without recursion (to go past any limit cheaply).
pub fn nested(n: usize, leaf: Value) -> Value {
    let mut v = leaf;
    for _ in 0..n {
        v = Value::Array(vec![v]);
    }
    v
}

/// A payload: parsed from raw bytes (as a broker or HTTP body would be), built, or deep.
pub fn payload(u: &mut Unstructured<'_>) -> Result<Value> {
    match u.int_in_range(0..=3)? {
        0 => {
            let bytes: &[u8] = u.arbitrary()?;
            Ok(serde_json::from_slice(bytes).unwrap_or(Value::Null))
        }
        1 => {
            let depth = u.int_in_range(0..=300)?;
            Ok(nested(depth, Value::Null))
        }
        _ => json(u, 6),
    }
}

/// True when `v` holds a float anywhere (floats may not read back to the same bits).
pub fn has_float(v: &Value) -> bool {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Number(n) if n.is_f64() => return true,
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => stack.extend(map.values()),
            _ => {}
        }
    }
    false
}
