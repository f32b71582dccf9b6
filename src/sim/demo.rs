//! demo (in progress)
/// Runs the demo.
pub async fn run(_args: crate::cli::DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
