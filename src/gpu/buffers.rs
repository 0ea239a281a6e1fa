//! GPU-resident tensors and buffer helpers. Data stays on the GPU between kernels; host copies
//! happen only in [`GpuTensor::upload`] and [`GpuTensor::download`].

use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::tensor::Matrix;

/// Element type of activations on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActDtype {
    F32,
    F16,
}

impl ActDtype {
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
        }
    }

    pub fn wgsl(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        }
    }
}

/// A `[rows, cols]` row-major matrix living in a GPU storage buffer.
#[derive(Clone, Debug)]
pub struct GpuTensor {
    pub buffer: wgpu::Buffer,
    pub rows: usize,
    pub cols: usize,
    pub dtype: ActDtype,
}

/// Storage buffer sizes are padded to 4 bytes (WGSL reads whole words).
fn padded(bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    v.resize(bytes.len().div_ceil(4).max(1) * 4, 0);
    v
}

/// Creates a buffer. A lost device fails with [`Error::DeviceLost`]; a buffer the device
/// refuses (over `max_buffer_size`, out of memory) fails with [`Error::Allocation`] naming it.
pub fn create_buffer(ctx: &GpuContext, desc: &wgpu::BufferDescriptor<'_>) -> Result<wgpu::Buffer> {
    ctx.check_alive()?;
    let (buffer, validation, oom) = ctx.capture(|| ctx.device.create_buffer(desc));
    let reason = match (oom, validation) {
        (Some(e), _) => format!("out of GPU memory: {e}"),
        (None, Some(e)) => e.to_string(),
        (None, None) => return Ok(buffer),
    };
    ctx.check_alive()?;
    Err(Error::Allocation {
        buffer: desc.label.unwrap_or("unnamed").to_string(),
        bytes: desc.size,
        reason,
    })
}

/// A buffer holding `contents` (a multiple of 4 bytes, not empty), written at creation.
fn buffer_with(
    ctx: &GpuContext,
    label: &str,
    contents: &[u8],
    usage: wgpu::BufferUsages,
) -> Result<wgpu::Buffer> {
    let buffer = create_buffer(
        ctx,
        &wgpu::BufferDescriptor {
            label: Some(label),
            size: contents.len() as u64,
            usage,
            mapped_at_creation: true,
        },
    )?;
    let mut view = buffer.get_mapped_range_mut(..).map_err(|e| {
        ctx.check_alive()
            .err()
            .unwrap_or_else(|| Error::Gpu(format!("buffer `{label}`: {e}")))
    })?;
    view.copy_from_slice(contents);
    drop(view);
    buffer.unmap();
    Ok(buffer)
}

/// A read-only storage buffer holding `bytes`.
pub fn storage_from_bytes(ctx: &GpuContext, label: &str, bytes: &[u8]) -> Result<wgpu::Buffer> {
    let data = padded(bytes);
    check_binding_size(ctx, label, data.len())?;
    buffer_with(
        ctx,
        label,
        &data,
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
    )
}

pub fn storage_from_f32(ctx: &GpuContext, label: &str, values: &[f32]) -> Result<wgpu::Buffer> {
    storage_from_bytes(ctx, label, bytemuck::cast_slice(values))
}

pub fn uniform<T: bytemuck::Pod>(ctx: &GpuContext, label: &str, value: &T) -> Result<wgpu::Buffer> {
    buffer_with(
        ctx,
        label,
        &padded(bytemuck::bytes_of(value)),
        wgpu::BufferUsages::UNIFORM,
    )
}

fn check_binding_size(ctx: &GpuContext, label: &str, bytes: usize) -> Result<()> {
    let limit = ctx.limits().max_storage_buffer_binding_size;
    if bytes as u64 > limit {
        return Err(Error::Allocation {
            buffer: label.to_string(),
            bytes: bytes as u64,
            reason: format!(
                "over this device's storage binding limit (max_storage_buffer_binding_size) of \
                 {limit} bytes"
            ),
        });
    }
    Ok(())
}

/// Bit pattern written into fresh outputs so that elements a kernel fails to write show up (NaN).
pub const POISON_F32: u32 = 0x7fc0_dead;

