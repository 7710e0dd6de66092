//! `fetch`: downloads a public dataset from its canonical location, checks the published MD5
//! checksums and unpacks tarballs, so that [`open`](crate::open) finds the standard layout.
//!
//! Every file is written atomically: the body streams into `<name>.part` while it is hashed,
//! and only a complete file with the right checksum is renamed to `<name>`. A broken
//! connection or a wrong checksum removes the `.part` file and reports the URL and file.
//! Tarballs are unpacked into a hidden staging folder and moved into place when complete.

use crate::registry::spec;
use crate::DataError;
use md5::{Digest, Md5};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One file of a dataset's download manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    /// File name, appended to the base URL and used as the local name.
    pub name: String,
    /// Published MD5, lower-case hex.
    pub md5: String,
    /// A `.tar.gz` to unpack into the target folder.
    pub unpack: bool,
}

impl RemoteFile {
    fn new(name: &str, md5: &str, unpack: bool) -> Self {
        RemoteFile { name: name.into(), md5: md5.into(), unpack }
    }
}

#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Replaces the canonical host and path (mirrors, tests): file URLs become
    /// `<base_url>/<name>`.
    pub base_url: Option<String>,
    /// Replaces the built-in manifest (tests, private mirrors with other files).
    pub files: Option<Vec<RemoteFile>>,
    /// SVHN: also fetch `extra_32x32.mat` (1.3 GB).
    pub svhn_extra: bool,
    /// Download again even when a file with the right checksum is present.
    pub force: bool,
    pub connect_timeout: Duration,
    /// Longest silence while reading the body.
    pub read_timeout: Duration,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            base_url: None,
            files: None,
            svhn_extra: false,
            force: false,
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchStatus {
    Downloaded,
    /// Present with the right checksum; not downloaded again.
    AlreadyPresent,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FetchedFile {
    pub name: String,
    pub url: String,
    pub bytes: u64,
    pub status: FetchStatus,
    pub unpacked: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FetchReport {
    pub dataset: String,
    pub dir: PathBuf,
    pub files: Vec<FetchedFile>,
}

impl std::fmt::Display for FetchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} in {}:", self.dataset, self.dir.display())?;
        for file in &self.files {
            writeln!(
                f,
                "  {} ({} bytes, md5 ok){}{}",
                file.name,
                file.bytes,
                match file.status {
                    FetchStatus::Downloaded => format!(" downloaded from {}", file.url),
                    FetchStatus::AlreadyPresent => " already present".into(),
                },
                if file.unpacked { ", unpacked" } else { "" }
            )?;
        }
        Ok(())
    }
}

/// The canonical base URL and files of `name` (checksums as published by the dataset
/// authors and used by torchvision).
pub fn manifest(
    name: &str,
    svhn_extra: bool,
) -> Result<(&'static str, Vec<RemoteFile>), DataError> {
    let canonical = spec(name)?.name;
    let idx = |md5s: [&str; 4]| {
        [
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
        ]
        .iter()
        .zip(md5s)
        .map(|(n, m)| RemoteFile::new(n, m, false))
        .collect()
    };
    Ok(match canonical {
        "mnist" => (
            "https://ossci-datasets.s3.amazonaws.com/mnist",
            idx([
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "9fb629c4189551a2d022fa330f9573f3",
                "ec29112dd5afa0611ce80d1b7f02629c",
            ]),
        ),
        "fashion-mnist" => (
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
            idx([
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79",
                "bb300cfdad3c16e7a12a480ee83cd310",
            ]),
        ),
        "cifar10" => (
            "https://www.cs.toronto.edu/~kriz",
            vec![RemoteFile::new("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530", true)],
        ),
        "cifar100" => (
            "https://www.cs.toronto.edu/~kriz",
            vec![RemoteFile::new("cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8", true)],
        ),
        "svhn" => {
            let mut files = vec![
                RemoteFile::new("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373", false),
                RemoteFile::new("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3", false),
            ];
            if svhn_extra {
                files.push(RemoteFile::new("extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7", false));
            }
            ("http://ufldl.stanford.edu/housenumbers", files)
        }
        "stl10" => (
            "http://ai.stanford.edu/~acoates/stl10",
            vec![RemoteFile::new("stl10_binary.tar.gz", "91f7769df0f17e558f3565bffb0c7dfb", true)],
        ),
        "imagenet" => {
            return Err(DataError::NotFetchable {
                dataset: name.into(),
                reason: "ImageNet (ILSVRC-2012) is only distributed to registered users under its terms of \
                         access at image-net.org; download it yourself and arrange train/<wnid>/*.JPEG and \
                         val/<wnid>/*.JPEG"
                    .into(),
            })
        }
        "imagefolder" => {
            return Err(DataError::NotFetchable {
                dataset: name.into(),
                reason: "an image folder is your own data (or use `data make-imagefolder`)".into(),
            })
        }
        _ => {
            return Err(DataError::NotFetchable {
                dataset: name.into(),
                reason: "it is generated on the fly".into(),
            })
        }
    })
}

