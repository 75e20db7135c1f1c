//! demo
pub fn main(_cli: &crate::cli::Cli) -> std::process::ExitCode {
    std::process::ExitCode::from(1)
}
