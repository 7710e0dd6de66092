//! Checkpoints: `ckpt/step-NNNNNNNN/`, taken at a drained pipeline boundary (no batch in
//! flight, no cascade gradient pending), so that resuming is exact for every schedule.
//!
//! ```text
//! ckpt/step-00001200/
//!   stage-0.safetensors   modules of stage 0: m{i}.state.<name> (backbone, aux, LAM, ema.*),
//!   stage-1.safetensors   m{i}.momentum.<param>, m{i}.step, m{i}.emaq.* (EMA snapshots not
//!                         folded yet), m{i}.loss_scale (fp16: scale, clean steps, skips)
//!   meta.json             step, epoch position, schedule, placement, seed, file sizes and CRC32s
//!   config.toml           the resolved config
//!   COMPLETE              written last: only a directory with it is a checkpoint
//! ```
//!
//! Writing is atomic: everything goes to `.tmp-step-N/`, each file is fsynced, `COMPLETE` is
//! written and fsynced, then the directory is renamed and its parent fsynced. A process killed
//! at any point leaves either the previous checkpoints untouched or a `.tmp-*` directory that
//! loading ignores.

pub mod resume;

use mlaan_core::config::RunConfig;
use mlaan_core::placement::Placement;
use mlaan_engine::wire::ModuleSnapshot;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

const MARKER: &str = "COMPLETE";

/// What a checkpoint says about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointMeta {
    /// Optimizer steps (training batches) completed.
    pub step: u64,
    pub steps_per_epoch: u64,
    pub method: String,
    pub arch: String,
    pub k: usize,
    pub schedule: String,
    pub seed: u64,
    /// Data-parallel replicas that trained it (older checkpoints: one).
    #[serde(default = "one")]
    pub world_size: usize,
    /// Images per step over every replica (older checkpoints: 0, unknown).
    #[serde(default)]
    pub global_batch: usize,
    /// Module ranges per stage when it was written (any placement can load it).
    pub placement: Vec<[usize; 2]>,
    /// File name → (bytes, CRC32).
    pub files: BTreeMap<String, (u64, u32)>,
}

fn one() -> usize {
    1
}

impl CheckpointMeta {
    /// What a checkpoint of the run `cfg` at `step` records about itself (the files are added
    /// as they are written); `resume::check_compatible` checks the same fields.
    pub fn of(
        cfg: &RunConfig,
        k: usize,
        placement: &Placement,
        step: u64,
        steps_per_epoch: u64,
        world_size: usize,
    ) -> Self {
        CheckpointMeta {
            step,
            steps_per_epoch,
            method: cfg.method.name.to_string(),
            arch: cfg.model.arch.clone(),
            k,
            schedule: cfg.pipeline.schedule.to_string(),
            seed: cfg.train.seed,
            world_size,
            global_batch: cfg.train.batch_size * world_size,
            placement: placement.groups.iter().map(|g| [g.start, g.end]).collect(),
            files: BTreeMap::new(),
        }
    }

    /// Epoch and batch within it where training continues.
    pub fn position(&self) -> (usize, u64) {
        ((self.step / self.steps_per_epoch) as usize, self.step % self.steps_per_epoch)
    }
}

/// A loaded checkpoint.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub meta: CheckpointMeta,
    pub modules: Vec<ModuleSnapshot>,
}

/// Why a checkpoint could not be written or read; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be read or written; the I/O error is the source.
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is there but its contents are not what a checkpoint holds.
    #[error("{}: {message}", path.display())]
    Corrupt { path: PathBuf, message: String },
    #[error("{}", path.display())]
    Tensors {
        path: PathBuf,
        #[source]
        source: tch::TchError,
    },
}

fn io(path: &Path, source: std::io::Error) -> CheckpointError {
    CheckpointError::Io { path: path.to_path_buf(), source }
}

fn corrupt(path: &Path, message: String) -> CheckpointError {
    CheckpointError::Corrupt { path: path.to_path_buf(), message }
}

fn torch_at(path: &Path) -> impl FnOnce(tch::TchError) -> CheckpointError + '_ {
    move |source| CheckpointError::Tensors { path: path.to_path_buf(), source }
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))
}

