//! Flat buckets for collectives: a module's gradients go through an all-reduce a few flat
//! buffers at a time rather than one call per tensor. A bucket is a run of consecutive
//! tensors of one kind and device, at most `bucket_bytes` together (a single larger tensor is
//! a bucket of its own); flattening concatenates them and unflattening copies the reduced
//! values back in place. The same buckets serve Gloo (through host memory) and NCCL (on the
//! device).

use crate::error::TrainError;
use std::ops::Range;
use tch::Tensor;

/// The buckets of `tensors`, as ranges of indices, in order.
pub fn plan(tensors: &[Tensor], bucket_bytes: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < tensors.len() {
        let (kind, device) = (tensors[start].kind(), tensors[start].device());
        let elt = kind.elt_size_in_bytes();
        let mut end = start;
        let mut bytes = 0;
        while end < tensors.len()
            && tensors[end].kind() == kind
            && tensors[end].device() == device
            && (end == start || bytes + tensors[end].numel() * elt <= bucket_bytes)
        {
            bytes += tensors[end].numel() * elt;
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// One flat tensor holding `bucket`'s values, in order, on their device.
pub fn flatten(bucket: &[Tensor]) -> Result<Tensor, TrainError> {
    let flats: Vec<Tensor> = bucket.iter().map(|t| t.reshape([-1])).collect();
    Ok(Tensor::f_cat(&flats, 0)?)
}

/// Copy `flat`'s values back into the tensors of `bucket` (in place: they are the module's
/// own gradient or state tensors).
pub fn unflatten(flat: &Tensor, bucket: &[Tensor]) -> Result<(), TrainError> {
    let mut offset = 0;
    for t in bucket {
        let n = t.numel() as i64;
        let mut dst = t.shallow_clone();
        dst.f_copy_(&flat.f_narrow(0, offset, n)?.f_view_as(t)?)?;
        offset += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn t(n: i64, kind: Kind) -> Tensor {
        Tensor::arange(n, (kind, Device::Cpu))
    }

    #[test]
    fn buckets_respect_the_size_the_kind_and_the_order() {
        // 4-byte floats: 10 + 10 fit 80 bytes, the third does not; a double starts anew; a
        // tensor larger than a bucket is a bucket of its own.
        let ts = [
            t(10, Kind::Float),
            t(10, Kind::Float),
            t(10, Kind::Float),
            t(2, Kind::Double),
            t(100, Kind::Float),
            t(1, Kind::Float),
        ];
        assert_eq!(plan(&ts, 80), [0..2, 2..3, 3..4, 4..5, 5..6]);
        assert_eq!(plan(&ts, 1 << 20), [0..3, 3..4, 4..6]);
        assert!(plan(&[], 80).is_empty());
    }

    #[test]
    fn unflatten_puts_back_what_flatten_took() {
        let ts = [
            Tensor::ones([2, 3], (Kind::Float, Device::Cpu)),
            t(4, Kind::Float),
            Tensor::zeros([1, 1, 2], (Kind::Float, Device::Cpu)),
        ];
        let flat = flatten(&ts).unwrap();
        assert_eq!(flat.size(), [12]);
        let reduced = &flat * 3.0 + 1.0;
        unflatten(&reduced, &ts).unwrap();
        let expect = [vec![4.0f32; 6], vec![1.0, 4.0, 7.0, 10.0], vec![1.0, 1.0]];
        for (tensor, want) in ts.iter().zip(expect) {
            let got: Vec<f32> = Vec::try_from(tensor.reshape([-1])).unwrap();
            assert_eq!(got, want);
        }
        assert_eq!(ts[0].size(), [2, 3], "shapes stay");
    }
}
