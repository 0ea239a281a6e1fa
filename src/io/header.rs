//! The safetensors header: parsed once and checked strictly, whether the file is in memory
//! ([`super::TensorFile`]) or read tensor by tensor ([`crate::checkpoint`]).
//!
//! Layout: 8 bytes little-endian `n`, then `n` bytes of JSON (`{"name": {"dtype", "shape",
//! "data_offsets": [begin, end]}, ..., "__metadata__": {...}}`), then the data, whose every byte
//! belongs to exactly one tensor. Offsets are relative to the start of the data.

use std::collections::BTreeMap;
use std::io::Read;
use std::ops::Range;

use safetensors::Dtype;
use safetensors::tensor::TensorInfo;
use serde_json::Value;

use crate::error::{Error, Result};

/// Length of the little-endian header size that starts every file.
pub const HEADER_LEN_BYTES: u64 = 8;
/// The largest header the `safetensors` crate accepts (100 MB); larger is a corrupt file.
const MAX_HEADER_BYTES: u64 = 100_000_000;
const METADATA_KEY: &str = "__metadata__";

/// Where one tensor lies in its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Absolute byte range in the file (header included), so `range.start` is a file offset.
    pub range: Range<u64>,
}

impl TensorEntry {
    /// Bytes of the tensor's data.
    pub fn len(&self) -> u64 {
        self.range.end - self.range.start
    }

    /// Whether the tensor holds no bytes (a zero-sized dimension).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A parsed, validated header: every tensor in data order, and the free-form metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Sorted by byte offset: the order of the data in the file.
    pub tensors: Vec<TensorEntry>,
    /// `__metadata__` (transformers writes `{"format": "pt"}`).
    pub metadata: BTreeMap<String, String>,
    /// File offset of the first data byte (`8 + n`).
    pub data_start: u64,
}

impl Header {
    /// Reads the header from the start of `reader` (positioned at offset 0) for a file of
    /// `file_len` bytes, reading nothing past it. `label` names the file in errors.
    pub fn read(reader: &mut impl Read, file_len: u64, label: &str) -> Result<Self> {
        let io_error = |source| Error::Io {
            path: label.to_string(),
            source,
        };
        if file_len < HEADER_LEN_BYTES {
            return Err(invalid(
                label,
                format!("{file_len} bytes is too short for the 8-byte header length"),
            ));
        }
        let mut len_bytes = [0u8; HEADER_LEN_BYTES as usize];
        reader.read_exact(&mut len_bytes).map_err(io_error)?;
        let json_len = header_json_len(u64::from_le_bytes(len_bytes), file_len, label)?;
        let mut json = vec![0u8; json_len as usize];
        reader.read_exact(&mut json).map_err(io_error)?;
        Self::parse(&json, file_len, label)
    }

    /// Parses the header of a whole file held in memory.
    pub fn from_bytes(bytes: &[u8], label: &str) -> Result<Self> {
        let file_len = bytes.len() as u64;
        let Some(len_bytes) = bytes.first_chunk::<{ HEADER_LEN_BYTES as usize }>() else {
            return Err(invalid(
                label,
                format!("{file_len} bytes is too short for the 8-byte header length"),
            ));
        };
        let json_len = header_json_len(u64::from_le_bytes(*len_bytes), file_len, label)?;
        let json = &bytes[HEADER_LEN_BYTES as usize..(HEADER_LEN_BYTES + json_len) as usize];
        Self::parse(json, file_len, label)
    }

    /// Parses the header JSON of a file of `file_len` bytes and checks every tensor: a known
    /// dtype, a byte length equal to its shape times its dtype size, and data that lies inside
    /// the file, with no gap or overlap between tensors and nothing after the last one.
    fn parse(json: &[u8], file_len: u64, label: &str) -> Result<Self> {
        let data_start = HEADER_LEN_BYTES + json.len() as u64;
        let data_len = file_len - data_start;
        let root: BTreeMap<String, Value> = serde_json::from_slice(json)
            .map_err(|e| invalid(label, format!("header is not a JSON object: {e}")))?;
        let mut metadata = BTreeMap::new();
        let mut tensors = Vec::with_capacity(root.len());
        for (name, value) in root {
            if name == METADATA_KEY {
                metadata = serde_json::from_value(value).map_err(|e| {
                    invalid(
                        label,
                        format!("`{METADATA_KEY}` is not a map of strings: {e}"),
                    )
                })?;
                continue;
            }
            let info: TensorInfo = serde_json::from_value(value)
                .map_err(|e| invalid(label, format!("tensor `{name}`: {e}")))?;
            let (begin, end) = info.data_offsets;
            let (begin, end) = (begin as u64, end as u64);
            if begin > end || end > data_len {
                return Err(invalid(
                    label,
                    format!(
                        "tensor `{name}`: data_offsets [{begin}, {end}] lie outside the \
                         {data_len} bytes of data"
                    ),
                ));
            }
            let expected = byte_len(info.dtype, &info.shape).ok_or_else(|| {
                invalid(
                    label,
                    format!(
                        "tensor `{name}`: {:?} {:?} is not a whole number of bytes",
                        info.dtype, info.shape
                    ),
                )
            })?;
            if end - begin != expected {
                return Err(invalid(
                    label,
                    format!(
                        "tensor `{name}`: {:?} {:?} needs {expected} bytes but data_offsets \
                         [{begin}, {end}] hold {}",
                        info.dtype,
                        info.shape,
                        end - begin
                    ),
                ));
            }
            tensors.push(TensorEntry {
                name,
                dtype: info.dtype,
                shape: info.shape,
                range: data_start + begin..data_start + end,
            });
        }
        tensors.sort_by_key(|t| (t.range.start, t.range.end));
        check_contiguous(&tensors, data_start, file_len, label)?;
        Ok(Self {
            tensors,
            metadata,
            data_start,
        })
    }
}

