//! GPU-resident tensors and buffer helpers. Data stays on the GPU between kernels; host copies
//! happen only in [`GpuTensor::upload`] and [`GpuTensor::download`].

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::tensor::Matrix;

/// Element type of activations on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActDtype {
    /// 32-bit floats.
    F32,
    /// 16-bit floats (needs `SHADER_F16`).
    F16,
}

impl ActDtype {
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
        }
    }

    /// The WGSL scalar type.
    pub fn wgsl(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        }
    }
}

/// A `[rows, cols]` row-major matrix in a GPU storage buffer, starting `offset` bytes in: a
/// tensor of the library's own, or a view of a host application's buffer.
#[derive(Clone, Debug)]
pub struct GpuTensor {
    /// The buffer holding the elements.
    pub buffer: wgpu::Buffer,
    /// Where the first element starts, in bytes.
    pub offset: u64,
    /// Rows (the batch).
    pub rows: usize,
    /// Columns (features).
    pub cols: usize,
    /// Element type.
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
    ctx.count_buffer();
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

const STORAGE_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// A read-only storage buffer holding `bytes`.
pub fn storage_from_bytes(ctx: &GpuContext, label: &str, bytes: &[u8]) -> Result<wgpu::Buffer> {
    let data = padded(bytes);
    check_binding_size(ctx, label, data.len())?;
    buffer_with(ctx, label, &data, STORAGE_USAGE)
}

/// A storage buffer holding `values`.
pub fn storage_from_f32(ctx: &GpuContext, label: &str, values: &[f32]) -> Result<wgpu::Buffer> {
    storage_from_bytes(ctx, label, bytemuck::cast_slice(values))
}

/// A uniform buffer holding `value`.
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
/// The f16 NaN written into fresh f16 outputs.
const POISON_F16: u16 = 0x7e01;

/// A storage buffer of `bytes` bytes for a kernel to write: zeroed, or filled with `pattern`
/// (repeated) when the context poisons outputs ([`GpuContext::set_debug_poison`]).
fn writable(ctx: &GpuContext, label: &str, bytes: usize, pattern: &[u8]) -> Result<wgpu::Buffer> {
    if ctx.debug_poison() {
        return storage_from_bytes(ctx, label, &pattern.repeat(bytes.div_ceil(pattern.len())));
    }
    let size = bytes.div_ceil(4).max(1) * 4;
    check_binding_size(ctx, label, size)?;
    create_buffer(
        ctx,
        &wgpu::BufferDescriptor {
            label: Some(label),
            size: size as u64,
            usage: STORAGE_USAGE,
            mapped_at_creation: false,
        },
    )
}

/// A storage buffer of `count` f32 for a kernel to write (NaN-filled under debug poisoning).
pub fn scratch_f32(ctx: &GpuContext, label: &str, count: usize) -> Result<wgpu::Buffer> {
    writable(ctx, label, count * 4, &POISON_F32.to_le_bytes())
}

/// A storage buffer of `count` f32 filled with NaN whatever the context's debug setting: for a
/// check's results, where an element a kernel failed to write must read as a failure.
pub fn nan_f32(ctx: &GpuContext, label: &str, count: usize) -> Result<wgpu::Buffer> {
    storage_from_bytes(ctx, label, &POISON_F32.to_le_bytes().repeat(count))
}

impl GpuTensor {
    /// Elements in the tensor.
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }

    /// Bytes the tensor's elements span.
    pub fn bytes(&self) -> u64 {
        (self.numel() * self.dtype.bytes()) as u64
    }

