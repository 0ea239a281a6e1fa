//! Reading a GPTQ layer's tensors, checking every shape and dtype against the configuration and
//! naming the offending tensor.

use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::io::{HostTensor, TensorFile};

use super::packing::words_for;
use super::{GptqConfig, GptqWeight, check_g_idx, default_g_idx};

/// Reads the layer under `prefix`; `shape` is `(in_features, out_features)` when known.
pub(super) fn read(
    file: &TensorFile,
    prefix: &str,
    config: GptqConfig,
    shape: Option<(usize, usize)>,
) -> Result<GptqWeight> {
    config.validate()?;
    let name = |key: &str| format!("{prefix}{key}");
    let qweight = file.get(&name("qweight"))?;
    let g_idx_name = name("g_idx");
    let stored_g_idx = match file.contains(&g_idx_name) {
        true => Some(read_g_idx(file.get(&g_idx_name)?)?),
        false => None,
    };
    let named_g_idx = stored_g_idx.as_deref().map(|g| (g_idx_name.as_str(), g));
    let dims = Dims::of(qweight, named_g_idx, shape, config)?;
    let g_idx = match stored_g_idx {
        Some(g) => {
            check_g_idx(&g_idx_name, &g, dims.in_features, dims.groups)?;
            g
        }
        None if config.desc_act => {
            return Err(Error::config(format!(
                "`{g_idx_name}` is missing but desc_act is set, so the groups of the inputs are unknown"
            )));
        }
        None => default_g_idx(dims.in_features, &config),
    };
    let bias = match file.contains(&name("bias")) {
        true => Some(dims.bias(file.get(&name("bias"))?)?),
        false => None,
    };
    Ok(GptqWeight {
        config,
        in_features: dims.in_features,
        out_features: dims.out_features,
        qweight: exact(qweight, qweight.to_u32_words()?)?,
        qzeros: dims.qzeros(file.get(&name("qzeros"))?)?,
        scales: dims.scales(file.get(&name("scales"))?)?,
        g_idx,
        bias,
        groups: dims.groups,
    })
}

/// The layer's dimensions, which every other tensor is checked against.
struct Dims {
    config: GptqConfig,
    in_features: usize,
    out_features: usize,
    groups: usize,
}

impl Dims {
    /// Takes out_features from `qweight` and in_features from the given shape, else from the
    /// length of `g_idx` (given with its name), else from the qweight rows; then checks the
    /// qweight rows.
    fn of(
        qweight: &HostTensor,
        g_idx: Option<(&str, &[u32])>,
        shape: Option<(usize, usize)>,
        config: GptqConfig,
    ) -> Result<Self> {
        let [rows, cols] = matrix_shape(qweight)?;
        let (in_features, out_features) = match (shape, g_idx) {
            (Some((k, n)), _) if n == cols => (k, n),
            (Some((_, n)), _) => {
                return Err(Error::shape(
                    &qweight.name,
                    format!("[_, {n}]"),
                    &qweight.shape,
                ));
            }
            (None, Some((_, g))) => (g.len(), cols),
            (None, None) => (in_features_from_rows(qweight, rows, config.bits)?, cols),
        };
        if in_features == 0 || out_features == 0 {
            return Err(Error::shape(
                &qweight.name,
                "a non-empty layer",
                &qweight.shape,
            ));
        }
        let source = match (shape, g_idx) {
            (None, Some((name, _))) => format!(" (the length of `{name}`)"),
            _ => String::new(),
        };
        check_packed_dim(qweight, 0, in_features, config.bits, &source)?;
        Ok(Self {
            config,
            in_features,
            out_features,
            groups: config.groups(in_features),
        })
    }

    fn qzeros(&self, t: &HostTensor) -> Result<Vec<u32>> {
        let [rows, _] = matrix_shape(t)?;
        if rows != self.groups {
            return Err(self.groups_error(t));
        }
        check_packed_dim(t, 1, self.out_features, self.config.bits, "")?;
        exact(t, t.to_u32_words()?)
    }

