//! Names of run directories that people can read and sort: `runs/<name>-YYYYMMDD-HHMMSS` in
//! local time, with `-2`, `-3`, … appended when another run took the name in the same second.

use std::path::{Path, PathBuf};

/// Creates and returns a new directory `<root>/<name>-YYYYMMDD-HHMMSS[-N]`. The directory is
/// created here, atomically, so that two runs starting in the same second never share one.
pub fn create_run_dir(root: &Path, name: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(root)?;
    let stamp = local_timestamp();
    for n in 1u32.. {
        let dir = match n {
            1 => root.join(format!("{name}-{stamp}")),
            n => root.join(format!("{name}-{stamp}-{n}")),
        };
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    unreachable!("u32 suffixes exhausted")
}

/// Now as `YYYYMMDD-HHMMSS` in the local time zone (UTC if it cannot be determined).
pub fn local_timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which outlives the call; a null return
    // (never expected) leaves the zeroed `tm` untouched and is handled below.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = !unsafe { libc::localtime_r(&now, &mut tm) }.is_null();
    if !ok {
        // SAFETY: as above, for gmtime_r.
        unsafe { libc::gmtime_r(&now, &mut tm) };
    }
    format!(
        "{:04}{:02}{:02}-{:02}{:02}{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_time_and_never_collide() {
        let root = tempfile::tempdir().unwrap();
        let a = create_run_dir(root.path(), "mlaan-dgl-resnet8").unwrap();
        let b = create_run_dir(root.path(), "mlaan-dgl-resnet8").unwrap();
        assert_ne!(a, b);
        assert!(a.is_dir() && b.is_dir());
        let name = a.file_name().unwrap().to_str().unwrap().to_string();
        let stamp = name.strip_prefix("mlaan-dgl-resnet8-").expect("prefix");
        let (date, time) = stamp.split_once('-').expect("date-time");
        assert_eq!((date.len(), time.len()), (8, 6), "{name}");
        assert!(date.chars().chain(time.chars()).all(|c| c.is_ascii_digit()), "{name}");
        assert!(date.starts_with("20"), "{name}");
    }
}
