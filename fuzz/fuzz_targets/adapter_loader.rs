//! Fuzzes the PEFT adapter loader (`flywheel::adapters::peft`) the way `Registry::load` drives it, without
//! the filesystem: the input is split into `adapter_config.json`, an optional Flywheel sidecar and
//! `adapter_model.safetensors`, the config is parsed as `peft::read` parses it, and the weights go to
//! `peft::decode`, which checks every shape against a tiny BERT. Errors are expected; a panic, an abort or
//! a sanitizer report is a bug.
//!
//! Input layout (little-endian):
//!
//! ```text
//! [flags: u8][config_len: u16][sidecar_len: u16][config][sidecar][weights ...]
//! ```
//!
//! - `flags` bit 0: model shape, 0 = `BertConfig::tiny()` (2 layers, hidden 32, intermediate 64),
//!   1 = a micro BERT (1 layer, hidden 8, intermediate 16), so small inputs can still fit.
//! - `flags` bit 1: pooling when there is no sidecar (or it names none): 0 = `[CLS]`, 1 = mean.
//! - `sidecar_len` 0 means no sidecar. Lengths past the end of the input are clamped.
//!
//! When decoding succeeds, the adapter must survive `peft::encode` → `peft::decode` under the same config
//! bit for bit, and its config must re-parse after `peft::config_json`.
//!
//! Set `FLYWHEEL_FUZZ_VERBOSE=1` to print each input's outcome (handy to check the seeds:
//! `FLYWHEEL_FUZZ_VERBOSE=1 cargo +nightly fuzz run adapter_loader fuzz/seeds/adapter_loader/*`).

#![no_main]

use std::sync::OnceLock;

use flywheel::adapters::peft::{self, AdapterConfig};
use flywheel::adapters::registry::Sidecar;
use flywheel::model::lora::{Adapter, Dense, Pooling};
use flywheel::model::BertConfig;
use libfuzzer_sys::fuzz_target;

fn models() -> &'static [BertConfig; 2] {
    static MODELS: OnceLock<[BertConfig; 2]> = OnceLock::new();
    MODELS.get_or_init(|| {
        let tiny = BertConfig::tiny();
        let micro = BertConfig {
            hidden_size: 8,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            intermediate_size: 16,
            ..BertConfig::tiny()
        };
        [tiny, micro]
    })
}

fn verbose() -> bool {
    static VERBOSE: OnceLock<bool> = OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os("FLYWHEEL_FUZZ_VERBOSE").is_some_and(|v| v != "0"))
}

/// Splits `n` bytes off the front of `rest` (fewer if it is shorter).
fn take<'a>(rest: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = rest.split_at(n.min(rest.len()));
    *rest = tail;
    head
}

fn same_dense(a: &Dense, b: &Dense) -> bool {
    a.in_features == b.in_features
        && a.out_features == b.out_features
        && same_bits(&a.weight, &b.weight)
        && same_bits(&a.bias, &b.bias)
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Equality that treats NaNs with the same bits as equal (the weights are arbitrary floats).
fn same_adapter(a: &Adapter, b: &Adapter) -> bool {
    let deltas_match = a.num_layers() == b.num_layers()
        && a.deltas().count() == b.deltas().count()
        && a.deltas()
            .zip(b.deltas())
            .all(|((la, ta, da), (lb, tb, db))| {
                la == lb
                    && ta == tb
                    && da.rank == db.rank
                    && da.scale.to_bits() == db.scale.to_bits()
                    && same_bits(&da.a, &db.a)
                    && same_bits(&da.b, &db.b)
            });
    let heads_match = match (&a.head, &b.head) {
        (None, None) => true,
        (Some(x), Some(y)) => {
            x.pooling == y.pooling
                && same_dense(&x.classifier, &y.classifier)
                && match (&x.pooler, &y.pooler) {
                    (None, None) => true,
                    (Some(p), Some(q)) => same_dense(p, q),
                    _ => false,
                }
        }
        _ => false,
    };
    deltas_match && heads_match
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let header = take(&mut rest, 5);
    if header.len() < 5 {
        return;
    }
    let flags = header[0];
    let config_len = u16::from_le_bytes([header[1], header[2]]) as usize;
    let sidecar_len = u16::from_le_bytes([header[3], header[4]]) as usize;
    let config_bytes = take(&mut rest, config_len);
    let sidecar_bytes = take(&mut rest, sidecar_len);
    let weights = rest;
    let model = &models()[(flags & 1) as usize];
    let default_pooling = if flags & 2 == 0 {
        Pooling::Cls
    } else {
        Pooling::Mean
    };

    // As `Registry::load_files`: a sidecar that does not parse refuses the adapter.
    let sidecar: Sidecar = if sidecar_bytes.is_empty() {
        Sidecar::default()
    } else {
        match serde_json::from_slice(sidecar_bytes) {
            Ok(s) => s,
            Err(e) => {
                if verbose() {
                    eprintln!("sidecar: {e}");
                }
                return;
            }
        }
    };
    let pooling = sidecar.head.unwrap_or(default_pooling);

    // As `peft::read`, minus the two file reads.
    let config: AdapterConfig = match serde_json::from_slice(config_bytes) {
        Ok(c) => c,
        Err(e) => {
            if verbose() {
                eprintln!("{}: {e}", peft::CONFIG_FILE);
            }
            return;
        }
    };
    let adapter = match peft::decode(&config, weights, model, pooling) {
        Ok(a) => a,
        Err(e) => {
            if verbose() {
                eprintln!("decode: {e}");
            }
            return;
        }
    };
    if verbose() {
        eprintln!(
            "ok: {} deltas, head: {}, {} parameters",
            adapter.deltas().count(),
            adapter.head.as_ref().map_or("none".to_owned(), |h| format!(
                "{} labels, pooler: {}",
                h.classifier.out_features,
                h.pooler.is_some()
            )),
            adapter.parameter_count()
        );
    }

    // What was accepted must be valid for the model it was checked against...
    adapter
        .validate(model)
        .expect("peft::decode returned an adapter that fails Adapter::validate");
    // ...must write back and read again unchanged under the same config...
    let bytes =
        peft::encode(&adapter).expect("peft::encode failed on an adapter peft::decode accepted");
    let again = peft::decode(&config, &bytes, model, pooling)
        .expect("peft::decode refused what peft::encode wrote for an adapter it had accepted");
    assert!(
        same_adapter(&adapter, &again),
        "peft::encode → peft::decode changed the adapter"
    );
    // ...and its config must serialise to JSON that parses again.
    let json = peft::config_json(&config).expect("config_json failed on a config that parsed");
    serde_json::from_str::<AdapterConfig>(&json)
        .expect("the adapter_config.json Flywheel writes does not parse");
});
