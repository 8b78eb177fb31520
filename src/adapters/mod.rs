//! Adapters: PEFT reading and writing, and the registry of immutable, content-addressed generations.

pub mod index_store;
pub mod objects;
pub mod peft;
pub mod reference;
pub mod registry;
#[cfg(test)]
mod registry_tests;

pub use registry::{Generation, Registry, RegistryError, Task};
