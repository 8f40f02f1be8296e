//! Which Parquet columns hold the key, the sample's payload and the
//! caption, what that payload is, and how to read the columns whatever
//! Arrow type they come back as.
//!
//! The payload is either an encoded image (stage 1) or a pre-tokenized
//! image-token grid (stage 2, written by [`crate::tokens`]). Defaults detect
//! img2dataset (`key`, `jpg`/`png`/`webp`, `caption`), Hugging Face
//! (`image` as `struct<bytes, path>`, `text`/`caption`) and token
//! (`key`, `caption`, `tokens` as a fixed-size list of u16) layouts; any
//! name can be set in config instead. A `tokens` column of that type makes
//! a file a token file unless an image column is configured.

use crate::{DataError, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::UInt16Type;
use arrow_array::{Array, ArrayRef};
use arrow_schema::{DataType, Schema};
use serde::{Deserialize, Serialize};

const IMAGE_CANDIDATES: &[&str] = &["jpg", "png", "webp", "jpeg", "image"];
const TOKEN_CANDIDATES: &[&str] = &["tokens"];
const CAPTION_CANDIDATES: &[&str] = &["caption", "text", "txt"];
const KEY_CANDIDATES: &[&str] = &["key", "id"];

/// Column names to use; `None` means detect.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ColumnConfig {
    /// The encoded-image column (bytes, or Hugging Face's image struct).
    pub image: Option<String>,
    /// The token-grid column of a pre-tokenized dataset (a fixed-size list
    /// of u16). At most one of `image` and `tokens` may be set.
    pub tokens: Option<String>,
    pub caption: Option<String>,
    pub key: Option<String>,
}

/// What a dataset's samples hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Payload {
    /// Encoded image bytes (PNG, JPEG, WebP), decoded by the loader.
    EncodedImage,
    /// A dVAE image-token grid of `len` tokens, row-major.
    Tokens { len: usize },
}

impl std::fmt::Display for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::EncodedImage => write!(f, "encoded images"),
            Self::Tokens { len } => write!(f, "pre-tokenized samples (grids of {len} tokens)"),
        }
    }
}

/// The resolved columns of one file.
#[derive(Clone, Debug, PartialEq)]
pub struct Columns {
    /// The column holding each sample's payload (image bytes or tokens).
    pub data: String,
    pub payload: Payload,
    pub caption: String,
    /// Without a key column, samples are keyed `file:row_group:row`.
    pub key: Option<String>,
}

impl ColumnConfig {
    pub fn resolve(&self, schema: &Schema, file: &str) -> Result<Columns> {
        let present: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let missing = |wanted: String| DataError::MissingColumn {
            file: file.to_string(),
            wanted,
            present: present.join(", "),
        };
        let pick = |configured: &Option<String>, candidates: &[&str], what: &str| {
            let found = match configured {
                Some(name) => present.contains(&name.as_str()).then(|| name.clone()),
                None => candidates
                    .iter()
                    .find(|c| present.contains(c))
                    .map(|c| c.to_string()),
            };
            found.ok_or_else(|| {
                missing(match configured {
                    Some(name) => format!("{what} column `{name}`"),
                    None => format!("{what} column (looked for {})", candidates.join(", ")),
                })
            })
        };
        let type_of = |name: &str| {
            schema
                .field_with_name(name)
                .expect("resolved from the schema")
                .data_type()
                .clone()
        };
        let wrong_type = |column: &str, expected: &'static str| DataError::ColumnType {
            file: file.to_string(),
            column: column.to_string(),
            found: type_of(column).to_string(),
            expected,
        };
        const TOKENS_EXPECTED: &str = "a fixed-size list of u16 (image tokens)";
        let (data, payload) = match (&self.image, &self.tokens) {
            (Some(image), Some(tokens)) => {
                return Err(DataError::Config(format!(
                    "columns: set either image (`{image}`) or tokens (`{tokens}`), not both"
                )));
            }
            (None, Some(_)) => {
                let name = pick(&self.tokens, TOKEN_CANDIDATES, "tokens")?;
                let len =
                    token_len(&type_of(&name)).ok_or_else(|| wrong_type(&name, TOKENS_EXPECTED))?;
                (name, Payload::Tokens { len })
            }
            (Some(_), None) => (
                pick(&self.image, IMAGE_CANDIDATES, "image")?,
                Payload::EncodedImage,
            ),
            (None, None) => {
                let tokens = TOKEN_CANDIDATES.iter().find_map(|c| {
                    present.contains(c).then_some(())?;
                    token_len(&type_of(c)).map(|len| (c.to_string(), Payload::Tokens { len }))
                });
                match tokens {
                    Some(found) => found,
                    None => {
                        let image = IMAGE_CANDIDATES
                            .iter()
                            .find(|c| present.contains(c))
                            .ok_or_else(|| {
                                missing(format!(
                                    "image column (looked for {}) or tokens column \
                                     (`tokens`, {TOKENS_EXPECTED})",
                                    IMAGE_CANDIDATES.join(", ")
                                ))
                            })?;
                        (image.to_string(), Payload::EncodedImage)
                    }
                }
            }
        };
        if payload == Payload::EncodedImage && !is_image_type(&type_of(&data)) {
            return Err(wrong_type(
                &data,
                "binary image bytes or struct<bytes: binary, path: string>",
            ));
        }
        let caption = pick(&self.caption, CAPTION_CANDIDATES, "caption")?;
        if !is_string_type(&type_of(&caption)) {
            return Err(wrong_type(&caption, "a string"));
        }
        let key = match &self.key {
            Some(_) => Some(pick(&self.key, KEY_CANDIDATES, "key")?),
            None => KEY_CANDIDATES
                .iter()
                .find(|c| present.contains(c))
                .map(|c| c.to_string()),
        };
        if let Some(key) = &key
            && !is_key_type(&type_of(key))
        {
            return Err(wrong_type(key, "a string or a 64-bit integer"));
        }
        Ok(Columns {
            data,
            payload,
            caption,
            key,
        })
    }
}

