//! One module per shader family: GPU-resident weights, bind groups and dispatch.

pub mod hqq;

/// Workgroup grid for `count` workgroups, split over x and y past the 65535-per-dimension limit.
pub(crate) fn grid(count: u32) -> (u32, u32) {
    const MAX: u32 = 65535;
    if count <= MAX {
        (count.max(1), 1)
    } else {
        (MAX, count.div_ceil(MAX))
    }
}

/// Which matmul kernel runs: a GEMV for a few rows, a tiled GEMM for many.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPath {
    Gemv,
    Tiled,
}

/// Rows of x up to which the GEMV runs (each invocation keeps one accumulator per row).
pub const GEMV_MAX_ROWS: usize = 8;

impl MatmulPath {
    pub fn for_rows(rows: usize) -> Self {
        if rows <= GEMV_MAX_ROWS {
            Self::Gemv
        } else {
            Self::Tiled
        }
    }
}
