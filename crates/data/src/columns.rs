//! Which Parquet columns hold the key, the image and the caption, and how
//! to read them whatever Arrow type they come back as.
//!
//! Defaults detect img2dataset (`key`, `jpg`/`png`/`webp`, `caption`) and
//! Hugging Face (`image` as `struct<bytes, path>`, `text`/`caption`)
//! layouts; any name can be set in config instead.

use crate::{DataError, Result};
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef};
use arrow_schema::{DataType, Schema};
use serde::{Deserialize, Serialize};

const IMAGE_CANDIDATES: &[&str] = &["jpg", "png", "webp", "jpeg", "image"];
const CAPTION_CANDIDATES: &[&str] = &["caption", "text", "txt"];
const KEY_CANDIDATES: &[&str] = &["key", "id"];

/// Column names to use; `None` means detect.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ColumnConfig {
    pub image: Option<String>,
    pub caption: Option<String>,
    pub key: Option<String>,
}

/// The resolved column names of one file.
#[derive(Clone, Debug, PartialEq)]
pub struct Columns {
    pub image: String,
    pub caption: String,
    /// Without a key column, samples are keyed `file:row`.
    pub key: Option<String>,
}

impl ColumnConfig {
    pub fn resolve(&self, schema: &Schema, file: &str) -> Result<Columns> {
        let present: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let pick = |configured: &Option<String>, candidates: &[&str], what: &str| {
            let found = match configured {
                Some(name) => present.contains(&name.as_str()).then(|| name.clone()),
                None => candidates
                    .iter()
                    .find(|c| present.contains(c))
                    .map(|c| c.to_string()),
            };
            found.ok_or_else(|| DataError::MissingColumn {
                file: file.to_string(),
                wanted: match configured {
                    Some(name) => format!("{what} column `{name}`"),
                    None => format!("{what} column (looked for {})", candidates.join(", ")),
                },
                present: present.join(", "),
            })
        };
        let image = pick(&self.image, IMAGE_CANDIDATES, "image")?;
        let caption = pick(&self.caption, CAPTION_CANDIDATES, "caption")?;
        let key = match &self.key {
            Some(_) => Some(pick(&self.key, KEY_CANDIDATES, "key")?),
            None => KEY_CANDIDATES
                .iter()
                .find(|c| present.contains(c))
                .map(|c| c.to_string()),
        };
        let columns = Columns {
            image,
            caption,
            key,
        };
        let mut checks = vec![
            (&columns.image, is_image_type as fn(&DataType) -> bool),
            (&columns.caption, is_string_type),
        ];
        if let Some(key) = &columns.key {
            checks.push((key, is_key_type));
        }
        for (name, check) in checks {
            let field = schema
                .field_with_name(name)
                .expect("resolved from the schema");
            if !check(field.data_type()) {
                return Err(DataError::ColumnType {
                    file: file.to_string(),
                    column: name.clone(),
                    found: field.data_type().to_string(),
                    expected: if name == &columns.image {
                        "binary image bytes or struct<bytes: binary, path: string>"
                    } else if name == &columns.caption {
                        "a string"
                    } else {
                        "a string or a 64-bit integer"
                    },
                });
            }
        }
        Ok(columns)
    }
}

fn is_binary_type(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView
    )
}

fn is_image_type(t: &DataType) -> bool {
    match t {
        DataType::Struct(fields) => fields
            .iter()
            .any(|f| f.name() == "bytes" && is_binary_type(f.data_type())),
        other => is_binary_type(other),
    }
}

fn is_string_type(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

fn is_key_type(t: &DataType) -> bool {
    is_string_type(t) || *t == DataType::Int64
}

/// Values of a binary (or HF image struct) column; nulls stay `None`.
pub fn binary_values(array: &ArrayRef) -> Vec<Option<Vec<u8>>> {
    let collect = |it: &mut dyn Iterator<Item = Option<&[u8]>>| {
        it.map(|v| v.map(<[u8]>::to_vec)).collect::<Vec<_>>()
    };
    match array.data_type() {
        DataType::Binary => collect(&mut array.as_binary::<i32>().iter()),
        DataType::LargeBinary => collect(&mut array.as_binary::<i64>().iter()),
        DataType::BinaryView => collect(&mut array.as_binary_view().iter()),
        DataType::Struct(_) => {
            let s = array.as_struct();
            let bytes = s.column_by_name("bytes").expect("checked by resolve");
            binary_values(bytes)
                .into_iter()
                .enumerate()
                .map(|(i, v)| if s.is_null(i) { None } else { v })
                .collect()
        }
        other => unreachable!("column type {other} was checked by resolve"),
    }
}

/// Values of a string column; nulls stay `None`.
pub fn string_values(array: &ArrayRef) -> Vec<Option<String>> {
    let collect = |it: &mut dyn Iterator<Item = Option<&str>>| {
        it.map(|v| v.map(str::to_string)).collect::<Vec<_>>()
    };
    match array.data_type() {
        DataType::Utf8 => collect(&mut array.as_string::<i32>().iter()),
        DataType::LargeUtf8 => collect(&mut array.as_string::<i64>().iter()),
        DataType::Utf8View => collect(&mut array.as_string_view().iter()),
        // Keys are sometimes integers (checked by resolve).
        _ => match array.as_primitive_opt::<arrow_array::types::Int64Type>() {
            Some(ints) => ints.iter().map(|v| v.map(|v| v.to_string())).collect(),
            None => vec![None; array.len()],
        },
    }
}
