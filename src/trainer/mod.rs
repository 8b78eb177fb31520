//! Training: LoRA factors and heads learnt on the candle path and exported as adapters the serving path
//! runs; data splitting and batching; evaluation. (The job runner and publishing are the next pieces.)

pub mod data;
pub mod eval;
pub mod lora;
pub mod train;

#[cfg(test)]
mod lora_tests;
