//! quantadapt: quantized linear layers (HQQ, GPTQ, EETQ) with PEFT adapters (OFT, LoRA, DoRA)
//! on any GPU through wgpu + WGSL, with a CPU reference for every kernel.

pub mod adapters;
pub mod bench;
pub mod checkpoint;
pub mod error;
pub mod formats;
pub mod io;
pub mod tensor;

pub use error::{Error, Result};
pub use tensor::Matrix;
pub mod golden;
pub mod golden_model;
pub mod gpu;
pub mod kernels;
pub mod layer;
pub mod merge;
pub mod model;
