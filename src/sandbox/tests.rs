//! HTTP-level tests of the emulator, in process.