fn crc_of(path: &Path) -> Result<(u64, u32), CheckpointError> {
    let bytes = std::fs::read(path).map_err(|e| io(path, e))?;
    Ok((bytes.len() as u64, crc32fast::hash(&bytes)))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = File::create(path).map_err(|e| io(path, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| io(path, e))
}

/// Name of the checkpoint directory for `step`.
pub fn dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Write a checkpoint of `modules` under `root` and keep only the newest `keep_last`.
/// `pause_before_marker` (drills) sleeps before the marker so a test can kill the writer.
pub fn write(
    root: &Path,
    mut meta: CheckpointMeta,
    modules: &[ModuleSnapshot],
    config_toml: &str,
    keep_last: usize,
    pause_before_marker: Option<std::time::Duration>,
) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
    let name = dir_name(meta.step);
    let tmp = root.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    for (s, range) in meta.placement.clone().iter().enumerate() {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for m in modules.iter().filter(|m| (range[0]..range[1]).contains(&m.module)) {
            let p = format!("m{}", m.module);
            tensors
                .extend(m.state.iter().map(|(n, t)| (format!("{p}.state.{n}"), t.shallow_clone())));
            tensors.extend(
                m.momentum.iter().map(|(n, t)| (format!("{p}.momentum.{n}"), t.shallow_clone())),
            );
            tensors.push((format!("{p}.step"), Tensor::from_slice(&[m.step as i64])));
            if let Some(v) = m.loss_scale {
                tensors.push((format!("{p}.loss_scale"), Tensor::from_slice(&v)));
            }
            for (block, step, params) in &m.ema_backlog {
                for (k, t) in params.iter().enumerate() {
                    tensors.push((format!("{p}.emaq.{block}.{step:08}.{k:03}"), t.shallow_clone()));
                }
            }
        }
        let file = format!("stage-{s}.safetensors");
        let path = tmp.join(&file);
        Tensor::write_safetensors(&tensors, &path).map_err(torch_at(&path))?;
        File::open(&path).and_then(|f| f.sync_all()).map_err(|e| io(&path, e))?;
        meta.files.insert(file, crc_of(&path)?);
    }
    write_synced(&tmp.join("config.toml"), config_toml.as_bytes())?;
    let meta_json = serde_json::to_vec_pretty(&meta).expect("the metadata is plain data");
    write_synced(&tmp.join("meta.json"), &meta_json)?;
    if let Some(d) = pause_before_marker {
        std::thread::sleep(d);
    }
    write_synced(&tmp.join(MARKER), name.as_bytes())?;
    sync_dir(&tmp)?;
    let dir = root.join(&name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| io(&dir, e))?;
    sync_dir(root)?;
    prune(root, keep_last)?;
    Ok(dir)
}

/// Complete checkpoint directories under `root`, oldest first.
pub fn list(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-"))
                        && p.join(MARKER).is_file()
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn prune(root: &Path, keep_last: usize) -> Result<(), CheckpointError> {
    let all = list(root);
    for old in all.iter().take(all.len().saturating_sub(keep_last.max(1))) {
        // Remove the marker first: a half-deleted directory is never mistaken for a checkpoint.
        std::fs::remove_file(old.join(MARKER)).map_err(|e| io(old, e))?;
        std::fs::remove_dir_all(old).map_err(|e| io(old, e))?;
    }
    Ok(())
}

/// The newest checkpoint under `root` that loads; broken ones are skipped with a warning
/// naming them.
pub fn latest(root: &Path) -> Result<Option<Checkpoint>, CheckpointError> {
    for d in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if d.file_name().to_string_lossy().starts_with(".tmp-") {
            tracing::warn!("ignoring half-written checkpoint {}", d.path().display());
        }
    }
    for dir in list(root).into_iter().rev() {
        match read(&dir) {
            Ok(c) => return Ok(Some(c)),
            Err(e) => tracing::warn!("skipping checkpoint {}: {e}", dir.display()),
        }
    }
    Ok(None)
}

