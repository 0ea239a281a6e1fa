//! quantadapt runs quantized linear layers (HQQ, GPTQ, EETQ) with PEFT adapters (OFT, LoRA,
//! rsLoRA, DoRA) on any GPU through wgpu and WGSL, with a CPU reference for every kernel.
//!
//! # Architecture
//!
//! [`formats`] holds each quantization format's storage, loading and CPU dequantization, and
//! [`adapters`] each PEFT adapter's parameters, configuration and CPU math. [`kernels`] puts them
//! on the GPU: one module per shader family (`shaders/`), each turning resident weights and
//! tensors into [`kernels::Dispatch`]es, bound launches that record into any compute pass.
//! [`gpu`] is what the kernels stand on: the device context ([`gpu::GpuContext`], the library's
//! own device or a host app's), tensors and views of the host's buffers
//! ([`gpu::GpuTensor`]), the shader preprocessor and the pipeline cache. [`layer::QuantLinear`]
//! holds one base weight with named adapters and schedules the kernels: it builds a
//! [`layer::ForwardPlan`] once per (state, rows, tensors) and records it into the caller's
//! encoder ([`layer::QuantLinear::encode_forward`]) without submitting or waiting; the
//! blocking and async conveniences (`forward`, `forward_async`, downloads) wait only for
//! their own submission, within the context's timeout.
//!
//! # Features
//!
//! `default-features = false` gives the kernels' library alone. `cli` (default) adds the
//! `quantadapt` command with `bench` (the performance suite and its yardstick kernels) and
//! `golden` (the runner of golden vector sets); `random` adds [`Matrix::random`].
//!
//! # Example
//!
//! ```no_run
//! use quantadapt::formats::hqq::{HqqConfig, HqqWeight};
//! use quantadapt::formats::QuantWeight;
//! use quantadapt::gpu::GpuContext;
//! use quantadapt::layer::{Backend, QuantLinear};
//! use quantadapt::Matrix;
//!
//! # fn main() -> quantadapt::Result<()> {
//! let w = Matrix::new(2, 64, (0..128).map(|i| (i as f32 * 0.37).sin()).collect())?;
//! let base = QuantWeight::Hqq(HqqWeight::quantize(&w, None, &HqqConfig::new(4, 64, 1))?);
//! let backend = match GpuContext::new() {
//!     Ok(ctx) => Backend::Gpu(Box::new(ctx)),
//!     Err(_) => Backend::Cpu,
//! };
//! let layer = QuantLinear::new(base, backend)?;
//! let y = layer.forward(&Matrix::new(1, 64, vec![1.0; 64])?)?;
//! assert_eq!((y.rows, y.cols), (1, 2));
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod adapters;
#[cfg(feature = "bench")]
pub mod bench;
pub mod checkpoint;
pub mod error;
pub mod formats;
#[cfg(feature = "golden")]
pub mod golden;
#[cfg(feature = "golden")]
pub mod golden_model;
pub mod gpu;
pub mod io;
pub mod kernels;
pub mod layer;
pub mod merge;
pub mod model;
pub mod tensor;
pub mod tune;

pub use error::{Error, Result};
pub use tensor::Matrix;
