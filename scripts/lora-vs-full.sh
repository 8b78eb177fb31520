#!/usr/bin/env bash
# LoRA vs full fine-tuning, Flywheel and PEFT, on both data sets: the benchmark lives in benches/ with the
# others; this is the name the training docs and issues use for it. Usage: scripts/lora-vs-full.sh [SEEDS] [BINARY]
exec "$(dirname "${BASH_SOURCE[0]}")/../benches/lora-vs-full.sh" "$@"
