//! The few layers the networks need, written out so that batch-norm statistics can be frozen
//! for recomputed forwards (MLAAN recomputes modules; their running statistics must move once
//! per batch, not once per forward).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use tch::nn::{self, Init};
use tch::Tensor;

thread_local! {
    /// Storages saved for backward by the ops run since `count_saved` started, by address.
    static SAVED: RefCell<Option<HashMap<usize, u64>>> = const { RefCell::new(None) };
}

thread_local! {
    /// Multiply-accumulates of the convolutions and linear layers run since `count_macs`
    /// started.
    static MACS: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Add `n()` to the count when one is running (training runs without: no work then).
fn note_macs(n: impl FnOnce() -> u64) {
    MACS.with(|m| {
        if let Some(c) = m.get() {
            m.set(Some(c + n()));
        }
    });
}

/// Run `f` and return the multiply-accumulates its convolutions and linear layers did: the
/// arithmetic of a forward pass, counted as it runs (heads, decoders and LAM chains alike).
pub fn count_macs<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let outer = MACS.with(|m| m.replace(Some(0)));
    let out = f();
    let inner = MACS.with(|m| m.take()).unwrap_or(0);
    // A region counted inside another is part of the outer one too.
    MACS.with(|m| m.set(outer.map(|o| o + inner)));
    (out, inner)
}

/// Note that autograd keeps `t` alive for the backward pass (counted once per storage).
pub fn saved(t: &Tensor) {
    SAVED.with(|s| {
        if let Some(map) = s.borrow_mut().as_mut() {
            let bytes = t.numel() as u64 * t.kind().elt_size_in_bytes() as u64;
            map.insert(t.data_ptr() as usize, bytes);
        }
    });
}

/// Note `bytes` that an op's backward keeps besides tensors one can name here (a layer norm's
/// statistics, attention's log-sum-exp), filed under the op's output `out` (an address no
/// tensor starts at, so it never merges with another entry).
fn saved_extra(out: &Tensor, bytes: u64) {
    SAVED.with(|s| {
        if let Some(map) = s.borrow_mut().as_mut() {
            map.insert(out.data_ptr() as usize + 1, bytes);
        }
    });
}

/// Run `f` and return the bytes of the tensors its ops saved for backward: the memory its
/// autograd graph holds. The layers below report what each op saves (convolution, batch norm
/// and linear keep their input; ReLU and sigmoid their output; max-pool its input and indices).
pub fn count_saved<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let outer = SAVED.with(|s| s.borrow_mut().replace(HashMap::new()));
    let out = f();
    let inner = SAVED.with(|s| s.borrow_mut().take()).unwrap_or_default();
    let bytes = inner.values().sum();
    // A region counted inside another is part of the outer one too.
    SAVED.with(|s| {
        *s.borrow_mut() = outer.map(|mut o| {
            o.extend(inner);
            o
        })
    });
    (out, bytes)
}

/// ReLU in place, reporting its saved output. It takes the tensor by value because it
/// overwrites it: callers pass a fresh result (a batch norm's, a linear layer's or a sum) whose
/// backward does not need it, so no copy is made (torchvision's `ReLU(inplace=True)`).
pub fn relu(mut x: Tensor) -> Tensor {
    let y = x.relu_();
    saved(&y);
    y
}

/// How a forward pass treats batch normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Batch statistics; running statistics are updated.
    Train,
    /// Batch statistics; running statistics are left alone (recomputation).
    Recompute,
    /// Running statistics (evaluation).
    Eval,
}

/// He-normal initialisation (fan-out) of convolutions, as torchvision's ResNets and VGGs and
/// the MLAAN code.
pub const HE_FAN_OUT: Init = Init::Kaiming {
    dist: nn::init::NormalOrUniform::Normal,
    fan: nn::init::FanInOut::FanOut,
    non_linearity: nn::init::NonLinearity::ReLU,
};

/// 2-D convolution.
#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    /// A k×k convolution padded to keep the size at stride 1 (`k/2`), He-normal (fan-out)
    /// weights and, with `bias`, PyTorch's default bias (uniform ±1/√fan_in).
    pub fn new(p: nn::Path, cin: usize, cout: usize, k: usize, stride: usize, bias: bool) -> Self {
        let bound = 1.0 / ((cin * k * k) as f64).sqrt();
        let bias = bias.then_some(Init::Uniform { lo: -bound, up: bound });
        Conv2d::with_init(p, [cin, cout, k, stride, k / 2], HE_FAN_OUT, bias)
    }

    /// Any convolution: `[in, out, kernel, stride, padding]`, the weights' and the bias's
    /// initialisation (no bias: `None`).
    pub fn with_init(p: nn::Path, shape: [usize; 5], weight: Init, bias: Option<Init>) -> Self {
        let [cin, cout, k, stride, padding] = shape.map(|v| v as i64);
        Conv2d {
            weight: p.var("weight", &[cout, cin, k, k], weight),
            bias: bias.map(|init| p.var("bias", &[cout], init)),
            stride,
            padding,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        saved(x);
        let y = x.conv2d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        );
        // Each output element: C_in · k · k multiply-accumulates.
        note_macs(|| {
            let per_output = self.weight.numel() / self.weight.size()[0].max(1) as usize;
            (y.numel() * per_output) as u64
        });
        y
    }
}

