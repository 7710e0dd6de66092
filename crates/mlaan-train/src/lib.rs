//! A training run around the engine (`mlaan-engine`): the [`trainer`] (session, run loop,
//! evaluation), the run's boundaries ([`cadence`]), [`checkpoint`]s, metric sinks
//! ([`metrics`]), run directories ([`run_dir`]), batches skipped for non-finite losses
//! ([`skips`]), devices ([`devices`]), data-parallel replicas ([`distributed`]), the
//! [`plan_report`], the [`bench`] and [`export`].

pub mod bench;
pub mod cadence;
pub mod checkpoint;
pub mod devices;
pub mod distributed;
pub mod doctor;
pub mod evaluate;
pub mod export;
pub mod flops;
pub mod metrics;
pub mod placement;
pub mod plan_report;
pub mod reducers;
pub mod run_dir;
pub mod session;
pub mod skips;
pub mod summary;
pub mod trainer;
