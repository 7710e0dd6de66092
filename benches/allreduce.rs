//! The collectives that average a module's gradients across replicas, timed on buffers from
//! 64 KiB to 64 MiB (a CIFAR ResNet-32 stage's gradients are ~0.1-2 MiB, an ImageNet ResNet-34
//! stage's up to ~40 MiB, more with MLAAN's LAM copies). Ranks are threads of this process,
//! each with its own store connection and sockets, as processes would have.
//!
//! - Gloo on loopback, host buffers, two ranks: the path of modules on CPUs;
//! - on a GPU machine, with one rank per GPU (up to two): Gloo through host memory for CUDA
//!   buffers (copy out, reduce, copy back: what a Gloo group does for a module on a GPU) and
//!   NCCL on the device, side by side on the same buffers.
//!
//! Prints time per all-reduce and bandwidth; run with `cargo bench --bench allreduce`.

use mlaan_dist::nccl::Communicator;
use mlaan_dist::{Bind, Group, Store};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const TIMEOUT: Duration = Duration::from_secs(60);
const SIZES_KIB: [usize; 6] = [64, 256, 1024, 4096, 16384, 65536];

/// How one rank reduces a buffer.
type Reduce = Box<dyn FnMut(&mut Tensor)>;

/// Time `make(rank, store)`'s reduction on every buffer size with `world` ranks on
/// `device(rank)`; per size, (KiB, seconds per all-reduce of the slowest rank, repetitions).
fn time_ranks(
    world: usize,
    device: fn(usize) -> Device,
    make: fn(usize, usize, &Store) -> Reduce,
) -> Vec<(usize, f64, usize)> {
    let server = Arc::new(Store::serve("127.0.0.1", 0, TIMEOUT).expect("serve the store"));
    let port = server.port();
    let barrier = Arc::new(Barrier::new(world));
    let ranks: Vec<_> = (0..world)
        .map(|rank| {
            let (barrier, server) = (barrier.clone(), server.clone());
            std::thread::spawn(move || {
                let store = if rank == 0 {
                    server
                } else {
                    Arc::new(Store::connect("127.0.0.1", port, TIMEOUT).expect("connect"))
                };
                let d = device(rank);
                let mut reduce = make(rank, world, &store);
                let sync = || {
                    if let Device::Cuda(i) = d {
                        tch::Cuda::synchronize(i as i64);
                    }
                };
                let mut rows = Vec::new();
                for kib in SIZES_KIB {
                    let mut t = Tensor::ones([(kib * 1024 / 4) as i64], (Kind::Float, d));
                    for _ in 0..3 {
                        reduce(&mut t);
                    }
                    sync();
                    // Enough repetitions for ~0.5 s at loopback speed.
                    let reps = (256 * 1024 / kib).clamp(5, 2000);
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..reps {
                        reduce(&mut t);
                    }
                    sync();
                    rows.push((kib, start.elapsed().as_secs_f64() / reps as f64, reps));
                }
                rows
            })
        })
        .collect();
    let results: Vec<Vec<(usize, f64, usize)>> =
        ranks.into_iter().map(|h| h.join().expect("rank")).collect();
    // The slower rank's time is the collective's.
    (0..SIZES_KIB.len())
        .map(|i| {
            let (kib, _, reps) = results[0][i];
            (kib, results.iter().map(|r| r[i].1).fold(0.0, f64::max), reps)
        })
        .collect()
}

fn gloo(rank: usize, world: usize, store: &Store) -> Reduce {
    let bind = Bind::Address("127.0.0.1".into());
    let g = Group::new(store, "bench-gloo", rank, world, &bind, TIMEOUT).expect("group");
    Box::new(move |t: &mut Tensor| {
        if t.device().is_cuda() {
            let mut host = t.to(Device::Cpu);
            g.all_reduce_sum(&mut host).expect("all-reduce");
            t.copy_(&host);
        } else {
            g.all_reduce_sum(t).expect("all-reduce");
        }
    })
}

fn nccl(rank: usize, world: usize, store: &Store) -> Reduce {
    let c = Communicator::new(store, "bench-nccl", rank, world, Device::Cuda(rank), TIMEOUT)
        .expect("communicator");
    Box::new(move |t: &mut Tensor| c.all_reduce_sum(t).expect("all-reduce"))
}

fn table(title: &str, world: usize, rows: &[(usize, f64, usize)]) {
    println!("{title}\n");
    println!("| buffer | reps | time per all-reduce | algorithm bandwidth | bus bandwidth |");
    println!("|--:|--:|--:|--:|--:|");
    for &(kib, t, reps) in rows {
        let bytes = (kib * 1024) as f64;
        let algo = bytes / t / 1e9;
        // A ring all-reduce moves 2(n-1)/n of the buffer through each rank's link.
        let bus = algo * 2.0 * (world.max(2) - 1) as f64 / world.max(2) as f64;
        let size = if kib >= 1024 { format!("{} MiB", kib / 1024) } else { format!("{kib} KiB") };
        println!("| {size} | {reps} | {:.3} ms | {algo:.2} GB/s | {bus:.2} GB/s |", t * 1e3);
    }
    println!();
}

fn main() {
    tch::set_num_threads(1);
    mlaan_train::devices::load_cuda_backend();
    let rows = time_ranks(2, |_| Device::Cpu, gloo);
    table("Gloo all-reduce (sum, float32), 2 ranks on loopback, host buffers", 2, &rows);
    let gpus = if tch::Cuda::is_available() { tch::Cuda::device_count() as usize } else { 0 };
    if gpus == 0 {
        println!("No CUDA device: NCCL and Gloo through host memory are not measured here.");
        return;
    }
    let world = gpus.min(2);
    let on_gpu = |r: usize| Device::Cuda(r);
    let host = time_ranks(world, on_gpu, gloo);
    table(
        &format!("Gloo through host memory, CUDA buffers, {world} rank(s), one GPU each"),
        world,
        &host,
    );
    match mlaan_dist::nccl::load() {
        Ok(lib) => {
            let dev = time_ranks(world, on_gpu, nccl);
            table(&format!("NCCL {}, {world} rank(s), one GPU each", lib.version), world, &dev);
            println!("| buffer | NCCL / Gloo through host (time) |\n|--:|--:|");
            for (n, g) in dev.iter().zip(&host) {
                println!("| {} KiB | {:.3} |", n.0, n.1 / g.1);
            }
        }
        Err(e) => println!("NCCL not measured: {e}"),
    }
}