/// Batch normalisation over dimension 1 (momentum 0.1, eps 1e-5, as PyTorch): of feature
/// maps (N, C, H, W), or of pooled features (N, C) as `BatchNorm1d`.
#[derive(Debug)]
pub struct BatchNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
}

impl BatchNorm2d {
    pub fn new(p: nn::Path, c: usize) -> Self {
        let c = c as i64;
        BatchNorm2d {
            weight: p.var("weight", &[c], Init::Const(1.0)),
            bias: p.var("bias", &[c], Init::Const(0.0)),
            running_mean: p.zeros_no_train("running_mean", &[c]),
            running_var: p.ones_no_train("running_var", &[c]),
        }
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Tensor {
        let cudnn = x.device().is_cuda();
        if mode != Mode::Eval {
            saved(x);
        }
        match mode {
            Mode::Train => x.batch_norm(
                Some(&self.weight),
                Some(&self.bias),
                Some(&self.running_mean),
                Some(&self.running_var),
                true,
                0.1,
                1e-5,
                cudnn,
            ),
            Mode::Recompute => x.batch_norm(
                Some(&self.weight),
                Some(&self.bias),
                None::<&Tensor>,
                None,
                true,
                0.1,
                1e-5,
                cudnn,
            ),
            Mode::Eval => x.batch_norm(
                Some(&self.weight),
                Some(&self.bias),
                Some(&self.running_mean),
                Some(&self.running_var),
                false,
                0.1,
                1e-5,
                cudnn,
            ),
        }
    }
}

/// Fully connected layer with PyTorch's default initialisation (uniform ±1/√fan_in).
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    pub fn new(p: nn::Path, cin: usize, cout: usize) -> Self {
        let bound = 1.0 / (cin as f64).sqrt();
        let init = Init::Uniform { lo: -bound, up: bound };
        Linear::with_init(p, cin, cout, init, init)
    }

    /// Weights drawn from N(0, std²) and zero biases: timm's ViT linears (std 0.02; its
    /// truncation at ±2 is ±100σ there, so no truncation at all) and torchvision's VGG
    /// classifier (std 0.01).
    pub fn normal(p: nn::Path, cin: usize, cout: usize, std: f64) -> Self {
        let weight = Init::Randn { mean: 0.0, stdev: std };
        Linear::with_init(p, cin, cout, weight, Init::Const(0.0))
    }

    pub fn with_init(p: nn::Path, cin: usize, cout: usize, weight: Init, bias: Init) -> Self {
        Linear {
            weight: p.var("weight", &[cout as i64, cin as i64], weight),
            bias: p.var("bias", &[cout as i64], bias),
        }
    }

    /// `x` (…, in) → (…, out): a batch of vectors, or of token sequences.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        saved(x);
        let y = x.linear(&self.weight, Some(&self.bias));
        note_macs(|| (y.numel() * self.weight.size()[1] as usize) as u64);
        y
    }
}

/// Layer normalisation over the last dimension (affine, weight 1 and bias 0 at the start).
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(p: nn::Path, d: usize, eps: f64) -> Self {
        LayerNorm {
            weight: p.var("weight", &[d as i64], Init::Const(1.0)),
            bias: p.var("bias", &[d as i64], Init::Const(0.0)),
            eps,
        }
    }

    /// Its backward keeps the input and a mean and reciprocal deviation per normalised
    /// vector (float32).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        saved(x);
        let d = self.weight.size();
        let y = x.layer_norm(&d, Some(&self.weight), Some(&self.bias), self.eps, true);
        let vectors = (x.numel() / d[0].max(1) as usize) as u64;
        saved_extra(&y, 2 * vectors * 4);
        y
    }
}

/// GELU (the exact, erf form: timm's and PyTorch's default); its backward keeps the input.
pub fn gelu(x: &Tensor) -> Tensor {
    saved(x);
    x.gelu("none")
}

/// Multi-head scaled-dot-product attention through libtorch's fused kernel (flash or
/// memory-efficient on CUDA, the flash kernel on CPU): `q`, `k`, `v` are (N, heads, T, d).
/// Its backward keeps the inputs, the output and one log-sum-exp per query and head.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    for t in [q, k, v] {
        saved(t);
    }
    let o = Tensor::scaled_dot_product_attention(
        q,
        k,
        v,
        None::<&Tensor>,
        0.0,
        false,
        None::<f64>,
        false,
    );
    saved(&o);
    let s = q.size();
    saved_extra(&o, (s[0] * s[1] * s[2]) as u64 * 4);
    // QKᵀ and its product with V: T·T·d multiply-accumulates each, per sample and head.
    note_macs(|| 2 * (s[0] * s[1] * s[2] * s[2] * s[3]) as u64);
    o
}

/// 2x2 max-pool of stride 2 (torchvision VGG's, rounding down); keeps its indices.
pub fn max_pool2(x: &Tensor) -> Tensor {
    let (y, indices) = x.max_pool2d_with_indices([2, 2], [2, 2], [0, 0], [1, 1], false);
    saved(&indices);
    y
}

/// Global max-pool to a (N, C) matrix; keeps its indices.
pub fn global_max_pool(x: &Tensor) -> Tensor {
    let (y, indices) = x.adaptive_max_pool2d([1, 1]);
    saved(&indices);
    y.flatten(1, -1)
}

/// Global average pool to a (N, C) matrix.
pub fn global_avg_pool(x: &Tensor) -> Tensor {
    x.mean_dim(&[-1i64, -2][..], false, x.kind())
}
