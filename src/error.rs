//! The one error type of the crate. Every fallible public function returns [`Result`].

use thiserror::Error;

/// Everything that can go wrong, with the offending name and shape in the message.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed (safetensors, config JSON, adapter folder).
    #[error("i/o error on {path}: {source}")]
    Io {
        /// The file or folder being read or written.
        path: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file could not be parsed, or tensors could not be serialized into one.
    #[error("{file}: not a valid safetensors file: {reason}")]
    Safetensors {
        /// The file (or label) being parsed or written.
        file: String,
        /// What the safetensors parser or serializer reported.
        reason: String,
    },
    /// A tensor the format or adapter needs is absent from the checkpoint.
    #[error("missing tensor `{name}` in {file}")]
    MissingTensor {
        /// The tensor's full name, as looked up.
        name: String,
        /// The file or folder searched.
        file: String,
    },
    /// A checkpoint tensor has an element type the format does not accept.
    #[error("tensor `{name}`: expected dtype {expected}, found {found}")]
    Dtype {
        /// The tensor's name.
        name: String,
        /// The accepted dtype(s), as safetensors spells them (`F16`, `I32`, ...).
        expected: String,
        /// The dtype stored in the file.
        found: String,
    },
    /// A tensor, matrix or kernel operand has the wrong shape or element count.
    #[error("tensor `{name}`: expected shape {expected}, found {found:?}")]
    Shape {
        /// The tensor or operand.
        name: String,
        /// The shape or rule that was required, e.g. `[m, 4096]`.
        expected: String,
        /// The dimensions actually given (a length, for flat data).
        found: Vec<usize>,
    },
    /// A tensor holds NaN or an infinity where only finite values are valid (checked on load,
    /// before quantization, and on a safe merge).
    #[error("tensor `{name}` holds a non-finite value ({value}) at flat index {index}")]
    NonFinite {
        /// The tensor.
        name: String,
        /// Row-major index of the first offending element.
        index: usize,
        /// That element (NaN, `inf` or `-inf`).
        value: f32,
    },
    /// A configuration value is out of range or inconsistent: bit width, group size, axis,
    /// a `quantization_config` block, a kernel parameter.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The input is valid but this crate does not handle it: a format variant or option it
    /// does not implement, a shape beyond a kernel's limits, a feature the GPU lacks.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// An adapter cannot be loaded or attached: unknown or taken name, unsupported `peft_type`,
    /// a shape that does not fit the layer, or a load error wrapped with the adapter's name.
    #[error("adapter `{adapter}`: {reason}")]
    Adapter {
        /// The adapter's name.
        adapter: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Merging adapters into the base weight is not possible, e.g. the base is a forward-only
    /// format (GPTQ, EETQ) that cannot be re-quantized. The layer is left unchanged.
    #[error("merge refused: {0}")]
    Merge(String),
    /// No wgpu adapter (GPU) was found, or none matching the requested name.
    #[error("no GPU adapter: {0}")]
    NoGpu(String),
    /// Any other GPU-side failure: device request, device poll, shader preprocessing, a
    /// poisoned cache lock, a failed readback.
    #[error("GPU error: {0}")]
    Gpu(String),
    /// wgpu reported a validation error while building a pipeline or bind group or
    /// submitting work.
    #[error("GPU error during {during}: {source}")]
    Wgpu {
        /// The operation in progress (`submission`, `bind group`, `pipeline <family>`).
        during: String,
        /// wgpu's error.
        #[source]
        source: wgpu::Error,
    },
    /// A blocking wait for the GPU exceeded the context's timeout (the duration held). The
    /// submitted work is not cancelled.
    #[error(
        "timed out after {0:?} waiting for the GPU (the work goes on; wait longer with GpuContext::set_timeout)"
    )]
    Timeout(std::time::Duration),
    /// The device ran out of memory during a submission.
    #[error("GPU out of memory: {0}")]
    OutOfMemory(String),
    /// A GPU buffer could not be created: larger than the device's `max_buffer_size`, or
    /// refused for lack of memory.
    #[error("GPU buffer `{buffer}` of {bytes} bytes: {reason}")]
    Allocation {
        /// The buffer's label.
        buffer: String,
        /// Its requested size in bytes.
        bytes: u64,
        /// Why it was refused.
        reason: String,
    },
    /// A row range asked of a quantized weight is empty, out of bounds, or cuts through a
    /// quantization group (see [`RowSplit::rows`](crate::formats::split::RowSplit::rows)).
    #[error("rows {start}..{end} of a {rows}-row weight: {reason}")]
    RowSplit {
        /// First row of the range (inclusive).
        start: usize,
        /// End of the range (exclusive).
        end: usize,
        /// Rows (output features) of the whole weight.
        rows: usize,
        /// Which rule the range breaks.
        reason: String,
    },
    /// The GPU device was lost (driver reset, removal); everything built on its context must be
    /// built again on a new one.
    #[error("GPU device lost: {0}")]
    DeviceLost(String),
}

/// `std::result::Result` with the crate's [`Error`](enum@Error).
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn shape(name: &str, expected: impl Into<String>, found: &[usize]) -> Self {
        Error::Shape {
            name: name.to_string(),
            expected: expected.into(),
            found: found.to_vec(),
        }
    }

    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
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
