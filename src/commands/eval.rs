use crate::cli::EvalArgs;
use anyhow::Result;

pub fn run(args: EvalArgs) -> Result<()> {
    let _cfg = args.config.resolve()?;
    anyhow::bail!("eval: not yet implemented")
}
