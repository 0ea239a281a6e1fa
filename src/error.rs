//! The one error type of the crate. Every fallible public function returns [`Result`].

use thiserror::Error;

/// Everything that can go wrong, with the offending name and shape in the message.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: not a valid safetensors file: {reason}")]
    Safetensors { file: String, reason: String },
    #[error("missing tensor `{name}` in {file}")]
    MissingTensor { name: String, file: String },
    #[error("tensor `{name}`: expected dtype {expected}, found {found}")]
    Dtype {
        name: String,
        expected: String,
        found: String,
    },
    #[error("tensor `{name}`: expected shape {expected}, found {found:?}")]
    Shape {
        name: String,
        expected: String,
        found: Vec<usize>,
    },
    #[error("tensor `{name}` holds a non-finite value ({value}) at flat index {index}")]
    NonFinite {
        name: String,
        index: usize,
        value: f32,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("adapter `{adapter}`: {reason}")]
    Adapter { adapter: String, reason: String },
    #[error("merge refused: {0}")]
    Merge(String),
    #[error("no GPU adapter: {0}")]
    NoGpu(String),
    #[error("GPU error: {0}")]
    Gpu(String),
    #[error("GPU error during {during}: {source}")]
    Wgpu {
        during: String,
        #[source]
        source: wgpu::Error,
    },
    #[error(
        "timed out after {0:?} waiting for the GPU (the work goes on; wait longer with GpuContext::set_timeout)"
    )]
    Timeout(std::time::Duration),
    #[error("GPU out of memory: {0}")]
    OutOfMemory(String),
    #[error("GPU buffer `{buffer}` of {bytes} bytes: {reason}")]
    Allocation {
        buffer: String,
        bytes: u64,
        reason: String,
    },
    #[error("rows {start}..{end} of a {rows}-row weight: {reason}")]
    RowSplit {
        start: usize,
        end: usize,
        rows: usize,
        reason: String,
    },
    #[error("GPU device lost: {0}")]
    DeviceLost(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn shape(name: &str, expected: impl Into<String>, found: &[usize]) -> Self {
        Error::Shape {
            name: name.to_string(),
            expected: expected.into(),
            found: found.to_vec(),
        }
    }

    pub(crate) fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }

    /// An error wgpu reported while doing `during`, kept as the source.
    pub(crate) fn wgpu(during: impl Into<String>, source: wgpu::Error) -> Self {
        Error::Wgpu {
            during: during.into(),
            source,
        }
    }
}

/// Fails with [`Error::NonFinite`] naming `name` if any value is NaN or infinite.
pub fn check_finite(name: &str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(Error::NonFinite {
            name: name.to_string(),
            index,
            value: values[index],
        }),
    }
}
