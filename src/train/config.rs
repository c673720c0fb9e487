//! `--set key=value` overrides on TOML configs.
//!
//! [`apply_overrides`] edits a `toml::Value`; [`apply_overrides_to`] also validates the result
//! by deserialising it into the caller's config type (which should use
//! `#[serde(deny_unknown_fields)]`), one override at a time, so that an error names the
//! override that caused it.

use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use toml::Value;

/// Parse the right-hand side of an override: any TOML value (`3`, `1e-4`, `true`,
/// `"text"`, `[1, 2]`, `{ a = 1 }`); anything that is not valid TOML is taken as a bare string.
fn parse_value(raw: &str, existing: Option<&Value>) -> Value {
    // A string field takes the text as written, even when it looks like a number.
    if let Some(Value::String(_)) = existing {
        let t = raw.trim();
        if !(t.starts_with('"') || t.starts_with('\'')) {
            return Value::String(t.to_string());
        }
    }
    let parsed = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(raw.trim().to_string()));
    match (existing, parsed) {
        // An integer given for a float field is the float.
        (Some(Value::Float(_)), Value::Integer(i)) => Value::Float(i as f64),
        (_, v) => v,
    }
}

/// Apply `key=value` overrides (dotted keys for nested tables). Intermediate tables are created
/// when missing; unknown keys are caught by validation ([`apply_overrides_to`]).
pub fn apply_overrides<S: AsRef<str>>(mut base: Value, sets: &[S]) -> Result<Value> {
    for set in sets {
        apply_one(&mut base, set.as_ref())?;
    }
    Ok(base)
}

fn apply_one(base: &mut Value, set: &str) -> Result<()> {
    let bad = |msg: String| Error::invalid(format!("--set `{set}`"), msg);
    let (key, raw) = set.split_once('=').ok_or_else(|| bad("expected key=value".to_string()))?;
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if key.is_empty() || parts.iter().any(|p| p.trim().is_empty()) {
        return Err(bad(format!("bad key `{key}`")));
    }
    let mut node = base;
    for (i, part) in parts.iter().enumerate() {
        let table = match node {
            Value::Table(t) => t,
            other => {
                return Err(bad(format!(
                    "`{}` is a {}, not a table",
                    parts[..i].join("."),
                    other.type_str()
                )))
            }
        };
        if i + 1 == parts.len() {
            let v = parse_value(raw, table.get(*part));
            table.insert(part.to_string(), v);
            return Ok(());
        }
        node = table.entry(part.to_string()).or_insert_with(|| Value::Table(Default::default()));
    }
    Ok(())
}

/// Apply overrides to a typed config: serialise it to TOML, apply each override and check
/// that the result still deserialises into `T`.
pub fn apply_overrides_to<T, S>(cfg: &T, sets: &[S]) -> Result<T>
where
    T: Serialize + DeserializeOwned,
    S: AsRef<str>,
{
    let mut v = Value::try_from(cfg).map_err(|e| Error::invalid("config", format!("cannot serialise: {e}")))?;
    for set in sets {
        let set = set.as_ref();
        apply_one(&mut v, set)?;
        v.clone()
            .try_into::<T>()
            .map_err(|e| Error::invalid(format!("--set `{set}`"), e.to_string().trim().to_string()))?;
    }
    v.try_into::<T>().map_err(|e| Error::invalid("config", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Optim {
        lr: f64,
        warmup: u64,
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        name: String,
        steps: u64,
        cuda: bool,
        optim: Optim,
    }

    fn cfg() -> Cfg {
        Cfg { name: "run".into(), steps: 10, cuda: false, optim: Optim { lr: 1e-4, warmup: 0 } }
    }

    #[test]
    fn overrides_apply_and_validate() {
        let c = apply_overrides_to(&cfg(), &["steps=200", "optim.lr=3e-4", "name=123", "cuda=true", "optim.lr=1"]).unwrap();
        assert_eq!(c, Cfg { name: "123".into(), steps: 200, cuda: true, optim: Optim { lr: 1.0, warmup: 0 } });
        let c = apply_overrides_to(&cfg(), &["name=\"quoted name\""]).unwrap();
        assert_eq!(c.name, "quoted name");

        let e = apply_overrides_to(&cfg(), &["optim.momentum=0.9"]).unwrap_err().to_string();
        assert!(e.contains("optim.momentum=0.9") && e.contains("momentum"), "{e}");
        let e = apply_overrides_to(&cfg(), &["stepz=3"]).unwrap_err().to_string();
        assert!(e.contains("stepz"), "{e}");
        let e = apply_overrides_to(&cfg(), &["steps=many"]).unwrap_err().to_string();
        assert!(e.contains("steps=many"), "{e}");
        let e = apply_overrides_to(&cfg(), &["steps"]).unwrap_err().to_string();
        assert!(e.contains("key=value"), "{e}");
        let e = apply_overrides_to(&cfg(), &["steps.x=1"]).unwrap_err().to_string();
        assert!(e.contains("not a table"), "{e}");
        assert!(apply_overrides_to(&cfg(), &["a..b=1"]).is_err());

        // Plain values: new nested keys are created.
        let v = apply_overrides(Value::Table(Default::default()), &["a.b.c=[1, 2]", "d=x y"]).unwrap();
        assert_eq!(v["a"]["b"]["c"], Value::Array(vec![Value::Integer(1), Value::Integer(2)]));
        assert_eq!(v["d"], Value::String("x y".into()));
    }
}
