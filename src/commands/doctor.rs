//! `mlaan-pipe doctor`: the machine as a run would find it (`mlaan_train::doctor`), as text or
//! JSON.

use crate::cli::DoctorArgs;
use anyhow::Result;
use mlaan_train::doctor::{inspect, render};

pub fn run(args: DoctorArgs) -> Result<()> {
    let report = inspect(args.dataset.as_deref(), args.data_dir.as_deref());
    match &args.json {
        Some(to) => super::emit(to, &serde_json::to_string_pretty(&report)?),
        None => {
            print!("{}", render(&report));
            Ok(())
        }
    }
}