/// A storage buffer of `count` f32 filled with NaN poison, so elements a kernel fails to write
/// show up.
pub fn poisoned_f32(ctx: &GpuContext, label: &str, count: usize) -> Result<wgpu::Buffer> {
    storage_from_bytes(ctx, label, &POISON_F32.to_le_bytes().repeat(count))
}

impl GpuTensor {
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }

    pub fn upload(ctx: &GpuContext, m: &Matrix, dtype: ActDtype) -> Result<Self> {
        let bytes: Vec<u8> = match dtype {
            ActDtype::F32 => bytemuck::cast_slice(&m.data).to_vec(),
            ActDtype::F16 => {
                if !ctx.has_f16() {
                    return Err(Error::Unsupported("f16 activations need SHADER_F16".into()));
                }
                let h: Vec<half::f16> = m.data.iter().map(|v| half::f16::from_f32(*v)).collect();
                bytemuck::cast_slice(&h).to_vec()
            }
        };
        Ok(Self {
            buffer: storage_from_bytes(ctx, "activation", &bytes)?,
            rows: m.rows,
            cols: m.cols,
            dtype,
        })
    }

    /// An output tensor filled with NaN poison.
    pub fn poisoned(ctx: &GpuContext, rows: usize, cols: usize, dtype: ActDtype) -> Result<Self> {
        let bytes: Vec<u8> = match dtype {
            ActDtype::F32 => POISON_F32.to_le_bytes().repeat(rows * cols),
            ActDtype::F16 => 0x7e01u16.to_le_bytes().repeat(rows * cols),
        };
        Ok(Self {
            buffer: storage_from_bytes(ctx, "output", &bytes)?,
            rows,
            cols,
            dtype,
        })
    }

    /// Copies the tensor back to the host as f32.
    pub fn download(&self, ctx: &GpuContext) -> Result<Matrix> {
        let bytes = read_buffer(ctx, &self.buffer, self.numel() * self.dtype.bytes())?;
        let data = match self.dtype {
            ActDtype::F32 => bytemuck::pod_collect_to_vec(&bytes),
            ActDtype::F16 => bytemuck::pod_collect_to_vec::<u8, half::f16>(&bytes)
                .iter()
                .map(|h| h.to_f32())
                .collect(),
        };
        Matrix::new(self.rows, self.cols, data)
    }
}

/// Reads the first `count` f32 values of a buffer (which must allow COPY_SRC) back to the host.
pub fn read_f32(ctx: &GpuContext, buffer: &wgpu::Buffer, count: usize) -> Result<Vec<f32>> {
    // pod_collect_to_vec copies, so the byte vector's alignment does not matter.
    Ok(bytemuck::pod_collect_to_vec(&read_buffer(
        ctx,
        buffer,
        count * 4,
    )?))
}

/// Reads the first `len` bytes of a buffer (which must allow COPY_SRC) back to the host.
pub fn read_buffer(ctx: &GpuContext, buffer: &wgpu::Buffer, len: usize) -> Result<Vec<u8>> {
    let size = (len.div_ceil(4).max(1) * 4) as u64;
    let staging = create_buffer(
        ctx,
        &wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        },
    )?;
    ctx.submit(|enc| enc.copy_buffer_to_buffer(buffer, 0, &staging, 0, size))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let ((), validation, _) = ctx.capture(|| {
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        })
    });
    ctx.wait()?;
    // A device lost meanwhile explains a failed mapping best.
    let failed = |what: String| ctx.check_alive().err().unwrap_or(Error::Gpu(what));
    if let Some(e) = validation {
        return Err(failed(format!("map_async: {e}")));
    }
    rx.recv()
        .map_err(|_| failed("readback callback dropped".into()))?
        .map_err(|e| failed(format!("map_async: {e}")))?;
    let view = staging
        .slice(..)
        .get_mapped_range()
        .map_err(|e| failed(format!("get_mapped_range: {e}")))?;
    let out = view[..len].to_vec();
    drop(view);
    staging.unmap();
    Ok(out)
}
