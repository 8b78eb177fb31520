//! Calibration of the int8 serving path at load: the texts it runs, and how large each input channel of
//! each projection gets on them, which sets how much of that range is moved into the weights before they
//! are quantised
//! ([`super::int8::QuantWeight::smoothed`]). Varied on purpose (mail, queries, reviews, numbers, code, other
//! languages and scripts, emoji), written for this file and unrelated to the tests' texts.

/// The calibration texts.
pub const TEXTS: &[&str] = &[
    "Subject: Re: quarterly numbers\n\nHi Dana, thanks for sending these over. Can we move the review to \
     Thursday at 3pm? I still need the figures for the northern region before I can sign off.",
    "URGENT!!! Your account has been selected for a $5,000 reward. Click http://example.com/claim now to \
     verify your details before midnight. Reply STOP to unsubscribe.",
    "how do I reset my password",
    "The battery lasts about two days, the screen is bright, but the charger stopped working after a week.",
    "Order #48213 shipped on 2024-03-17 via UPS, tracking 1Z999AA10123456784, weight 2.4 kg.",
    "fn main() { let v: Vec<u32> = (0..10).map(|x| x * x).collect(); println!(\"{:?}\", v); }",
    "SELECT name, COUNT(*) FROM orders WHERE created_at > '2023-01-01' GROUP BY name ORDER BY 2 DESC;",
    "Le service client a été très réactif et le remboursement est arrivé en trois jours.",
    "Die Lieferung kam zwei Wochen zu spät und die Verpackung war beschädigt.",
    "El producto funciona bien, pero las instrucciones están mal traducidas.",
    "这个手机的电池很耐用，但是屏幕容易刮花。",
    "配送が遅れていますが、いつ届きますか？",
    "Отличный сервис, рекомендую всем друзьям.",
    "great product 👍👍 would buy again 😀",
    "cancel my subscription please, I was charged twice this month",
    "What is the difference between a Roth IRA and a traditional IRA for someone earning $85k a year?",
    "Meeting notes: 1) budget approved 2) hiring freeze lifted in Q3 3) office move postponed to 2025.",
    "lol no way that actually worked",
    "Dear Sir/Madam, I am writing to complain about the noise from the construction site on Elm Street, \
     which starts at 6:30 every morning including weekends, in breach of the city's ordinance 12-4.",
    "x = 3.14159, y = -2.71828, z = 1e-9, total = 42",
    "The mitochondria is the powerhouse of the cell; ATP synthase converts ADP and phosphate into ATP.",
    "Can't log in — error 503 Service Unavailable — tried Chrome and Firefox, cleared cookies, no luck.",
    "BREAKING: markets fall 3% as central bank raises rates by 50 basis points",
    "I love how this jacket fits, the colour is exactly like the photos and it arrived early.",
];

/// The texts tokenized by `encode` (special tokens included, cut at the model's length).
pub fn sequences(encode: impl Fn(&str) -> super::Result<Vec<u32>>) -> super::Result<Vec<Vec<u32>>> {
    TEXTS.iter().map(|t| encode(t)).collect()
}

/// The largest magnitude seen in each input channel of one layer's projections.
#[derive(Debug, Clone)]
pub struct InputRanges {
    /// Query, key and value's input (the layer's input).
    pub attention: Vec<f32>,
    /// The attention output projection's input (the heads' context).
    pub context: Vec<f32>,
    /// The intermediate projection's input (after the attention LayerNorm).
    pub intermediate: Vec<f32>,
    /// The output projection's input (after GELU).
    pub output: Vec<f32>,
}

impl InputRanges {
    pub(super) fn new(hidden: usize, inner: usize) -> Self {
        Self {
            attention: vec![0.0; hidden],
            context: vec![0.0; hidden],
            intermediate: vec![0.0; hidden],
            output: vec![0.0; inner],
        }
    }
}

/// Raises each channel of `range` to the magnitude of `rows`' values in it (`rows` is row-major, each row
/// `range.len()` wide).
pub(super) fn widen(range: &mut [f32], rows: &[f32]) {
    for row in rows.chunks_exact(range.len()) {
        for (r, v) in range.iter_mut().zip(row) {
            *r = r.max(v.abs());
        }
    }
}
