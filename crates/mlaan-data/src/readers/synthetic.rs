//! A generated dataset for tests and smoke runs: each class is a coloured sinusoidal grating
//! with its own frequency, orientation and colour, shifted and noised per sample, so a small
//! network learns it in a few steps. Samples are generated in `get`; nothing is stored.

use crate::loader::mix;
use crate::{DataError, Dataset, ImageShape, Sample};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub struct Synthetic {
    title: String,
    len: usize,
    classes: usize,
    shape: ImageShape,
    /// Distinguishes the splits: the same index gives different images in train and test.
    salt: u64,
}

impl Synthetic {
    pub fn new(title: &str, len: usize, classes: usize, shape: ImageShape, salt: u64) -> Self {
        Synthetic { title: title.into(), len, classes: classes.max(1), shape, salt }
    }
}

impl Dataset for Synthetic {
    fn len(&self) -> usize {
        self.len
    }
    fn num_classes(&self) -> usize {
        self.classes
    }
    fn get(&self, index: usize) -> Result<Sample, DataError> {
        if index >= self.len {
            return Err(DataError::IndexOutOfRange {
                dataset: self.title.clone(),
                index,
                len: self.len,
            });
        }
        let label = self.label(index);
        let c = label as u64;
        // Class pattern: fixed by the class only.
        let mut class_rng = ChaCha8Rng::seed_from_u64(mix(&[0x5f37_c1a5, c]));
        let fx = 1.0 + (c % 3) as f32;
        let fy = (c / 3 % 3) as f32;
        let colour: Vec<f32> =
            (0..self.shape.channels).map(|_| class_rng.random_range(0.3f32..1.0)).collect();
        let class_phase = class_rng.random_range(0.0f32..std::f32::consts::TAU);
        // Sample variation: a small phase shift and pixel noise, small enough that even a
        // linear model separates the classes.
        let mut rng = ChaCha8Rng::seed_from_u64(mix(&[self.salt, index as u64]));
        let phase = class_phase + rng.random_range(-0.6f32..0.6);
        let (h, w) = (self.shape.height as f32, self.shape.width as f32);
        let mut image = Vec::with_capacity(self.shape.len());
        for col in &colour {
            for y in 0..self.shape.height {
                for x in 0..self.shape.width {
                    let t = std::f32::consts::TAU * (fx * x as f32 / w + fy * y as f32 / h) + phase;
                    let noise = rng.random_range(-24.0f32..24.0);
                    let v = 128.0 + 90.0 * col * t.sin() + noise;
                    image.push(v.clamp(0.0, 255.0) as u8);
                }
            }
        }
        Ok(Sample { image, shape: self.shape, label })
    }
    fn label(&self, index: usize) -> u32 {
        if index < self.len {
            (index % self.classes) as u32
        } else {
            u32::MAX
        }
    }
    fn describe(&self) -> String {
        format!(
            "{}: {} images {}, {} classes (generated)",
            self.title, self.len, self.shape, self.classes
        )
    }
}
