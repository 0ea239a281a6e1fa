//! The GPU side: device context, buffers, the shader registry and pipeline cache, timing.

pub mod buffers;
pub mod context;
mod ready;
pub mod shaders;
pub mod timing;

pub use buffers::{ActDtype, GpuTensor};
pub use context::{Allocations, GpuContext};