    fn scales(&self, t: &HostTensor) -> Result<Vec<f32>> {
        expect_dtype(t, Dtype::F16)?;
        let [rows, _] = matrix_shape(t)?;
        if rows != self.groups {
            return Err(self.groups_error(t));
        }
        t.expect_shape(&[self.groups, self.out_features])?;
        exact(t, t.to_finite_f32()?)
    }

    fn bias(&self, t: &HostTensor) -> Result<Vec<f32>> {
        t.expect_shape(&[self.out_features])?;
        exact(t, t.to_finite_f32()?)
    }

    fn groups_error(&self, t: &HostTensor) -> Error {
        let group_size = self
            .config
            .group_size
            .map_or("-1".to_string(), |g| g.to_string());
        Error::shape(
            &t.name,
            format!(
                "{} rows (in_features {}, group_size {group_size})",
                self.groups, self.in_features
            ),
            &t.shape,
        )
    }
}

/// in_features from `rows` words per column, assuming no padding.
fn in_features_from_rows(qweight: &HostTensor, rows: usize, bits: u32) -> Result<usize> {
    let stored_bits = rows * 32;
    if !stored_bits.is_multiple_of(bits as usize) {
        return Err(Error::config(format!(
            "cannot tell in_features of `{}`: {rows} rows of {bits}-bit codes and no g_idx; \
             give the layer's shape (from_tensors_with_shape)",
            qweight.name
        )));
    }
    Ok(stored_bits / bits as usize)
}

/// Checks the packed dimension `dim` of `t`, which holds `count` codes. AutoGPTQ sizes it
/// `count / 32 * bits`, dropping codes when `count % 32 != 0`; that loss is reported as such.
fn check_packed_dim(t: &HostTensor, dim: usize, count: usize, bits: u32, note: &str) -> Result<()> {
    let expected = words_for(count, bits)?;
    let found = t.shape[dim];
    if found == expected {
        return Ok(());
    }
    let mut want = t.shape.clone();
    want[dim] = expected;
    let what = if dim == 0 {
        "in_features"
    } else {
        "out_features"
    };
    let detail = if !count.is_multiple_of(32) && found == count / 32 * bits as usize {
        format!(
            "; {found} is AutoGPTQ's truncation, which drops the codes of {what} {}..{count}",
            count / 32 * 32
        )
    } else {
        String::new()
    };
    Err(Error::shape(
        &t.name,
        format!("{want:?} for {what} {count}{note}{detail}"),
        &t.shape,
    ))
}

fn read_g_idx(t: &HostTensor) -> Result<Vec<u32>> {
    if t.dtype != Dtype::I64 {
        expect_dtype(t, Dtype::I32)?;
    }
    if t.shape.len() != 1 {
        return Err(Error::shape(&t.name, "[in_features]", &t.shape));
    }
    exact(t, t.to_i64()?)?
        .into_iter()
        .enumerate()
        .map(|(k, g)| {
            u32::try_from(g).map_err(|_| {
                Error::config(format!(
                    "tensor `{}`: input {k} has group index {g}",
                    t.name
                ))
            })
        })
        .collect()
}

fn expect_dtype(t: &HostTensor, dtype: Dtype) -> Result<()> {
    if t.dtype == dtype {
        return Ok(());
    }
    Err(Error::Dtype {
        name: t.name.clone(),
        expected: format!("{dtype:?}"),
        found: format!("{:?}", t.dtype),
    })
}

fn matrix_shape(t: &HostTensor) -> Result<[usize; 2]> {
    match t.shape[..] {
        [rows, cols] => Ok([rows, cols]),
        _ => Err(Error::shape(&t.name, "a 2-D shape", &t.shape)),
    }
}

/// Values decoded from `t`, checked to be exactly as many as its shape says (a `TensorFile`
/// built in memory is not validated the way a parsed file is).
fn exact<T>(t: &HostTensor, values: Vec<T>) -> Result<Vec<T>> {
    if values.len() != t.numel() {
        return Err(Error::shape(
            &t.name,
            format!("{} values for its shape", t.numel()),
            &[values.len()],
        ));
    }
    Ok(values)
}
