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

/// NCCL on the GPU sums what Gloo sums through host memory: one rank per GPU (one or two),
/// different values on each, several buckets' sizes, float32 and bfloat16.
#[test]
fn cuda_nccl_all_reduce_equals_gloo() {
    let Some(_) = mlaan_accel::cuda_for_test() else { return };
    let world = (tch::Cuda::device_count() as usize).min(2);
    let server = Arc::new(Store::serve("127.0.0.1", 0, T).unwrap());
    let port = server.port();
    let ranks: Vec<_> = (0..world)
        .map(|rank| {
            let server = server.clone();
            thread::spawn(move || {
                let store = if rank == 0 {
                    server
                } else {
                    Arc::new(Store::connect("127.0.0.1", port, T).unwrap())
                };
                let device = tch::Device::Cuda(rank);
                let nccl =
                    mlaan_dist::nccl::Communicator::new(&store, "check", rank, world, device, T)
                        .unwrap();
                let gloo = Group::new(&store, "check-gloo", rank, world, &local(), T).unwrap();
                let mut worst = 0f64;
                for (n, kind) in [
                    (1000, tch::Kind::Float),
                    (1 << 20, tch::Kind::Float),
                    (4096, tch::Kind::BFloat16),
                ] {
                    let x = (Tensor::arange(n, (tch::Kind::Float, tch::Device::Cpu))
                        * (0.001 * (rank + 1) as f64))
                        .sin();
                    let mut on_gpu = x.to_kind(kind).to_device(device);
                    nccl.all_reduce_sum(&mut on_gpu).unwrap();
                    let mut on_host = x.to_kind(kind);
                    gloo.all_reduce_sum(&mut on_host).unwrap();
                    let d = (on_gpu.to_device(tch::Device::Cpu).to_kind(tch::Kind::Float)
                        - on_host.to_kind(tch::Kind::Float))
                    .abs()
                    .max()
                    .double_value(&[]);
                    worst = worst.max(d);
                }
                worst
            })
        })
        .collect();
    for (rank, h) in ranks.into_iter().enumerate() {
        let worst = h.join().unwrap();
        // Exact in float32 with two ranks (one addition); bfloat16 rounds the same way.
        assert!(worst <= 1e-2, "rank {rank}: NCCL and Gloo differ by {worst}");
    }
}
