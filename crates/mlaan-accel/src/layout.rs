//! Channels-last (NHWC) memory format, which cuDNN's tensor-core convolutions prefer. The
//! logical shape stays NCHW; only the strides change, so every op gives the same numbers.

use crate::{call, ffi, status, AccelError};
use tch::Tensor;

/// A channels-last copy of a 4-d tensor (other ranks are returned as they are).
pub fn to_channels_last(tensor: &Tensor) -> Result<Tensor, AccelError> {
    if tensor.dim() != 4 {
        return Ok(tensor.shallow_clone());
    }
    // SAFETY: `as_ptr` is the `at::Tensor*` tch owns; the bridge returns a new heap tensor,
    // which `from_ptr` takes ownership of.
    let ptr = call(
        "channels-last",
        |err| unsafe { ffi::ma_channels_last(tensor.as_ptr() as *mut _, err) },
        |p| p.is_null(),
    )?;
    Ok(unsafe { Tensor::from_ptr(ptr.cast()) })
}

/// Re-lay a 4-d parameter out channels-last in place (its data, not the variable: the
/// optimizer and autograd keep seeing the same tensor). Others are left alone.
pub fn set_channels_last(tensor: &Tensor) -> Result<(), AccelError> {
    // SAFETY: `set_data` on the tensor tch owns; no pointer is kept.
    status("channels-last", |err| unsafe {
        ffi::ma_set_data_channels_last(tensor.as_ptr() as *mut _, err)
    })
}

/// Whether a tensor is 4-d and laid out channels-last.
pub fn is_channels_last(tensor: &Tensor) -> bool {
    // SAFETY: reads the strides of a live tensor.
    unsafe { ffi::ma_is_channels_last(tensor.as_ptr() as *mut _) != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn channels_last_changes_strides_not_values() {
        let x = Tensor::randn([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        assert!(!is_channels_last(&x));
        let y = to_channels_last(&x).unwrap();
        assert!(is_channels_last(&y));
        assert_eq!(y.stride(), vec![60, 1, 15, 3]);
        assert!(y.equal(&x));
    }

    #[test]
    fn a_parameter_is_relaid_in_place_and_keeps_its_gradient_identity() {
        let w = Tensor::randn([4, 3, 3, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let before = w.detach().copy();
        set_channels_last(&w).unwrap();
        assert!(is_channels_last(&w));
        assert!(w.requires_grad());
        assert!(w.detach().equal(&before));
        let x = Tensor::randn([1, 3, 6, 6], (Kind::Float, Device::Cpu));
        x.conv2d(&w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1).sum(Kind::Float).backward();
        assert_eq!(w.grad().size(), vec![4, 3, 3, 3]);
        let bias = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        set_channels_last(&bias).unwrap();
        assert!(!is_channels_last(&bias));
    }
}
