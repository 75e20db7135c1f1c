//! Provider emulators: being written.
