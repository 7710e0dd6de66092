use crate::cli::ConfigArgs;
use anyhow::Result;

pub fn run(args: ConfigArgs) -> Result<()> {
    let _cfg = args.resolve()?;
    anyhow::bail!("plan: not yet implemented")
}
