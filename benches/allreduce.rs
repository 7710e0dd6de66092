//! Gloo all-reduce on loopback, the collective that averages a stage's gradients across
//! replicas: two ranks (threads of this process, each with its own store connection and
//! sockets, as two processes would have), buffers from 64 KiB to 64 MiB (a CIFAR ResNet-32
//! stage's gradients are ~0.1-2 MiB, an ImageNet ResNet-34 stage's up to ~40 MiB, more with
//! MLAAN's LAM copies). Prints time per all-reduce and bandwidth; run with
//! `cargo bench --bench allreduce`.

use mlaan_dist::{Bind, Group, Store};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

const TIMEOUT: Duration = Duration::from_secs(60);
const SIZES_KIB: [usize; 6] = [64, 256, 1024, 4096, 16384, 65536];

fn main() {
    tch::set_num_threads(1);
    let server = Arc::new(Store::serve("127.0.0.1", 0, TIMEOUT).expect("serve the store"));
    let port = server.port();
    let world = 2;
    let barrier = Arc::new(Barrier::new(world));
    let ranks: Vec<_> = (0..world)
        .map(|rank| {
            let barrier = barrier.clone();
            let server = server.clone();
            std::thread::spawn(move || {
                let store = if rank == 0 {
                    server
                } else {
                    Arc::new(Store::connect("127.0.0.1", port, TIMEOUT).expect("connect"))
                };
                let bind = Bind::Address("127.0.0.1".into());
                let g = Group::new(&store, "bench", rank, world, &bind, TIMEOUT).expect("group");
                let mut rows = Vec::new();
                for kib in SIZES_KIB {
                    let mut t =
                        Tensor::ones([(kib * 1024 / 4) as i64], (Kind::Float, tch::Device::Cpu));
                    for _ in 0..3 {
                        g.all_reduce_sum(&mut t).expect("warm-up");
                    }
                    // Enough repetitions for ~0.5 s at the expected speed.
                    let reps = (256 * 1024 / kib).clamp(5, 2000);
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..reps {
                        g.all_reduce_sum(&mut t).expect("all-reduce");
                    }
                    rows.push((kib, start.elapsed().as_secs_f64() / reps as f64, reps));
                }
                rows
            })
        })
        .collect();
    let results: Vec<_> = ranks.into_iter().map(|h| h.join().expect("rank")).collect();
    println!("Gloo all-reduce (sum, float32), {world} ranks on loopback, one Gloo thread each\n");
    println!("| buffer | reps | time per all-reduce | algorithm bandwidth | bus bandwidth |");
    println!("|--:|--:|--:|--:|--:|");
    for (i, &(kib, _, reps)) in results[0].iter().enumerate() {
        // The slower rank's time is the collective's.
        let t = results.iter().map(|r| r[i].1).fold(0.0, f64::max);
        let bytes = (kib * 1024) as f64;
        let algo = bytes / t / 1e9;
        // A ring all-reduce moves 2(n-1)/n of the buffer through each rank's link.
        let bus = algo * 2.0 * (world - 1) as f64 / world as f64;
        let size = if kib >= 1024 { format!("{} MiB", kib / 1024) } else { format!("{kib} KiB") };
        println!("| {size} | {reps} | {:.3} ms | {algo:.2} GB/s | {bus:.2} GB/s |", t * 1e3);
    }
}
