//! `cargo xtask bench`: speed and memory against etcdctl/etcdutl in the same run.

use anyhow::{bail, Result};

pub fn run(_args: &[String]) -> Result<()> {
    bail!("the benchmark is not built yet (issue 7); BENCHMARKS.md says what was measured by hand")
}
