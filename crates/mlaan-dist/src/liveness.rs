//! Which peers are still there. A collective that fails says only that a socket closed or a
//! wait timed out, not which rank is to blame; so every rank bumps a counter of its own in the
//! store every [`PERIOD`], and a rank that sees a collective fail reads the counters twice, a
//! few periods apart, and names the ranks whose counters stood still.

use crate::{DistError, Store};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often a rank's heartbeat counter moves.
pub const PERIOD: Duration = Duration::from_millis(500);

fn key(rank: usize) -> String {
    format!("heartbeat/{rank}")
}

/// This rank's heartbeat: a thread with its own store connection, stopped (at once) on drop.
pub struct Heartbeat {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    pub fn start(store: &Store, rank: usize) -> Result<Heartbeat, DistError> {
        let conn = store.connection()?;
        conn.add(&key(rank), 1)?;
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("heartbeat-{rank}"))
            .spawn(move || {
                // Beats until the sender is dropped. The server going away ends the run
                // elsewhere; here it only ends the beat.
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(PERIOD) {
                    if conn.add(&key(rank), 1).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| DistError::Env(format!("cannot start the heartbeat thread: {e}")))?;
        Ok(Heartbeat { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the heartbeats say about the peers of a failed collective.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peers {
    /// These ranks' heartbeats stopped: dead, or frozen as a whole.
    Silent(Vec<usize>),
    /// Every rank still beats: one is alive but stuck, or slower than the timeout.
    AllAlive,
    /// The store itself is gone: rank 0, which serves it, died.
    StoreGone,
}

impl std::fmt::Display for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peers::Silent(r) => {
                let list = r.iter().map(usize::to_string).collect::<Vec<_>>().join(", ");
                let s = if r.len() == 1 { "" } else { "s" };
                write!(f, "peer rank{s} {list} stopped (no heartbeat for {:?})", PERIOD * 4)
            }
            Peers::AllAlive => {
                write!(f, "every rank is alive: a peer is stuck or slower than the timeout")
            }
            Peers::StoreGone => write!(f, "peer rank 0 is gone (its rendezvous store is down)"),
        }
    }
}

/// Read every rank's heartbeat twice, four periods apart (long enough for a beat delayed by a
/// busy machine), and say who stood still.
pub fn diagnose(store: &Store, world: usize) -> Peers {
    let read = || -> Option<Vec<i64>> { (0..world).map(|r| store.add(&key(r), 0).ok()).collect() };
    let Some(before) = read() else { return Peers::StoreGone };
    std::thread::sleep(PERIOD * 4);
    let Some(after) = read() else { return Peers::StoreGone };
    let silent: Vec<usize> = (0..world).filter(|&r| after[r] == before[r]).collect();
    if silent.is_empty() {
        Peers::AllAlive
    } else {
        Peers::Silent(silent)
    }
}

/// Heartbeats watched over time (for a watchdog that must notice a dead peer while a
/// collective runs on a device, where nothing times out by itself): when each rank's counter
/// last moved.
pub struct Watch {
    conn: Store,
    /// Per rank: the counter last read, and when it last changed.
    seen: Vec<(i64, std::time::Instant)>,
}

impl Watch {
    /// Watch the `world` ranks' heartbeats through a connection of its own.
    pub fn new(store: &Store, world: usize) -> Result<Watch, DistError> {
        let conn = store.connection()?;
        let now = std::time::Instant::now();
        let seen = (0..world)
            .map(|r| Ok((conn.add(&key(r), 0)?, now)))
            .collect::<Result<_, DistError>>()?;
        Ok(Watch { conn, seen })
    }

    /// Read every counter; the ranks whose counter has not moved for `at_least`.
    pub fn silent_for(&mut self, at_least: Duration) -> Result<Vec<usize>, DistError> {
        let now = std::time::Instant::now();
        let mut silent = Vec::new();
        for (r, (value, changed)) in self.seen.iter_mut().enumerate() {
            let v = self.conn.add(&key(r), 0)?;
            if v != *value {
                *value = v;
                *changed = now;
            } else if now.duration_since(*changed) >= at_least {
                silent.push(r);
            }
        }
        Ok(silent)
    }
}
