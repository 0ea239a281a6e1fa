//! The GPU side: device context, buffers, the shader registry and pipeline cache, timing.

pub mod buffers;
pub mod context;
pub mod shaders;
pub mod timing;
pub mod validate;

pub use buffers::{ActDtype, GpuTensor};
pub use context::GpuContext;
