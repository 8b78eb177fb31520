//! Training: LoRA factors and heads learnt from feedback on the candle path, exported as adapters the
//! serving path runs. (The job runner, evaluation and publishing are the next pieces.)

pub mod lora;

#[cfg(test)]
mod lora_tests;
