//! Safetensors in and out. Every accessor checks dtype and shape and names the tensor on error;
//! the header is validated ([`header::Header`]) before anything is allocated from it.

pub mod header;

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::tensor::Matrix;

/// One tensor copied out of a safetensors file.
#[derive(Clone, Debug)]
pub struct HostTensor {
    /// Tensor name as stored in the file.
    pub name: String,
    /// Element type of `bytes`.
    pub dtype: Dtype,
    /// Dimensions, outermost first (row-major).
    pub shape: Vec<usize>,
    /// Raw little-endian data, `numel * dtype size` bytes.
    pub bytes: Vec<u8>,
}

/// All tensors of one safetensors file (or of an in-memory set), by name.
#[derive(Clone, Debug, Default)]
pub struct TensorFile {
    /// Where the tensors came from (a path or a caller's label), used in error messages.
    pub label: String,
    /// Tensors keyed by name.
    pub tensors: BTreeMap<String, HostTensor>,
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

impl TensorFile {
    /// Reads and parses a safetensors file; `Error::Io` if it cannot be read, `Error::Safetensors` if the header is malformed.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// Parses a safetensors file held in memory; `label` names it in errors.
    pub fn from_bytes(bytes: &[u8], label: &str) -> Result<Self> {
        let header = header::Header::from_bytes(bytes, label)?;
        let tensors = header
            .tensors
            .into_iter()
            .map(|entry| {
                let data = &bytes[entry.range.start as usize..entry.range.end as usize];
                let t = HostTensor {
                    name: entry.name.clone(),
                    dtype: entry.dtype,
                    shape: entry.shape,
                    bytes: data.to_vec(),
                };
                (entry.name, t)
            })
            .collect();
        Ok(Self {
            label: label.to_string(),
            tensors,
        })
    }

    /// A layer's input: the tensor `x`, or else the file's only tensor, flattened to rows (see
    /// [`HostTensor::to_rows`]), with the leading dims its output keeps.
    pub fn input_rows(&self, in_features: usize) -> Result<(Matrix, Vec<usize>)> {
        let x = match self.get("x") {
            Ok(t) => t,
            Err(e) if self.tensors.len() == 1 => self.tensors.values().next().ok_or(e)?,
            Err(e) => return Err(e),
        };
        x.to_rows(in_features)
    }

    /// The tensor `name`, or `Error::MissingTensor` naming it and this file.
    pub fn get(&self, name: &str) -> Result<&HostTensor> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            file: self.label.clone(),
        })
    }

    /// Whether a tensor called `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Names that start with `prefix`, with the prefix removed.
    pub fn names_with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.tensors
            .keys()
            .filter_map(move |k| k.strip_prefix(prefix))
    }

    /// Adds `tensor` under its own name, replacing any tensor of that name.
    pub fn insert(&mut self, tensor: HostTensor) {
        self.tensors.insert(tensor.name.clone(), tensor);
    }

    /// Serializes every tensor (names in sorted order).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = self
            .tensors
            .values()
            .map(|t| {
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                    .map(|v| (t.name.clone(), v))
                    .map_err(|e| Error::Safetensors {
                        file: self.label.clone(),
                        reason: format!("tensor `{}`: {e}", t.name),
                    })
            })
            .collect::<Result<_>>()?;
        safetensors::serialize(views, None).map_err(|e| Error::Safetensors {
            file: self.label.clone(),
            reason: e.to_string(),
        })
    }

    /// Serializes to safetensors and writes `path`; `Error::Io` if the write fails.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })
    }
}

