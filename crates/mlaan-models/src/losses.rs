//! Losses of the local objectives. Under mixed precision each is computed in float32 on
//! float32 inputs, with autocast off where libtorch's policy would otherwise pick the dtype
//! (CUDA autocast refuses `binary_cross_entropy` outright), as PyTorch's AMP recipes do.

use mlaan_accel::without_autocast;
use tch::{Kind, Reduction, Tensor};

/// Mean cross-entropy of `logits` (N, C) against integer `labels` (N), in float32.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Tensor {
    without_autocast(logits.device(), || {
        logits.to_kind(Kind::Float).cross_entropy_for_logits(labels)
    })
}

/// Mean binary cross-entropy of a reconstruction in (0,1) against the image in [0,1], in
/// float32.
pub fn reconstruction_bce(reconstruction: &Tensor, image: &Tensor) -> Tensor {
    without_autocast(reconstruction.device(), || {
        reconstruction.to_kind(Kind::Float).binary_cross_entropy::<Tensor>(
            &image.to_kind(Kind::Float),
            None,
            Reduction::Mean,
        )
    })
}

/// Supervised-contrastive loss (Khosla et al., 2020) with one view per sample, as InfoPro uses
/// it: `features` (N, D) are L2-normalised here; positives are the other samples of the same
/// class; anchors without positives contribute 0. Base temperature equals `temperature`.
pub fn supervised_contrastive(features: &Tensor, labels: &Tensor, temperature: f64) -> Tensor {
    // Exponentials of similarities over a temperature lose too much in 16 bits.
    without_autocast(features.device(), || {
        supcon_f32(&features.to_kind(Kind::Float), labels, temperature)
    })
}

fn supcon_f32(features: &Tensor, labels: &Tensor, temperature: f64) -> Tensor {
    let n = features.size()[0];
    let device = features.device();
    let f = features / features.norm_scalaropt_dim(2.0, [1i64].as_slice(), true).clamp_min(1e-12);
    let sim = f.matmul(&f.transpose(0, 1)) / temperature;
    // Subtract the row maximum (a constant per row) for numerical stability.
    let (row_max, _) = sim.max_dim(1, true);
    let logits = &sim - row_max.detach();
    let not_self =
        Tensor::ones([n, n], (Kind::Float, device)) - Tensor::eye(n, (Kind::Float, device));
    let labels = labels.view([-1, 1]);
    let positives = labels.eq_tensor(&labels.transpose(0, 1)).to_kind(Kind::Float) * &not_self;
    let exp = logits.exp() * &not_self;
    let log_prob = &logits - exp.sum_dim_intlist(1, true, Kind::Float).log();
    let pos_count = positives.sum_dim_intlist(1, false, Kind::Float);
    let pos_count = &pos_count + pos_count.eq(0.0).to_kind(Kind::Float);
    let mean_log_prob_pos =
        (&positives * log_prob).sum_dim_intlist(1, false, Kind::Float) / pos_count;
    -mean_log_prob_pos.mean(Kind::Float)
}

/// Number of correct top-1 predictions.
pub fn correct(logits: &Tensor, labels: &Tensor) -> i64 {
    logits.argmax(1, false).eq_tensor(labels).sum(Kind::Int64).int64_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supcon_matches_hand_computation() {
        // Two classes, three samples: 0 and 1 share a class, 2 is alone.
        let f = Tensor::from_slice(&[1.0f32, 0.0, 0.6, 0.8, 0.0, 1.0]).view([3, 2]);
        let y = Tensor::from_slice(&[0i64, 0, 1]);
        let t = 0.5;
        let loss = supervised_contrastive(&f, &y, t).double_value(&[]);
        // Anchor 0: sims to 1 and 2 are 0.6/t and 0/t; positive is 1.
        let a0 = -((0.6f64 / t) - ((0.6f64 / t).exp() + 0.0f64.exp()).ln());
        // Anchor 1: sims to 0 is 0.6/t, to 2 is 0.8/t; positive 0.
        let a1 = -((0.6f64 / t) - ((0.6f64 / t).exp() + (0.8f64 / t).exp()).ln());
        // Anchor 2 has no positive: contributes 0.
        let expect = (a0 + a1) / 3.0;
        assert!((loss - expect).abs() < 1e-5, "{loss} vs {expect}");
    }

    #[test]
    fn cross_entropy_of_uniform_logits_is_log_c() {
        let logits = Tensor::zeros([4, 10], (Kind::Float, tch::Device::Cpu));
        let y = Tensor::from_slice(&[0i64, 3, 5, 9]);
        let l = cross_entropy(&logits, &y).double_value(&[]);
        assert!((l - 10f64.ln()).abs() < 1e-6);
    }
}
