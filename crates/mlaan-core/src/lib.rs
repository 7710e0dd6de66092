//! The libtorch-free core of mlaan-pipe: everything that can be decided and tested without a
//! tensor. Configs are typed and validated here, splits and LAM chains are plain data checked
//! against the architecture, placement of modules onto devices is a pure function, and the
//! stage schedules are state machines ([`schedule`]).

pub mod arch;
pub mod auglocal;
pub mod bench;
pub mod config;
pub mod device;
pub mod error;
pub mod lam;
pub mod metrics;
pub mod micro;
pub mod placement;
pub mod plan;
pub mod recipe;
pub mod routes;
pub mod schedule;
pub mod split;

pub use arch::{ArchSpec, Backbone, BlockKind, BlockRef, Family};
pub use config::{ConfigSource, RunConfig};
pub use device::DeviceSpec;
pub use error::{ConfigError, PlanError};
pub use lam::LamChain;
pub use split::Split;
