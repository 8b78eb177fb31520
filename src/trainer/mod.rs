//! Training: LoRA factors and heads learnt on the candle path and exported as adapters the serving path
//! runs; data splitting and batching; evaluation. Jobs run one at a time on the trainer thread and publish new generations.

pub mod clip;
pub mod data;
pub mod eval;
pub mod full;
pub mod guard;
pub mod jobs;
pub mod lora;
pub mod offline;
pub mod optim;
pub mod params;
pub mod reference;
pub mod train;

#[cfg(test)]
mod lora_tests;
