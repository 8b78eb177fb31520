//! Adapters: PEFT reading and writing, and the registry of immutable, content-addressed generations.

pub mod peft;
