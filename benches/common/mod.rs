//! What the benchmarks share: the model they run.

use flywheel::model::{LoadOptions, Model};

/// The model directory: `FLYWHEEL_MODEL__DIR` when set (e.g. `models/multilingual-e5-small`), else
/// all-MiniLM-L6-v2 as `models/fetch.sh` leaves it.
pub fn model_dir() -> std::path::PathBuf {
    std::env::var_os("FLYWHEEL_MODEL__DIR").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2"),
        std::path::PathBuf::from,
    )
}

/// The model on the CPU, truncating at `max_length` tokens, with the server's heap policy.
pub fn load_model(max_length: usize) -> Model {
    flywheel::heap::keep_freed_memory();
    let options = LoadOptions {
        max_length,
        device: candle_core::Device::Cpu,
        ..Default::default()
    };
    Model::load(&model_dir(), &options).expect("run models/fetch.sh")
}
