//! The `keyward-sandbox` binary: the provider emulators of the `keyward-sandbox` crate, served
//! on a loopback port for the quick start and the integration tests. Built with the `sandbox`
//! feature (on by default); nothing of it is linked into `keyward`.

fn main() -> std::process::ExitCode {
    keyward_sandbox::cli::main()
}