impl HostTensor {
    /// Element count (product of `shape`; 1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn dtype_error(&self, expected: &str) -> Error {
        Error::Dtype {
            name: self.name.clone(),
            expected: expected.to_string(),
            found: format!("{:?}", self.dtype),
        }
    }

    /// Fails unless the shape equals `expected`.
    pub fn expect_shape(&self, expected: &[usize]) -> Result<&Self> {
        if self.shape != expected {
            return Err(Error::shape(
                &self.name,
                format!("{expected:?}"),
                &self.shape,
            ));
        }
        Ok(self)
    }

    /// Fails unless the element count equals `numel` (for tensors whose rank varies, like
    /// `[n]` vs `[n, 1]`).
    pub fn expect_numel(&self, numel: usize) -> Result<&Self> {
        if self.numel() != numel {
            return Err(Error::shape(
                &self.name,
                format!("{numel} elements"),
                &self.shape,
            ));
        }
        Ok(self)
    }

    /// A layer's input of any leading shape, `[..., in_features]` (`[in_features]` is one row),
    /// as a `[rows, in_features]` matrix, with the leading dims (`[]` for a 1-D input) that
    /// [`Self::from_rows`] gives back to the output.
    pub fn to_rows(&self, in_features: usize) -> Result<(Matrix, Vec<usize>)> {
        let leading = match self.shape.split_last() {
            Some((last, leading)) if *last == in_features => leading.to_vec(),
            _ => {
                return Err(Error::shape(
                    &self.name,
                    format!("[..., {in_features}]"),
                    &self.shape,
                ));
            }
        };
        let rows = leading.iter().product();
        if rows == 0 {
            return Err(Error::shape(
                &self.name,
                format!("[..., {in_features}] with at least one row"),
                &self.shape,
            ));
        }
        Ok((
            Matrix::new(rows, in_features, self.to_finite_f32()?)?,
            leading,
        ))
    }

    /// A layer's output rows as an f32 tensor of shape `[..leading, cols]`: the inverse of
    /// [`Self::to_rows`]. Fails unless `leading` multiplies out to the row count.
    pub fn from_rows(name: &str, rows: &Matrix, leading: &[usize]) -> Result<Self> {
        if leading.iter().product::<usize>() != rows.rows {
            return Err(Error::shape(
                name,
                format!("leading dims {leading:?} for {} rows", rows.rows),
                &[rows.rows, rows.cols],
            ));
        }
        let shape: Vec<usize> = leading.iter().copied().chain([rows.cols]).collect();
        Ok(Self::from_f32(name, &shape, &rows.data))
    }

    /// Float tensors (F16, BF16, F32, F64) converted exactly (F64 rounded) to f32.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let b = &self.bytes;
        Ok(match self.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("chunk of 8")) as f32)
                .collect(),
            _ => return Err(self.dtype_error("F16, BF16, F32 or F64")),
        })
    }

    /// Float tensor that must hold only finite values.
    pub fn to_finite_f32(&self) -> Result<Vec<f32>> {
        let v = self.to_f32()?;
        crate::error::check_finite(&self.name, &v)?;
        Ok(v)
    }

    /// Raw bytes of a U8, I8 or BOOL tensor; `Error::Dtype` otherwise.
    pub fn to_u8(&self) -> Result<Vec<u8>> {
        match self.dtype {
            Dtype::U8 | Dtype::I8 | Dtype::BOOL => Ok(self.bytes.clone()),
            _ => Err(self.dtype_error("U8 or I8")),
        }
    }

    /// Values of an I8 tensor; `Error::Dtype` otherwise.
    pub fn to_i8(&self) -> Result<Vec<i8>> {
        match self.dtype {
            Dtype::I8 => Ok(self.bytes.iter().map(|b| *b as i8).collect()),
            _ => Err(self.dtype_error("I8")),
        }
    }

    /// 32-bit integer words (I32 or U32), as their raw bit pattern.
    pub fn to_u32_words(&self) -> Result<Vec<u32>> {
        match self.dtype {
            Dtype::I32 | Dtype::U32 => Ok(self
                .bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()),
            _ => Err(self.dtype_error("I32")),
        }
    }

    /// Any integer tensor widened to i64 (for small meta scalars and index vectors).
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        let b = &self.bytes;
        Ok(match self.dtype {
            Dtype::I64 => b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("chunk of 8")))
                .collect(),
            Dtype::I32 => b
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            Dtype::I16 => b
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
                .collect(),
            Dtype::U8 | Dtype::BOOL => b.iter().map(|v| *v as i64).collect(),
            Dtype::I8 => b.iter().map(|v| *v as i8 as i64).collect(),
            _ => return Err(self.dtype_error("an integer dtype")),
        })
    }

    /// A scalar (any shape with one element) as f64, from an integer or float tensor.
    pub fn scalar(&self) -> Result<f64> {
        if self.numel() != 1 {
            return Err(Error::shape(&self.name, "a scalar", &self.shape));
        }
        match self.dtype {
            Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64 => Ok(self.to_f32()?[0] as f64),
            _ => Ok(self.to_i64()?[0] as f64),
        }
    }

    /// A uint8 vector of ASCII codes, as HQQ encodes strings.
    pub fn ascii(&self) -> Result<String> {
        let bytes = self.to_u8()?;
        String::from_utf8(bytes).map_err(|_| self.dtype_error("ASCII text in U8"))
    }

    /// An F32 tensor of `values`; `values.len()` must equal `shape`'s product (not checked).
    pub fn from_f32(name: &str, shape: &[usize], values: &[f32]) -> Self {
        Self {
            name: name.to_string(),
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            bytes: bytemuck::cast_slice(values).to_vec(),
        }
    }

    /// An F16 tensor from `values`, rounded to nearest.
    pub fn from_f16(name: &str, shape: &[usize], values: &[f32]) -> Self {
        let halves: Vec<half::f16> = values.iter().map(|v| half::f16::from_f32(*v)).collect();
        Self {
            name: name.to_string(),
            dtype: Dtype::F16,
            shape: shape.to_vec(),
            bytes: bytemuck::cast_slice(&halves).to_vec(),
        }
    }

    /// A tensor from raw little-endian bytes, unchecked.
    pub fn from_raw(name: &str, dtype: Dtype, shape: &[usize], bytes: Vec<u8>) -> Self {
        Self {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            bytes,
        }
    }
}
