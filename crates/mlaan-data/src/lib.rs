//! Dataset readers, augmentation and the loader (work in progress).
