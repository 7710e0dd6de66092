//! `fetch` against an HTTP server on 127.0.0.1 inside the test (never the real network).

mod common;

use md5::{Digest, Md5};
use mlaan_core::config::DataConfig;
use mlaan_data::fetch::FetchStatus;
use mlaan_data::{fetch, open, DataError, FetchOptions, RemoteFile};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the server answers one path.
#[derive(Clone)]
enum Reply {
    Full(Vec<u8>),
    /// Announces the full length, sends half, closes the connection.
    Truncated(Vec<u8>),
}

/// A one-thread HTTP/1.1 server answering GETs from `routes` (404 otherwise). It stops when
/// dropped, and after 20 s at the latest.
struct Server {
    base: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(routes: HashMap<String, Reply>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&req).lines().next().unwrap_or("").to_string();
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let _ = match routes.get(&path) {
                    Some(Reply::Full(body)) => {
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        conn.write_all(head.as_bytes()).and_then(|_| conn.write_all(body))
                    }
                    Some(Reply::Truncated(body)) => {
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        conn.write_all(head.as_bytes())
                            .and_then(|_| conn.write_all(&body[..body.len() / 2]))
                    }
                    None => conn.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    ),
                };
                let _ = conn.flush();
            }
        });
        Server { base, stop, thread: Some(thread) }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn md5_hex(b: &[u8]) -> String {
    Md5::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// A CIFAR-10 binary tarball with two records per file.
fn cifar_tarball() -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let files = [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ];
    for (i, name) in files.iter().enumerate() {
        let imgs = vec![common::pattern(i, 3072), common::pattern(i + 9, 3072)];
        let data = common::cifar_file(&[vec![i as u8], vec![9]], &imgs);
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, format!("cifar-10-batches-bin/{name}"), &data[..]).unwrap();
    }
    common::gz(&tar.into_inner().unwrap())
}

fn opts(base: &str, files: Vec<RemoteFile>) -> FetchOptions {
    FetchOptions {
        base_url: Some(base.into()),
        files: Some(files),
        read_timeout: Duration::from_secs(5),
        ..FetchOptions::default()
    }
}

fn remote(name: &str, md5: &str, unpack: bool) -> RemoteFile {
    RemoteFile { name: name.into(), md5: md5.into(), unpack }
}

#[test]
fn downloads_verifies_unpacks_and_then_reuses() {
    let tarball = cifar_tarball();
    let server = Server::start(HashMap::from([(
        "/mirror/cifar-10-binary.tar.gz".to_string(),
        Reply::Full(tarball.clone()),
    )]));
    let dir = tempfile::tempdir().unwrap();
    let o = opts(
        &format!("{}/mirror/", server.base),
        vec![remote("cifar-10-binary.tar.gz", &md5_hex(&tarball), true)],
    );
    let report = fetch("cifar10", dir.path(), &o).unwrap();
    assert_eq!(report.files[0].status, FetchStatus::Downloaded);
    assert!(report.files[0].unpacked);
    assert_eq!(report.files[0].bytes, tarball.len() as u64);
    assert!(report.to_string().contains("downloaded from http://127.0.0.1"));
    let ds = open(&DataConfig {
        dataset: "cifar10".into(),
        dir: Some(dir.path().into()),
        ..DataConfig::default()
    })
    .unwrap();
    assert_eq!((ds.train.len(), ds.test.len()), (10, 2));
    assert_eq!(ds.train.get(2).unwrap().image, common::pattern(1, 3072));
    // Second run: nothing downloaded or unpacked again.
    let again = fetch("cifar10", dir.path(), &o).unwrap();
    assert_eq!(again.files[0].status, FetchStatus::AlreadyPresent);
    assert!(!again.files[0].unpacked);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".part") || n.ends_with(".unpacking"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn checksum_mismatch_keeps_no_file() {
    let body = b"not the real file".to_vec();
    let server =
        Server::start(HashMap::from([("/train_32x32.mat".to_string(), Reply::Full(body))]));
    let dir = tempfile::tempdir().unwrap();
    let o = opts(
        &server.base,
        vec![remote("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373", false)],
    );
    let err = fetch("svhn", dir.path(), &o).unwrap_err();
    assert!(matches!(err, DataError::Checksum { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("train_32x32.mat")
            && msg.contains("/train_32x32.mat")
            && msg.contains("e26dedcc"),
        "{msg}"
    );
    assert!(!dir.path().join("train_32x32.mat").exists());
    assert!(!dir.path().join("train_32x32.mat.part").exists());
}

#[test]
fn broken_connection_keeps_no_file() {
    let body: Vec<u8> = (0..200_000).map(|i| (i % 251) as u8).collect();
    let server = Server::start(HashMap::from([(
        "/t10k-labels-idx1-ubyte.gz".to_string(),
        Reply::Truncated(body.clone()),
    )]));
    let dir = tempfile::tempdir().unwrap();
    let o = opts(&server.base, vec![remote("t10k-labels-idx1-ubyte.gz", &md5_hex(&body), false)]);
    let err = fetch("mnist", dir.path(), &o).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::Download { .. }), "{msg}");
    assert!(msg.contains("t10k-labels-idx1-ubyte.gz") && msg.contains("127.0.0.1"), "{msg}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "no partial or final file");
}

#[test]
fn missing_url_and_unfetchable_datasets() {
    let server = Server::start(HashMap::new());
    let dir = tempfile::tempdir().unwrap();
    let o = opts(&server.base, vec![remote("stl10_binary.tar.gz", "00", true)]);
    let msg = fetch("stl10", dir.path(), &o).unwrap_err().to_string();
    assert!(msg.contains("stl10_binary.tar.gz") && msg.contains("404"), "{msg}");
    let msg = fetch("imagenet", dir.path(), &FetchOptions::default()).unwrap_err().to_string();
    assert!(msg.contains("image-net.org"), "{msg}");
    assert!(fetch("synthetic", dir.path(), &FetchOptions::default()).is_err());
    assert!(fetch("nope", dir.path(), &FetchOptions::default())
        .unwrap_err()
        .to_string()
        .contains("unknown dataset"));
}

#[test]
fn manifests_carry_the_published_checksums() {
    let (base, files) = mlaan_data::fetch::manifest("cifar10", false).unwrap();
    assert!(base.starts_with("https://www.cs.toronto.edu"));
    assert_eq!(files[0].md5, "c32a1d4ab5d03f1284b67883e8d87530");
    assert_eq!(mlaan_data::fetch::manifest("svhn", true).unwrap().1.len(), 3);
    assert_eq!(mlaan_data::fetch::manifest("fashion-mnist", false).unwrap().1.len(), 4);
}
