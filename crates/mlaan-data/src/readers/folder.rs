//! ImageFolder layout (also ImageNet): `<split>/<class>/**/<file>`; classes are the sorted
//! sub-folder names of the training split, files are sorted, and images are decoded lazily
//! in `get`/`load_into` so that opening ImageNet costs one directory walk.

use crate::{image, DataError, Dataset, ImageShape, Sample, SampleRng, Transform};
use std::path::{Path, PathBuf};

pub struct ImageFolder {
    title: String,
    root: PathBuf,
    classes: Vec<String>,
    /// Path relative to `root`, and class.
    files: Vec<(PathBuf, u32)>,
    /// Larger images are refused before decoding (`data.max_image_pixels`).
    max_pixels: u64,
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<std::fs::DirEntry>, DataError> {
    let mut entries = std::fs::read_dir(dir)
        .and_then(|rd| rd.collect::<Result<Vec<_>, _>>())
        .map_err(|e| DataError::io(dir, e))?;
    entries.retain(|e| !e.file_name().to_string_lossy().starts_with('.'));
    entries.sort_by_key(|e| e.file_name());
    Ok(entries)
}

/// Every non-hidden file under `dir`, sorted, depth-first.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    for e in read_dir_sorted(dir)? {
        let path = e.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

impl ImageFolder {
    /// The class folders of `root` (sorted), for the training split.
    pub fn scan_classes(root: &Path) -> Result<Vec<String>, DataError> {
        if !root.is_dir() {
            return Err(DataError::format(root, "split folder does not exist"));
        }
        let classes: Vec<String> = read_dir_sorted(root)?
            .into_iter()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if classes.is_empty() {
            return Err(DataError::format(root, "no class sub-folders"));
        }
        Ok(classes)
    }

    /// Lists `root/<class>/**` for the given classes. A split may lack some classes (a small
    /// validation set) but may not hold a class unknown to `classes`, and no class folder that
    /// is present may be empty. Images of more than `max_pixels` pixels are refused when read.
    pub fn open(
        root: &Path,
        classes: &[String],
        title: &str,
        max_pixels: u64,
    ) -> Result<Self, DataError> {
        let present = Self::scan_classes(root)?;
        let mut files = Vec::new();
        for name in &present {
            let label = classes.iter().position(|c| c == name).ok_or_else(|| {
                DataError::format(root.join(name), "class folder not present in the training split")
            })?;
            let dir = root.join(name);
            let mut found = Vec::new();
            walk(&dir, &mut found)?;
            if found.is_empty() {
                return Err(DataError::format(&dir, "empty class folder (no image files)"));
            }
            files.extend(found.into_iter().map(|p| {
                let rel = p.strip_prefix(root).map(Path::to_path_buf).unwrap_or(p);
                (rel, label as u32)
            }));
        }
        Ok(ImageFolder {
            title: title.into(),
            root: root.to_path_buf(),
            classes: classes.to_vec(),
            files,
            max_pixels,
        })
    }

    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    pub fn path(&self, index: usize) -> Option<PathBuf> {
        self.files.get(index).map(|(p, _)| self.root.join(p))
    }

    /// The path, label and bytes of sample `index`.
    fn read(&self, index: usize) -> Result<(PathBuf, u32, Vec<u8>), DataError> {
        let (rel, label) = self.files.get(index).ok_or_else(|| DataError::IndexOutOfRange {
            dataset: self.title.clone(),
            index,
            len: self.files.len(),
        })?;
        let path = self.root.join(rel);
        let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
        Ok((path, *label, bytes))
    }
}

impl std::fmt::Debug for ImageFolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn num_classes(&self) -> usize {
        self.classes.len()
    }
    fn get(&self, index: usize) -> Result<Sample, DataError> {
        let (path, label, bytes) = self.read(index)?;
        let (image, shape) = image::decode(&bytes, &path, self.max_pixels)?;
        Ok(Sample { image, shape, label })
    }
    fn load_into(
        &self,
        index: usize,
        transform: &Transform,
        rng: &mut SampleRng,
        out: &mut Vec<u8>,
    ) -> Result<(ImageShape, u32), DataError> {
        let (path, label, bytes) = self.read(index)?;
        let shape = image::decode_transformed(&bytes, &path, self.max_pixels, transform, rng, out)?;
        Ok((shape, label))
    }
    fn label(&self, index: usize) -> u32 {
        self.files.get(index).map_or(u32::MAX, |f| f.1)
    }
    fn describe(&self) -> String {
        format!(
            "{}: {} images (JPEG/PNG, variable size), {} classes ({})",
            self.title,
            self.files.len(),
            self.classes.len(),
            self.root.display()
        )
    }
}
