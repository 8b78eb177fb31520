//! Which feedback a job learns from: the newest rows, or on a warm start the rows newer than the parent's
//! snapshot with a replayed sample of older ones.

use crate::feedback::Feedback;
use crate::trainer::data::{last_per_key, truncate, Example};
use crate::trainer::train::{TrainConfig, TrainError};

use super::TrainerDeps;

/// Most feedback rows one job reads: the newest, so a long-lived task keeps learning from what arrives.
pub(super) const MAX_ROWS: usize = 200_000;

/// Characters of a text read per token of the model's length. The tokenizer keeps only that many tokens,
/// and a token is seldom more than a long word; the cut bounds what a job holds (`MAX_ROWS` texts at once)
/// where texts are up to `[limits] max_text_bytes` long.
const CHARS_PER_TOKEN: usize = 32;

/// The examples a job trains and validates on, and where they came from.
pub(super) struct Dataset {
    /// What trains and validates, cut at the job's `max_length`.
    pub(super) examples: Vec<Example>,
    /// Each example's token ids as serving makes them (not cut at the job's `max_length`).
    pub(super) serving_ids: Vec<Vec<u32>>,
    /// Whether each example is newer than the parent's snapshot (every one without a parent snapshot): only
    /// those validate, as the parent may have trained on the others.
    pub(super) fresh: Vec<bool>,
    /// The newest feedback row read: the next warm start's snapshot.
    pub(super) snapshot_id: i64,
    /// Rows newer than the parent's snapshot (all rows without one).
    pub(super) new_rows: usize,
    /// Older rows replayed beside them.
    pub(super) replayed_rows: usize,
    /// Rows left out because a newer row gives the same text another label (a correction).
    pub(super) superseded_rows: usize,
}

/// Keeps, of rows giving one text different labels, only the newest: a caller who labelled a text and then
/// corrected it means the correction, and training on both would teach the two at once (and let one
/// validate against the other). `rows` are in id order; so is the result.
fn newest_label_per_text(rows: Vec<Feedback>) -> (Vec<Feedback>, usize) {
    last_per_key(rows, |r| r.text.clone())
}

/// A seeded sample of `want` rows with each label's share of `rows` (largest remainders round), so a rare
/// older label is replayed too: replay is there against forgetting, and a plain random sample can leave
/// such a label out.
fn stratified_sample(mut rows: Vec<Feedback>, want: usize, seed: u64) -> Vec<Feedback> {
    crate::rng::Rng::new(seed).shuffle(&mut rows);
    if want >= rows.len() {
        return rows;
    }
    let mut by_label: std::collections::BTreeMap<String, Vec<Feedback>> = Default::default();
    for row in rows {
        by_label.entry(row.label.clone()).or_default().push(row);
    }
    let total: usize = by_label.values().map(Vec::len).sum();
    // (quota, remainder, rows of the label, label): the rows left over go to the largest remainders, ties
    // to the rarer label.
    let mut quotas: Vec<(usize, usize, usize, String)> = by_label
        .iter()
        .map(|(label, group)| {
            let exact = want * group.len();
            (exact / total, exact % total, group.len(), label.clone())
        })
        .collect();
    let mut left = want - quotas.iter().map(|q| q.0).sum::<usize>();
    quotas.sort_by(|a, b| {
        b.1.cmp(&a.1)
            .then(a.2.cmp(&b.2))
            .then_with(|| a.3.cmp(&b.3))
    });
    for quota in &mut quotas {
        if left == 0 {
            break;
        }
        quota.0 += 1;
        left -= 1;
    }
    quotas
        .into_iter()
        .flat_map(|(n, _, _, label)| {
            let mut group = by_label.remove(&label).unwrap_or_default();
            group.truncate(n);
            group
        })
        .collect()
}

