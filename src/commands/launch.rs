//! `mlaan-pipe launch`: torchrun's job for one node, without Python. It starts
//! `--nproc-per-node` copies of an mlaan-pipe command with the torchrun variables set (the
//! ranks of this node among `--nnodes`), forwards SIGINT/SIGTERM/SIGUSR1 to each of them once,
//! and when one fails gives the others `--grace-s` to fail by themselves, then kills them.
//! Children die with the launcher (PR_SET_PDEATHSIG), so none is ever left behind.
//!
//! Exit status: the first failure's (128 + signal for a killed child); else 75 if the run was
//! interrupted (every rank checkpointed at the agreed step); else 0.

use crate::cli::LaunchArgs;
use anyhow::{bail, Context, Result};
use mlaan_dist::{Launch, LaunchSource};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::train::EXIT_INTERRUPTED;

pub fn run(args: LaunchArgs) -> Result<()> {
    let ranks = plan(&args)?;
    // (rank, process) of every child still running.
    let children: Arc<Mutex<Vec<(usize, Child)>>> = Arc::new(Mutex::new(Vec::new()));
    forward_signals(children.clone())?;
    let exe = std::env::current_exe().context("cannot find the mlaan-pipe executable")?;
    for l in &ranks {
        let mut c = Command::new(&exe);
        c.args(&args.command).envs(l.vars());
        // Its own process group: a Ctrl-C at the terminal reaches the launcher alone, which
        // forwards it once (twice would mean "exit at once" to a training run).
        c.process_group(0);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGKILL the child
        // when the launcher's thread that forked it dies.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = c.spawn().with_context(|| format!("cannot start rank {}", l.rank))?;
        children.lock().unwrap().push((l.rank, child));
    }
    let first = ranks[0].rank;
    tracing::info!(
        "launch: ranks {}..{} of {} started (store {}:{})",
        first,
        first + ranks.len() - 1,
        ranks[0].world,
        ranks[0].master_addr,
        ranks[0].master_port
    );
    let code = supervise(&children, Duration::from_secs_f64(args.grace_s.max(0.0)));
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// The rendezvous of each process this node starts.
fn plan(args: &LaunchArgs) -> Result<Vec<Launch>> {
    if args.nproc_per_node == 0 || args.nnodes == 0 {
        bail!("--nproc-per-node and --nnodes must be at least 1");
    }
    if args.node_rank >= args.nnodes {
        bail!("--node-rank {} is not below --nnodes {}", args.node_rank, args.nnodes);
    }
    let env_port = match std::env::var("MASTER_PORT") {
        Ok(p) if !p.is_empty() => {
            Some(p.parse().with_context(|| format!("MASTER_PORT={p} is not a port"))?)
        }
        _ => None,
    };
    let port = match (args.master_port.or(env_port), args.nnodes) {
        (Some(p), _) => p,
        (None, 1) => free_port()?,
        (None, _) => bail!("with --nnodes > 1 every node needs the same --master-port"),
    };
    let n = args.nproc_per_node;
    Ok((0..n)
        .map(|local| Launch {
            source: LaunchSource::Torchrun,
            rank: args.node_rank * n + local,
            world: args.nnodes * n,
            local_rank: local,
            local_world: n,
            master_addr: args.master_addr.clone(),
            master_port: port,
            agent_store: false,
        })
        .collect())
}

/// A port free now (bound, then released for rank 0 to serve on).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

/// Pass each SIGINT, SIGTERM and SIGUSR1 the launcher gets on to every child still running.
fn forward_signals(children: Arc<Mutex<Vec<(usize, Child)>>>) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR1])?;
    std::thread::Builder::new().name("launch-signals".into()).spawn(move || {
        for sig in signals.forever() {
            for (_, c) in children.lock().unwrap().iter() {
                // SAFETY: kill(2) on a child's pid; a child already reaped is not signalled
                // (`supervise` only reaps under this lock, and drops reaped children).
                unsafe { libc::kill(c.id() as i32, sig) };
            }
        }
    })?;
    Ok(())
}

/// Wait for every child; the launcher's exit code (see the module doc).
// A child is removed only after `try_wait` reaped it, which the lint cannot see.
#[allow(clippy::zombie_processes)]
fn supervise(children: &Mutex<Vec<(usize, Child)>>, grace: Duration) -> i32 {
    let mut failure: Option<(i32, Instant)> = None;
    let mut interrupted = false;
    let mut killed = false;
    loop {
        {
            let mut live = children.lock().unwrap();
            let mut i = 0;
            while i < live.len() {
                let waited = live[i].1.try_wait();
                match waited {
                    Ok(Some(status)) => {
                        let (rank, _) = live.remove(i);
                        let code = exit_code(status);
                        interrupted |= code == EXIT_INTERRUPTED;
                        if code != 0 && code != EXIT_INTERRUPTED && failure.is_none() {
                            tracing::error!(
                                "launch: rank {rank} failed ({}); stopping the other {} rank(s)",
                                describe(status),
                                live.len()
                            );
                            failure = Some((code, Instant::now()));
                        }
                    }
                    Ok(None) => i += 1,
                    Err(e) => {
                        tracing::error!("launch: cannot wait for rank {}: {e}", live[i].0);
                        i += 1;
                    }
                }
            }
            if live.is_empty() {
                break;
            }
            if let Some((_, at)) = failure.filter(|_| !killed) {
                if at.elapsed() >= grace {
                    for (rank, c) in live.iter_mut() {
                        tracing::warn!("launch: killing rank {rank} (pid {})", c.id());
                        let _ = c.kill();
                    }
                    killed = true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match failure {
        Some((code, _)) => code,
        None if interrupted => EXIT_INTERRUPTED,
        None => 0,
    }
}

fn exit_code(status: ExitStatus) -> i32 {
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}
