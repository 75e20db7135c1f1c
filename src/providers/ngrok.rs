//! (being written)
use crate::config::ProviderAccount;
pub struct NgrokProvider;
impl NgrokProvider {
    pub fn new(_a: &ProviderAccount, _c: usize) -> anyhow::Result<Self> { anyhow::bail!("todo") }
}