    /// A view of `rows x cols` elements of `dtype` in a buffer the caller owns, starting `offset`
    /// bytes in. The buffer needs `STORAGE` usage; the offset must be a multiple of the device's
    /// `min_storage_buffer_offset_alignment`, and the view must lie inside the buffer.
    pub fn view(
        ctx: &GpuContext,
        buffer: &wgpu::Buffer,
        offset: u64,
        rows: usize,
        cols: usize,
        dtype: ActDtype,
    ) -> Result<Self> {
        let view = Self {
            buffer: buffer.clone(),
            offset,
            rows,
            cols,
            dtype,
        };
        let fail = |reason: String| {
            Err(Error::shape(
                "tensor view",
                reason,
                &[offset as usize, rows, cols],
            ))
        };
        if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
            return fail("a buffer with STORAGE usage".into());
        }
        let align = ctx.limits().min_storage_buffer_offset_alignment as u64;
        if !offset.is_multiple_of(align) {
            return fail(format!(
                "an offset that is a multiple of this device's \
                 min_storage_buffer_offset_alignment ({align} bytes) [offset, rows, cols]"
            ));
        }
        if rows == 0 || cols == 0 || offset + view.binding_size() > buffer.size() {
            return fail(format!(
                "a non-empty view inside the buffer's {} bytes [offset, rows, cols]",
                buffer.size()
            ));
        }
        if dtype == ActDtype::F16 && !ctx.has_f16() {
            return Err(Error::Unsupported("f16 activations need SHADER_F16".into()));
        }
        Ok(view)
    }

    /// Bytes bound for a kernel: the elements, rounded up to whole 4-byte words.
    fn binding_size(&self) -> u64 {
        self.bytes().div_ceil(4) * 4
    }

    /// The binding of the tensor's elements (its range of the buffer).
    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: self.offset,
            size: std::num::NonZeroU64::new(self.binding_size()),
        })
    }

    /// A new tensor holding `m` converted to `dtype`.
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
            offset: 0,
            rows: m.rows,
            cols: m.cols,
            dtype,
        })
    }

    /// A new tensor for a kernel to write: zeroed, or NaN-filled under
    /// [`GpuContext::set_debug_poison`] so that elements a kernel fails to write show up.
    pub fn output(ctx: &GpuContext, rows: usize, cols: usize, dtype: ActDtype) -> Result<Self> {
        let poison: &[u8] = match dtype {
            ActDtype::F32 => &POISON_F32.to_le_bytes(),
            ActDtype::F16 => &POISON_F16.to_le_bytes(),
        };
        Ok(Self {
            buffer: writable(ctx, "output", rows * cols * dtype.bytes(), poison)?,
            offset: 0,
            rows,
            cols,
            dtype,
        })
    }

    fn to_matrix(&self, bytes: &[u8]) -> Result<Matrix> {
        let data = match self.dtype {
            ActDtype::F32 => bytemuck::pod_collect_to_vec(bytes),
            ActDtype::F16 => bytemuck::pod_collect_to_vec::<u8, half::f16>(bytes)
                .iter()
                .map(|h| h.to_f32())
                .collect(),
        };
        Matrix::new(self.rows, self.cols, data)
    }

    /// Copies the tensor back to the host as f32, waiting (at most the context's timeout) for
    /// the copy's own submission and the work queued before it. Native only.
    pub fn download(&self, ctx: &GpuContext) -> Result<Matrix> {
        let bytes = read_range(ctx, &self.buffer, self.offset, self.bytes() as usize)?;
        self.to_matrix(&bytes)
    }

    /// [`Self::download`] as a future that never blocks, for any executor and the web.
    pub async fn download_async(&self, ctx: &GpuContext) -> Result<Matrix> {
        let bytes = read_range_async(ctx, &self.buffer, self.offset, self.bytes() as usize).await?;
        self.to_matrix(&bytes)
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

/// [`read_f32`] as a future that never blocks, for any executor and the web.
pub async fn read_f32_async(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    count: usize,
) -> Result<Vec<f32>> {
    let bytes = read_range_async(ctx, buffer, 0, count * 4).await?;
    Ok(bytemuck::pod_collect_to_vec(&bytes))
}

/// Reads the first `len` bytes of a buffer (which must allow COPY_SRC) back to the host.
pub fn read_buffer(ctx: &GpuContext, buffer: &wgpu::Buffer, len: usize) -> Result<Vec<u8>> {
    read_range(ctx, buffer, 0, len)
}

/// A readback in flight: the staging buffer being mapped and where the mapping's result lands.
struct Readback {
    staging: wgpu::Buffer,
    len: usize,
    state: Arc<MapSignal>,
    index: wgpu::SubmissionIndex,
}

/// The mapping's result, set by its callback, with what waits for it: a blocked thread (the
/// condition variable) or a future (the waker).
#[derive(Default)]
struct MapSignal {
    state: Mutex<MapState>,
    done: Condvar,
}

#[derive(Default)]
struct MapState {
    result: Option<std::result::Result<(), wgpu::BufferAsyncError>>,
    waker: Option<Waker>,
}

/// Copies `len` bytes from `offset` into a staging buffer and asks for it to be mapped.
fn start_readback(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    offset: u64,
    len: usize,
) -> Result<Readback> {
    // Copies move whole 4-byte words.
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
    let index = ctx.submit(|enc| enc.copy_buffer_to_buffer(buffer, offset, &staging, 0, size))?;
    let state = Arc::new(MapSignal::default());
    let sink = Arc::clone(&state);
    let ((), validation, _) = ctx.capture(|| {
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            if let Ok(mut s) = sink.state.lock() {
                s.result = Some(r);
                if let Some(w) = s.waker.take() {
                    w.wake();
                }
            }
            sink.done.notify_all();
        })
    });
    if let Some(e) = validation {
        return Err(mapping_failed(ctx, format!("map_async: {e}")));
    }
    Ok(Readback {
        staging,
        len,
        state,
        index,
    })
}