/// Downloads dataset `name` into `to`, verifying every file's MD5 and unpacking tarballs.
pub fn fetch(name: &str, to: &Path, opts: &FetchOptions) -> Result<FetchReport, DataError> {
    let (canonical_base, builtin) = manifest(name, opts.svhn_extra)?;
    let files = opts.files.clone().unwrap_or(builtin);
    let base = opts.base_url.as_deref().unwrap_or(canonical_base).trim_end_matches('/');
    std::fs::create_dir_all(to).map_err(|e| DataError::io(to, e))?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(opts.connect_timeout))
        .timeout_per_read(Some(opts.read_timeout))
        .build()
        .into();
    let mut report = FetchReport { dataset: name.into(), dir: to.into(), files: Vec::new() };
    for file in &files {
        let url = format!("{base}/{}", file.name);
        let dest = to.join(&file.name);
        let want = file.md5.to_ascii_lowercase();
        let present = !opts.force && dest.is_file() && md5_file(&dest)? == want;
        let (bytes, status) = if present {
            let len = std::fs::metadata(&dest).map_err(|e| DataError::io(&dest, e))?.len();
            (len, FetchStatus::AlreadyPresent)
        } else {
            tracing::info!("downloading {url}");
            (download(&agent, &url, &dest, &want)?, FetchStatus::Downloaded)
        };
        let unpacked =
            file.unpack && unpack_once(&dest, to, &want, status == FetchStatus::Downloaded)?;
        report.files.push(FetchedFile { name: file.name.clone(), url, bytes, status, unpacked });
    }
    Ok(report)
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn md5_file(path: &Path) -> Result<String, DataError> {
    let mut f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            return Ok(hex(&h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

/// Streams `url` into `dest.part`, hashing as it goes; renames it to `dest` only when the
/// body is complete and its MD5 is `md5`. The `.part` file never survives a failure.
fn download(agent: &ureq::Agent, url: &str, dest: &Path, md5: &str) -> Result<u64, DataError> {
    let part = part_path(dest);
    let fail = |reason: String| DataError::Download { url: url.into(), path: dest.into(), reason };
    let result = (|| {
        let mut response =
            agent.get(url).call().map_err(|e| fail(format!("request failed: {e}")))?;
        let announced = response.body().content_length();
        let mut body = response.body_mut().with_config().limit(u64::MAX).reader();
        let mut out = File::create(&part).map_err(|e| DataError::io(&part, e))?;
        let mut hasher = Md5::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            let n = body
                .read(&mut buf)
                .map_err(|e| fail(format!("connection broken after {total} bytes: {e}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(|e| DataError::io(&part, e))?;
            total += n as u64;
        }
        if let Some(len) = announced.filter(|&len| len != total) {
            return Err(fail(format!("connection closed after {total} of {len} bytes")));
        }
        out.sync_all().map_err(|e| DataError::io(&part, e))?;
        let actual = hex(&hasher.finalize());
        if actual != md5 {
            return Err(DataError::Checksum {
                url: url.into(),
                path: dest.into(),
                expected: md5.into(),
                actual,
            });
        }
        std::fs::rename(&part, dest).map_err(|e| DataError::io(dest, e))?;
        Ok(total)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result
}

/// Unpacks `archive` into `to` unless a marker says this exact archive (by MD5) was already
/// unpacked there. Returns whether it unpacked now.
fn unpack_once(archive: &Path, to: &Path, md5: &str, fresh: bool) -> Result<bool, DataError> {
    let name = archive.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let marker = to.join(format!(".{name}.unpacked"));
    if !fresh && std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == md5) {
        return Ok(false);
    }
    let staging = to.join(format!(".{name}.unpacking"));
    let io = |p: &Path, e| DataError::io(p, e);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| io(&staging, e))?;
    }
    std::fs::create_dir_all(&staging).map_err(|e| io(&staging, e))?;
    let result = (|| {
        let gz = flate2::read::GzDecoder::new(File::open(archive).map_err(|e| io(archive, e))?);
        // `unpack` refuses entries that would land outside `staging` (`..`, absolute paths).
        tar::Archive::new(gz)
            .unpack(&staging)
            .map_err(|e| DataError::format(archive, format!("cannot unpack tar.gz: {e}")))?;
        for entry in std::fs::read_dir(&staging).map_err(|e| io(&staging, e))? {
            let entry = entry.map_err(|e| io(&staging, e))?;
            let target = to.join(entry.file_name());
            if target.is_dir() {
                std::fs::remove_dir_all(&target).map_err(|e| io(&target, e))?;
            } else if target.exists() {
                std::fs::remove_file(&target).map_err(|e| io(&target, e))?;
            }
            std::fs::rename(entry.path(), &target).map_err(|e| io(&target, e))?;
        }
        std::fs::write(&marker, md5).map_err(|e| io(&marker, e))
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result.map(|()| true)
}