/// The grid length of a token column's type, if it is one.
fn token_len(t: &DataType) -> Option<usize> {
    match t {
        DataType::FixedSizeList(item, len) if *item.data_type() == DataType::UInt16 && *len > 0 => {
            Some(*len as usize)
        }
        _ => None,
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

/// Token grids of a fixed-size-list-of-u16 column (checked by resolve);
/// null rows stay `None`.
pub fn token_values(array: &ArrayRef) -> Vec<Option<Vec<u16>>> {
    let lists = array.as_fixed_size_list();
    let len = lists.value_length() as usize;
    let values = lists.values().as_primitive::<UInt16Type>().values();
    (0..lists.len())
        .map(|i| {
            let start = lists.value_offset_at(i);
            (!lists.is_null(i)).then(|| values[start..start + len].to_vec())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_schema::Field;
    use std::sync::Arc;

    fn schema(fields: &[(&str, DataType)]) -> Schema {
        Schema::new(
            fields
                .iter()
                .map(|(n, t)| Field::new(*n, t.clone(), true))
                .collect::<Vec<_>>(),
        )
    }

    fn grid(item: DataType, len: i32) -> DataType {
        DataType::FixedSizeList(Arc::new(Field::new("item", item, false)), len)
    }

    #[test]
    fn a_tokens_column_of_u16_grids_makes_a_token_file() {
        let s = schema(&[
            ("key", DataType::Utf8),
            ("caption", DataType::Utf8),
            ("tokens", grid(DataType::UInt16, 1024)),
        ]);
        let c = ColumnConfig::default().resolve(&s, "f").unwrap();
        assert_eq!(c.payload, Payload::Tokens { len: 1024 });
        assert_eq!((c.data.as_str(), c.key.as_deref()), ("tokens", Some("key")));
    }

    #[test]
    fn images_win_where_tokens_are_not_u16_grids_or_an_image_is_configured() {
        let both = schema(&[
            ("jpg", DataType::Binary),
            ("caption", DataType::Utf8),
            ("tokens", grid(DataType::UInt16, 4)),
        ]);
        let image = ColumnConfig {
            image: Some("jpg".into()),
            ..ColumnConfig::default()
        };
        assert_eq!(
            image.resolve(&both, "f").unwrap().payload,
            Payload::EncodedImage
        );
        let i32_grid = schema(&[
            ("jpg", DataType::Binary),
            ("caption", DataType::Utf8),
            ("tokens", grid(DataType::Int32, 4)),
        ]);
        let c = ColumnConfig::default().resolve(&i32_grid, "f").unwrap();
        assert_eq!((c.payload, c.data.as_str()), (Payload::EncodedImage, "jpg"));
    }

    #[test]
    fn configured_token_columns_are_checked() {
        let s = schema(&[
            ("caption", DataType::Utf8),
            ("codes", grid(DataType::UInt16, 4)),
            ("bad", DataType::Utf8),
        ]);
        let named = |name: &str| ColumnConfig {
            tokens: Some(name.into()),
            ..ColumnConfig::default()
        };
        assert_eq!(
            named("codes").resolve(&s, "f").unwrap().payload,
            Payload::Tokens { len: 4 }
        );
        let err = named("bad")
            .resolve(&s, "f.parquet")
            .unwrap_err()
            .to_string();
        assert!(err.contains("f.parquet") && err.contains("u16"), "{err}");
        let err = ColumnConfig {
            image: Some("jpg".into()),
            ..named("codes")
        }
        .resolve(&s, "f")
        .unwrap_err()
        .to_string();
        assert!(err.contains("not both"), "{err}");
        let err = ColumnConfig::default()
            .resolve(&s, "f.parquet")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("image column") && err.contains("tokens column"),
            "{err}"
        );
    }
}