/// A device lost meanwhile explains a failed mapping best.
fn mapping_failed(ctx: &GpuContext, what: String) -> Error {
    ctx.check_alive().err().unwrap_or(Error::Gpu(what))
}

impl Readback {
    /// The mapping's outcome, waiting at most `timeout` for its callback. After this thread's
    /// wait for the copy, the callback has run, or runs on another thread polling the device
    /// at the same time (wgpu fires a callback on whichever thread's poll finds it ready).
    fn outcome(
        &self,
        timeout: std::time::Duration,
    ) -> Option<std::result::Result<(), wgpu::BufferAsyncError>> {
        let state = self.state.state.lock().ok()?;
        let (state, _) = self
            .state
            .done
            .wait_timeout_while(state, timeout, |s| s.result.is_none())
            .ok()?;
        state.result.clone()
    }

    fn finish(
        self,
        ctx: &GpuContext,
        mapped: std::result::Result<(), wgpu::BufferAsyncError>,
    ) -> Result<Vec<u8>> {
        mapped.map_err(|e| mapping_failed(ctx, format!("map_async: {e}")))?;
        let view = self
            .staging
            .slice(..)
            .get_mapped_range()
            .map_err(|e| mapping_failed(ctx, format!("get_mapped_range: {e}")))?;
        let out = view[..self.len].to_vec();
        drop(view);
        self.staging.unmap();
        Ok(out)
    }
}

fn read_range(ctx: &GpuContext, buffer: &wgpu::Buffer, offset: u64, len: usize) -> Result<Vec<u8>> {
    // A browser runs the mapping's callback from its event loop, which a caller blocked here
    // would never give back (and wasm32's std cannot wait on a condition variable).
    if cfg!(target_arch = "wasm32") {
        return Err(Error::Unsupported(
            "a blocking readback cannot wait in a browser: use the async version \
             (download_async, forward_async, add_adapter_async)"
                .into(),
        ));
    }
    let readback = start_readback(ctx, buffer, offset, len)?;
    ctx.wait_for(readback.index.clone())?;
    match readback.outcome(ctx.timeout()) {
        Some(mapped) => readback.finish(ctx, mapped),
        None => Err(mapping_failed(
            ctx,
            "the readback's mapping did not complete".into(),
        )),
    }
}

async fn read_range_async(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>> {
    let readback = start_readback(ctx, buffer, offset, len)?;
    let mapped = MappedFuture {
        ctx,
        state: &readback.state,
    }
    .await?;
    readback.finish(ctx, mapped)
}

/// Resolves when a readback's mapping callback has run. On native backends, callbacks run only
/// when the device is polled, so each poll of this future polls the device once without
/// blocking and, if the copy is not done, asks its executor to poll again; on the web the
/// browser runs the callback, which wakes the future.
struct MappedFuture<'a> {
    ctx: &'a GpuContext,
    state: &'a Arc<MapSignal>,
}

impl Future for MappedFuture<'_> {
    type Output = Result<std::result::Result<(), wgpu::BufferAsyncError>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let native = !cfg!(target_arch = "wasm32");
        if native {
            if let Err(e) = self.ctx.poll_once() {
                return Poll::Ready(Err(e));
            }
        }
        let Ok(mut state) = self.state.state.lock() else {
            return Poll::Ready(Err(Error::Gpu("readback state poisoned".into())));
        };
        if let Some(result) = state.result.clone() {
            return Poll::Ready(Ok(result));
        }
        state.waker = Some(cx.waker().clone());
        if native {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}
