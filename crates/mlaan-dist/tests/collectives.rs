//! Real c10d on loopback: two ranks as two threads of this process (Gloo does not care), a
//! store served on a free port.

use mlaan_dist::{Bind, DistError, Group, Store};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use tch::Tensor;

const T: Duration = Duration::from_secs(20);

fn local() -> Bind {
    Bind::Address("127.0.0.1".into())
}

/// A served store and a second client of it.
fn stores() -> (Arc<Store>, Arc<Store>) {
    let server = Store::serve("127.0.0.1", 0, T).unwrap();
    let client = Store::connect("127.0.0.1", server.port(), T).unwrap();
    (Arc::new(server), Arc::new(client))
}

/// Run `f(rank, group)` on two ranks of a group `name`; returns their results by rank.
fn on_two<R: Send + 'static>(
    name: &'static str,
    timeout: Duration,
    f: impl Fn(usize, Group) -> R + Send + Sync + 'static,
) -> Vec<R> {
    let (a, b) = stores();
    let f = Arc::new(f);
    let handles: Vec<_> = [a, b]
        .into_iter()
        .enumerate()
        .map(|(rank, store)| {
            let f = f.clone();
            thread::spawn(move || {
                let g = Group::new(&store, name, rank, 2, &local(), timeout).unwrap();
                f(rank, g)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::try_from(t.flatten(0, -1)).unwrap()
}

#[test]
fn all_reduce_broadcast_all_gather_barrier() {
    let got = on_two("ops", T, |rank, g| {
        let r = rank as f32;
        let mut sum = Tensor::from_slice(&[1.0f32 + r, 10.0 * r]);
        g.all_reduce_sum(&mut sum).unwrap();
        let mut b = Tensor::from_slice(&[r + 5.0]);
        g.broadcast(&mut b, 1).unwrap();
        let gathered = g.all_gather(&Tensor::from_slice(&[r, r * 2.0])).unwrap();
        g.barrier().unwrap();
        (values(&sum), values(&b), gathered.size(), values(&gathered))
    });
    for (sum, b, shape, gathered) in got {
        assert_eq!(sum, vec![3.0, 10.0]);
        assert_eq!(b, vec![6.0]);
        assert_eq!(shape, vec![2, 2]);
        assert_eq!(gathered, vec![0.0, 0.0, 1.0, 2.0]);
    }
}

#[test]
fn store_keys_and_counters() {
    let (a, b) = stores();
    a.set("config", b"abc").unwrap();
    assert_eq!(b.get("config", T).unwrap(), b"abc");
    assert!(b.contains("config").unwrap());
    assert!(!b.contains("nothing").unwrap());
    assert_eq!(a.add("n", 1).unwrap(), 1);
    assert_eq!(b.add("n", 2).unwrap(), 3);
    let t = Instant::now();
    let e = b.get("never", Duration::from_millis(300)).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(e.to_string().contains("get 'never'"), "{e}");
}

#[test]
fn a_busy_port_is_an_error_naming_it() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let e = Store::serve("127.0.0.1", port, T).unwrap_err();
    assert!(matches!(e, DistError::Store { .. }), "{e:?}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
}

#[test]
fn no_server_is_an_error_after_the_timeout() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let t = Instant::now();
    let e = Store::connect("127.0.0.1", free, Duration::from_secs(2)).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert!(e.to_string().contains("connect"), "{e}");
}

#[test]
fn a_rank_that_never_joins_fails_the_join() {
    let (a, _b) = stores();
    let t = Instant::now();
    let e = Group::new(&a, "lonely", 0, 2, &local(), Duration::from_secs(2)).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    let msg = e.to_string();
    assert!(msg.contains("join in group 'lonely' (rank 0 of 2)"), "{msg}");
}

#[test]
fn a_peer_that_leaves_fails_the_collective_instead_of_hanging() {
    let got = on_two("leaver", Duration::from_secs(3), |rank, g| {
        let mut t = Tensor::from_slice(&[1.0f32]);
        g.all_reduce_sum(&mut t).unwrap();
        if rank == 1 {
            drop(g);
            return Ok(Duration::ZERO);
        }
        thread::sleep(Duration::from_millis(200));
        let start = Instant::now();
        let mut t = Tensor::from_slice(&[1.0f32]);
        g.all_reduce_sum(&mut t).map(|_| start.elapsed())
    });
    let e = got.into_iter().next().unwrap().unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("all-reduce in group 'leaver' (rank 0 of 2)"), "{msg}");
}

#[test]
fn non_contiguous_tensors_are_refused() {
    let got = on_two("strided", T, |_, g| {
        let mut t = Tensor::zeros([2, 2], (tch::Kind::Float, tch::Device::Cpu)).transpose(0, 1);
        g.all_reduce_sum(&mut t).unwrap_err().to_string()
    });
    assert!(got[0].contains("contiguous"), "{}", got[0]);
}
