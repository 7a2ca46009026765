//! Examples of embedding netmap; see `src/bin/embed.rs` (`cargo run -p netmap-examples --bin embed`).
