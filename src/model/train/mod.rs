//! The CPU ops the trainable candle path is built from, each with a hand-written backward pass on the
//! vectorised kernels (candle's fused LayerNorm and softmax record none): GELU, softmax and LayerNorm
//! (`ops`), a frozen linear with its LoRA delta (`lora_linear`), a whole encoder layer while LoRA trains
//! (`encoder_layer`), and the yield points that let training step aside for serving (`yielding`).

pub mod encoder_layer;
pub mod lora_linear;
pub mod ops;
pub mod yielding;
