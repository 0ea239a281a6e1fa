//! Futures that native wgpu resolves at once, taken without an executor.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use crate::error::{Error, Result};

/// The value of `future` if it is ready on its first poll, as wgpu's futures are on native
/// backends (requesting adapters and devices, popping error scopes). Where it is not (the
/// web), `what` is refused with [`Error::Unsupported`]: use the async version there.
pub(crate) fn ready_now<T>(future: impl Future<Output = T>, what: &str) -> Result<T> {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(value) => Ok(value),
        Poll::Pending => Err(Error::Unsupported(format!(
            "{what} cannot block on this platform: use its async version"
        ))),
    }
}
