//! The NCCL unique id of a communicator: rank 0 makes it (`ncclGetUniqueId`) and publishes its
//! 128 bytes in the c10d store under the group's key; every other rank waits for them there,
//! as long as the store's timeout allows — what PyTorch's ProcessGroupNCCL does.

use crate::{DistError, Store};

/// Bytes of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const ID_BYTES: usize = 128;

/// The store key of group `group`'s id.
pub fn key(group: &str) -> String {
    format!("nccl/{group}/unique-id")
}

/// Group `group`'s unique id on every rank: made by `make` on rank 0 and published, read from
/// the store elsewhere (waiting up to the store's timeout). An id of the wrong size is an
/// error naming the group.
pub fn exchange(
    store: &Store,
    group: &str,
    rank: usize,
    make: impl FnOnce() -> Result<[u8; ID_BYTES], DistError>,
) -> Result<[u8; ID_BYTES], DistError> {
    let key = key(group);
    if rank == 0 {
        let id = make()?;
        store.set(&key, &id)?;
        return Ok(id);
    }
    let bytes = store.get(&key, store.timeout())?;
    bytes.as_slice().try_into().map_err(|_| DistError::Store {
        addr: store.addr().to_string(),
        op: format!("get {key}"),
        message: format!("an NCCL unique id has {ID_BYTES} bytes, this one {}", bytes.len()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// Rank 0's id reaches every rank through the store; the others never make one.
    #[test]
    fn rank_0_makes_the_id_and_every_rank_reads_it() {
        let port = free_port();
        let timeout = Duration::from_secs(10);
        let server = Store::serve("127.0.0.1", port, timeout).unwrap();
        let id: [u8; ID_BYTES] = std::array::from_fn(|i| (i * 7 % 251) as u8);
        let readers: Vec<_> = (1..3)
            .map(|rank| {
                std::thread::spawn(move || {
                    let store = Store::connect("127.0.0.1", port, timeout).unwrap();
                    exchange(&store, "module3", rank, || panic!("rank {rank} made an id"))
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(exchange(&server, "module3", 0, || Ok(id)).unwrap(), id);
        for r in readers {
            assert_eq!(r.join().unwrap().unwrap(), id);
        }
    }

    #[test]
    fn a_wrong_sized_id_or_none_at_all_is_an_error_naming_the_key() {
        let port = free_port();
        let server = Store::serve("127.0.0.1", port, Duration::from_millis(300)).unwrap();
        server.set(&key("module1"), &[1, 2, 3]).unwrap();
        let e = exchange(&server, "module1", 1, || unreachable!()).unwrap_err().to_string();
        assert!(e.contains("nccl/module1/unique-id") && e.contains("128 bytes"), "{e}");
        // Rank 0 never came: the wait ends with the store's timeout.
        let e = exchange(&server, "module2", 1, || unreachable!()).unwrap_err().to_string();
        assert!(e.contains("nccl/module2/unique-id"), "{e}");
    }
}