/// The header JSON's length, checked to fit in the file and under the crate's limit.
fn header_json_len(json_len: u64, file_len: u64, label: &str) -> Result<u64> {
    if json_len > MAX_HEADER_BYTES {
        return Err(invalid(
            label,
            format!("header length {json_len} is over the {MAX_HEADER_BYTES}-byte limit"),
        ));
    }
    if HEADER_LEN_BYTES + json_len > file_len {
        return Err(invalid(
            label,
            format!("header of {json_len} bytes runs past the end of the {file_len}-byte file"),
        ));
    }
    Ok(json_len)
}

/// Every data byte belongs to exactly one tensor: the first starts the data, each next one
/// starts where the previous ends, the last ends the file.
fn check_contiguous(
    tensors: &[TensorEntry],
    data_start: u64,
    file_len: u64,
    label: &str,
) -> Result<()> {
    let mut previous: Option<&TensorEntry> = None;
    let mut expected_start = data_start;
    for t in tensors {
        if t.range.start != expected_start {
            let at = |offset: u64| offset - data_start;
            let reason = match previous {
                Some(p) if t.range.start < p.range.end => format!(
                    "tensors `{}` and `{}` overlap at data bytes {}..{}",
                    p.name,
                    t.name,
                    at(t.range.start),
                    at(p.range.end)
                ),
                _ => format!(
                    "data bytes {}..{} before tensor `{}` belong to no tensor",
                    at(expected_start),
                    at(t.range.start),
                    t.name
                ),
            };
            return Err(invalid(label, reason));
        }
        expected_start = t.range.end;
        previous = Some(t);
    }
    if expected_start != file_len {
        return Err(invalid(
            label,
            format!(
                "{} bytes after the last tensor's data belong to no tensor",
                file_len - expected_start
            ),
        ));
    }
    Ok(())
}

/// Bytes of a tensor of `dtype` and `shape`; `None` on overflow or a fractional byte count.
pub fn byte_len(dtype: Dtype, shape: &[usize]) -> Option<u64> {
    let numel = shape
        .iter()
        .try_fold(1u64, |n, d| n.checked_mul(*d as u64))?;
    let bits = numel.checked_mul(dtype.bitsize() as u64)?;
    bits.is_multiple_of(8).then_some(bits / 8)
}

fn invalid(label: &str, reason: String) -> Error {
    Error::Safetensors {
        file: label.to_string(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `entries` (name, dtype, shape, offsets) with `data_len` bytes of data.
    fn file(entries: &[(&str, &str, &[usize], [u64; 2])], data_len: usize) -> Vec<u8> {
        let mut root = serde_json::Map::new();
        root.insert(
            METADATA_KEY.to_string(),
            serde_json::json!({"format": "pt"}),
        );
        for (name, dtype, shape, offsets) in entries {
            root.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": offsets}),
            );
        }
        let json = serde_json::to_vec(&root).unwrap();
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&json);
        bytes.extend(std::iter::repeat_n(7u8, data_len));
        bytes
    }

    fn error(bytes: &[u8]) -> String {
        Header::from_bytes(bytes, "f.safetensors")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn entries_come_in_data_order_with_file_offsets() {
        let bytes = file(
            &[
                ("b", "F32", &[2], [4, 12]),
                ("a", "I8", &[4], [0, 4]),
                ("__metadata__x", "U8", &[0], [12, 12]),
            ],
            12,
        );
        let header = Header::from_bytes(&bytes, "f").unwrap();
        let read = Header::read(&mut bytes.as_slice(), bytes.len() as u64, "f").unwrap();
        assert_eq!(header, read);
        let names: Vec<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "__metadata__x"]);
        let start = header.data_start;
        assert_eq!(start, bytes.len() as u64 - 12);
        assert_eq!(header.tensors[1].range, start + 4..start + 12);
        assert_eq!(header.metadata["format"], "pt");
    }

    #[test]
    fn refuses_what_is_not_a_whole_well_formed_file() {
        assert!(error(b"abc").contains("too short"));
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(error(&huge).contains("over the"));
        let mut past = 100u64.to_le_bytes().to_vec();
        past.extend_from_slice(b"{}");
        assert!(error(&past).contains("runs past the end"));
        let mut not_json = 2u64.to_le_bytes().to_vec();
        not_json.extend_from_slice(b"[]");
        assert!(error(&not_json).contains("not a JSON object"));
        let bad_dtype = file(&[("w", "Q7", &[1], [0, 1])], 1);
        assert!(error(&bad_dtype).contains("tensor `w`"));
    }

    #[test]
    fn names_the_tensor_whose_bytes_are_wrong() {
        let out_of_range = file(&[("w", "F32", &[4], [0, 16])], 8);
        assert!(error(&out_of_range).contains("`w`: data_offsets [0, 16] lie outside"));
        let wrong_size = file(&[("w", "F32", &[3], [0, 8])], 8);
        assert!(error(&wrong_size).contains("`w`: F32 [3] needs 12 bytes"));
        let overlap = file(
            &[("a", "F32", &[2], [0, 8]), ("b", "F32", &[2], [4, 12])],
            12,
        );
        assert!(error(&overlap).contains("`a` and `b` overlap"));
        let gap = file(
            &[("a", "F32", &[1], [0, 4]), ("b", "F32", &[1], [8, 12])],
            12,
        );
        assert!(error(&gap).contains("4..8 before tensor `b`"));
        let trailing = file(&[("a", "F32", &[1], [0, 4])], 6);
        assert!(error(&trailing).contains("2 bytes after the last tensor"));
    }
}