/// Reads the task's feedback. With a parent snapshot and a replay ratio, takes the rows newer than the
/// snapshot and an even sample of `replay` older rows per new one; otherwise every row.
pub(super) fn select_data(
    deps: &TrainerDeps,
    task: &crate::adapters::registry::Task,
    config: &TrainConfig,
    parent_snapshot: Option<i64>,
) -> Result<Dataset, TrainError> {
    let rows = deps
        .feedback
        .latest(
            &task.name,
            MAX_ROWS,
            CHARS_PER_TOKEN * deps.model.tokenizer.max_length().max(config.max_length),
        )
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    let snapshot_id = rows.last().map_or(0, |r| r.id);
    let (rows, superseded_rows) = newest_label_per_text(rows);
    let (mut chosen, new_rows, replayed_rows) = match (parent_snapshot, config.replay) {
        (Some(cut), Some(ratio)) => {
            let (old, new): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| r.id <= cut);
            if new.is_empty() {
                return Err(TrainError::Invalid(format!(
                    "no feedback arrived since the stable generation's data (row {cut}); \
                     set \"replay\": null to retrain on all of it"
                )));
            }
            let want = ((new.len() as f64 * ratio).ceil() as usize).min(old.len());
            let old = stratified_sample(old, want, config.seed ^ 0x2E91A7);
            let (n, r) = (new.len(), old.len());
            (new.into_iter().chain(old).collect::<Vec<_>>(), n, r)
        }
        _ => {
            let n = rows.len();
            (rows, n, 0)
        }
    };
    chosen.sort_by_key(|r| r.id);
    let mut examples = Vec::with_capacity(chosen.len());
    let mut serving_ids = Vec::with_capacity(chosen.len());
    let mut fresh = Vec::with_capacity(chosen.len());
    for row in &chosen {
        let Some(label) = task.labels.iter().position(|l| *l == row.label) else {
            continue;
        };
        let ids = deps
            .model
            .tokenizer
            .encode(&row.text)
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
        examples.push(Example {
            ids: truncate(ids.clone(), config.max_length),
            label,
        });
        serving_ids.push(ids);
        fresh.push(parent_snapshot.is_none_or(|cut| row.id > cut));
    }
    for (i, label) in task.labels.iter().enumerate() {
        let n = examples.iter().filter(|e| e.label == i).count();
        if n < 2 {
            return Err(TrainError::Invalid(format!(
                "label {label:?} has {n} feedback examples in this job's data; training needs at least 2"
            )));
        }
    }
    Ok(Dataset {
        examples,
        serving_ids,
        fresh,
        snapshot_id,
        new_rows,
        replayed_rows,
        superseded_rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, text: &str, label: &str) -> Feedback {
        Feedback {
            id,
            task: "t".into(),
            text: text.into(),
            label: label.into(),
            request_id: None,
            adapter: None,
            arm: None,
            count: 1,
            created_at: 0,
        }
    }

    #[test]
    fn a_corrected_label_replaces_the_earlier_one() {
        let rows = vec![
            row(1, "win a prize", "ham"),
            row(2, "lunch at noon", "ham"),
            row(3, "win a prize", "spam"),
            row(4, "minutes attached", "ham"),
        ];
        let (kept, superseded) = newest_label_per_text(rows);
        let kept: Vec<(i64, &str)> = kept.iter().map(|r| (r.id, r.label.as_str())).collect();
        assert_eq!(kept, [(2, "ham"), (3, "spam"), (4, "ham")]);
        assert_eq!(superseded, 1);
    }

    #[test]
    fn replay_keeps_each_labels_share_of_the_older_rows() {
        let rows: Vec<Feedback> = (0..100)
            .map(|i| {
                row(
                    i,
                    &format!("mail {i}"),
                    if i % 10 == 0 { "spam" } else { "ham" },
                )
            })
            .collect();
        for want in [5, 20, 33] {
            let sample = stratified_sample(rows.clone(), want, 7);
            let spam = sample.iter().filter(|r| r.label == "spam").count();
            let distinct: std::collections::HashSet<i64> = sample.iter().map(|r| r.id).collect();
            assert_eq!((sample.len(), distinct.len()), (want, want));
            assert_eq!(spam, (want as f64 / 10.0).round() as usize, "{want}");
        }
        assert_eq!(stratified_sample(rows, 200, 7).len(), 100);
    }
}