/// Load and verify one checkpoint directory.
pub fn read(dir: &Path) -> Result<Checkpoint, CheckpointError> {
    if !dir.join(MARKER).is_file() {
        return Err(corrupt(dir, format!("no {MARKER} marker: not a complete checkpoint")));
    }
    let meta_path = dir.join("meta.json");
    let text = std::fs::read_to_string(&meta_path).map_err(|e| io(&meta_path, e))?;
    let meta: CheckpointMeta =
        serde_json::from_str(&text).map_err(|e| corrupt(&meta_path, e.to_string()))?;
    let mut by_module: BTreeMap<usize, ModuleSnapshot> = BTreeMap::new();
    // (module, real block, step) → parameters by index.
    let mut backlogs: BTreeMap<(usize, String, u64), BTreeMap<usize, Tensor>> = BTreeMap::new();
    for (file, &(bytes, crc)) in &meta.files {
        let path = dir.join(file);
        let got = crc_of(&path)?;
        if got != (bytes, crc) {
            return Err(corrupt(
                &path,
                format!(
                    "{} bytes with CRC32 {:08x}, expected {bytes} bytes with {crc:08x} \
                     (corrupt or truncated)",
                    got.0, got.1
                ),
            ));
        }
        for (name, t) in Tensor::read_safetensors(&path).map_err(torch_at(&path))? {
            let bad = || corrupt(&path, format!("unexpected tensor `{name}`"));
            let (m, rest) =
                name.strip_prefix('m').and_then(|r| r.split_once('.')).ok_or_else(bad)?;
            let m: usize = m.parse().map_err(|_| bad())?;
            let snap = by_module.entry(m).or_insert_with(|| ModuleSnapshot::initial(m, Vec::new()));
            if let Some(n) = rest.strip_prefix("state.") {
                snap.state.push((n.to_string(), t));
            } else if let Some(n) = rest.strip_prefix("momentum.") {
                snap.momentum.push((n.to_string(), t));
            } else if rest == "step" {
                snap.step = t.to_kind(Kind::Int64).int64_value(&[0]) as u64;
            } else if rest == "loss_scale" {
                let v: Vec<f64> =
                    Vec::try_from(t.to_kind(Kind::Double).flatten(0, -1)).map_err(|_| bad())?;
                snap.loss_scale = Some(v.try_into().map_err(|_| bad())?);
            } else if let Some(q) = rest.strip_prefix("emaq.") {
                // `<block>.<step>.<k>`; the block name itself contains a dot.
                let mut parts = q.rsplitn(3, '.');
                let (k, step, block) = (parts.next(), parts.next(), parts.next());
                let (Some(k), Some(step), Some(block)) = (k, step, block) else {
                    return Err(bad());
                };
                let step: u64 = step.parse().map_err(|_| bad())?;
                let k: usize = k.parse().map_err(|_| bad())?;
                backlogs.entry((m, block.to_string(), step)).or_default().insert(k, t);
            } else {
                return Err(bad());
            }
        }
    }
    for ((m, block, step), params) in backlogs {
        if let Some(snap) = by_module.get_mut(&m) {
            snap.ema_backlog.push((block, step, params.into_values().collect()));
        }
    }
    let modules: Vec<ModuleSnapshot> = by_module.into_values().collect();
    if modules.len() != meta.k || modules.iter().enumerate().any(|(i, m)| m.module != i) {
        return Err(corrupt(
            dir,
            format!(
                "holds modules {:?}, expected 0..{}",
                modules.iter().map(|m| m.module).collect::<Vec<_>>(),
                meta.k
            ),
        ));
    }
    Ok(Checkpoint { dir: dir.to_path_buf(), meta, modules })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(module: usize, v: f32) -> ModuleSnapshot {
        ModuleSnapshot {
            module,
            state: vec![("layer1.0.conv1.weight".into(), Tensor::from_slice(&[v, v + 1.0]))],
            momentum: vec![("layer1.0.conv1.weight".into(), Tensor::from_slice(&[0.5f32, v]))],
            step: 7,
            ema_backlog: vec![(
                "layer3.0".into(),
                6,
                vec![Tensor::from_slice(&[v]), Tensor::from_slice(&[1.0f32])],
            )],
            loss_scale: Some([32768.0, 12.0, 1.0]),
        }
    }

    fn meta(step: u64) -> CheckpointMeta {
        CheckpointMeta {
            step,
            steps_per_epoch: 5,
            method: "dgl".into(),
            arch: "resnet8".into(),
            k: 2,
            schedule: "async".into(),
            seed: 0,
            world_size: 1,
            global_batch: 8,
            placement: vec![[0, 1], [1, 2]],
            files: BTreeMap::new(),
        }
    }

    #[test]
    fn round_trip_keep_last_and_corruption() {
        let root = tempfile::tempdir().unwrap();
        for step in [3, 6, 9] {
            write(root.path(), meta(step), &[snap(0, step as f32), snap(1, 2.0)], "x = 1", 2, None)
                .unwrap();
        }
        let names: Vec<String> = list(root.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into())
            .collect();
        assert_eq!(names, vec!["step-00000006", "step-00000009"]);
        let c = latest(root.path()).unwrap().unwrap();
        assert_eq!(c.meta.step, 9);
        assert_eq!(c.meta.position(), (1, 4));
        assert_eq!(c.modules.len(), 2);
        assert_eq!(c.modules[0].step, 7);
        assert_eq!(c.modules[0].loss_scale, Some([32768.0, 12.0, 1.0]));
        assert_eq!(Vec::<f32>::try_from(&c.modules[0].state[0].1).unwrap(), vec![9.0, 10.0]);
        let (block, step, params) = &c.modules[0].ema_backlog[0];
        assert_eq!((block.as_str(), *step, params.len()), ("layer3.0", 6, 2));
        assert_eq!(Vec::<f32>::try_from(&params[0]).unwrap(), vec![9.0]);
        // Corrupt the newest: it is skipped, the previous one is used.
        let f = root.path().join("step-00000009/stage-1.safetensors");
        let mut bytes = std::fs::read(&f).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 0xff;
        std::fs::write(&f, bytes).unwrap();
        let e = read(&root.path().join("step-00000009")).err().unwrap().to_string();
        assert!(e.contains("stage-1.safetensors") && e.contains("corrupt"), "{e}");
        assert_eq!(latest(root.path()).unwrap().unwrap().meta.step, 6);
        // A half-written directory is never listed.
        std::fs::create_dir_all(root.path().join(".tmp-step-00000012")).unwrap();
        std::fs::create_dir_all(root.path().join("step-00000015")).unwrap();
        assert_eq!(latest(root.path()).unwrap().unwrap().meta.step, 6);
    }
}
