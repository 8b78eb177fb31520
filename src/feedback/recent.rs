//! A bounded memory of recent predictions, so feedback can name a `request_id` instead of the text.
//!
//! Oldest requests are forgotten first once either bound (entries or bytes of text) is reached.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// What a prediction request served.
#[derive(Debug, Clone, PartialEq)]
pub struct RecentRequest {
    /// The task.
    pub task: String,
    /// The inputs, in order.
    pub texts: Vec<String>,
    /// The generation that served them.
    pub adapter: String,
    /// The arm that served them.
    pub arm: String,
    /// The rollout that routed the request, if any.
    pub rollout: Option<String>,
    /// The label predicted for each input.
    pub predicted: Vec<String>,
    /// A shadow generation's predictions for the same inputs, once it has run.
    pub shadow: Option<ShadowPrediction>,
    /// The label feedback gave each input, once it has judged it (each prediction is judged once).
    pub judged: Vec<Option<String>>,
}

/// A first judgement of one input: how the serving generation did on it, and the shadow generation when it
/// had already answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    /// The rollout that routed the request, if any.
    pub rollout: Option<String>,
    /// The serving generation, the arm it served as, and whether its prediction matched the label.
    pub served: Option<(String, String, bool)>,
    /// The shadow generation and whether its prediction matched the feedback's label.
    pub shadow: Option<(String, bool)>,
}

/// What a generation running in shadow predicted.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowPrediction {
    /// The shadow generation.
    pub adapter: String,
    /// The label it predicted for each input.
    pub predicted: Vec<String>,
}

/// Approximate memory per remembered request beyond its texts (map entry, id, vectors).
const ENTRY_OVERHEAD: usize = 160;
/// Approximate memory per remembered text beyond its bytes (string header, allocation rounding).
const TEXT_OVERHEAD: usize = 48;

struct Inner {
    map: HashMap<String, Arc<RecentRequest>>,
    order: VecDeque<(String, usize)>,
    bytes: usize,
}

/// The bounded request memory; share it behind an `Arc`.
pub struct RecentRequests {
    inner: Mutex<Inner>,
    max_entries: usize,
    max_bytes: usize,
}

impl RecentRequests {
    /// Remembers at most `max_entries` requests and `max_bytes` bytes of their texts.
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
            }),
            max_entries,
            max_bytes,
        }
    }

    /// Remembers `request` under `id`, forgetting the oldest as needed. A request larger than the whole
    /// byte budget is not remembered.
    pub fn insert(&self, id: String, request: RecentRequest) {
        // Text bytes plus what each string and entry costs in memory beyond its text.
        let size = ENTRY_OVERHEAD
            + request
                .texts
                .iter()
                .map(|t| t.len() + TEXT_OVERHEAD)
                .sum::<usize>();
        if size > self.max_bytes || self.max_entries == 0 {
            return;
        }
        let mut inner = self
            .inner
            .lock()
            .expect("recent-requests lock poisoned; this is a bug");
        while inner.order.len() >= self.max_entries || inner.bytes + size > self.max_bytes {
            let Some((old, old_size)) = inner.order.pop_front() else {
                break;
            };
            inner.map.remove(&old);
            inner.bytes -= old_size;
        }
        inner.bytes += size;
        inner.order.push_back((id.clone(), size));
        inner.map.insert(id, Arc::new(request));
    }

    fn update<T>(&self, id: &str, f: impl FnOnce(&mut RecentRequest) -> T) -> Option<T> {
        let mut inner = self
            .inner
            .lock()
            .expect("recent-requests lock poisoned; this is a bug");
        let entry = inner.map.get_mut(id)?;
        let mut updated = (**entry).clone();
        let out = f(&mut updated);
        *entry = Arc::new(updated);
        Some(out)
    }

    /// Adds a shadow generation's predictions to the remembered request `id` (if still remembered).
    /// Returns, for each input feedback judged before the shadow answered, whether the shadow was right:
    /// those verdicts are the caller's to record, as [`Self::claim_judgement`] could not.
    pub fn attach_shadow(&self, id: &str, shadow: ShadowPrediction) -> Vec<bool> {
        self.update(id, |r| {
            let verdicts = r
                .judged
                .iter()
                .zip(&shadow.predicted)
                .filter_map(|(label, predicted)| label.as_ref().map(|l| l == predicted))
                .collect();
            r.shadow = Some(shadow);
            verdicts
        })
        .unwrap_or_default()
    }

    /// Records `label` as the feedback on input `index` of request `id`. Only the first time (and while the
    /// request is remembered) does it return a [`Judgement`], with the shadow's verdict if the shadow has
    /// answered; otherwise [`Self::attach_shadow`] returns it later. Both happen under one lock, so the
    /// shadow is judged exactly once whichever comes first.
    pub fn claim_judgement(&self, id: &str, index: usize, label: &str) -> Option<Judgement> {
        self.update(id, |r| {
            let slot = r.judged.get_mut(index)?;
            if slot.is_some() {
                return None;
            }
            *slot = Some(label.to_owned());
            let served = r
                .predicted
                .get(index)
                .map(|p| (r.adapter.clone(), r.arm.clone(), p == label));
            let shadow = r.shadow.as_ref().and_then(|s| {
                s.predicted
                    .get(index)
                    .map(|p| (s.adapter.clone(), p == label))
            });
            Some(Judgement {
                rollout: r.rollout.clone(),
                served,
                shadow,
            })
        })
        .flatten()
    }

    /// The request `id`, if still remembered.
    pub fn get(&self, id: &str) -> Option<Arc<RecentRequest>> {
        self.inner
            .lock()
            .expect("recent-requests lock poisoned; this is a bug")
            .map
            .get(id)
            .cloned()
    }

    /// Requests remembered now.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .expect("recent-requests lock poisoned; this is a bug")
            .map
            .len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> RecentRequest {
        RecentRequest {
            task: "t".into(),
            texts: vec![text.into()],
            adapter: "g".into(),
            arm: "stable".into(),
            rollout: None,
            predicted: vec!["a".into()],
            shadow: None,
            judged: vec![None],
        }
    }

    #[test]
    fn the_oldest_requests_are_forgotten_at_either_bound() {
        let recent = RecentRequests::new(3, 10 + 3 * (ENTRY_OVERHEAD + TEXT_OVERHEAD));
        for i in 0..5 {
            recent.insert(format!("r{i}"), request("ab"));
        }
        assert_eq!(recent.len(), 3);
        assert!(recent.get("r1").is_none() && recent.get("r4").is_some());
        recent.insert("big".into(), request("abcdefghij"));
        assert!(recent.get("big").is_some());
        assert!(
            recent.get("r3").is_none(),
            "bytes bound evicts older requests"
        );
        recent.insert(
            "huge".into(),
            request(&"x".repeat(10 + 3 * (ENTRY_OVERHEAD + TEXT_OVERHEAD))),
        );
        assert!(recent.get("huge").is_none());
    }

    #[test]
    fn a_prediction_is_judged_once() {
        let recent = RecentRequests::new(3, 1 << 20);
        recent.insert("r".into(), request("ab"));
        assert!(recent.claim_judgement("r", 0, "a").is_some());
        assert!(recent.claim_judgement("r", 0, "a").is_none());
        assert!(
            recent.claim_judgement("r", 1, "a").is_none(),
            "out of range"
        );
        assert!(recent.claim_judgement("gone", 0, "a").is_none());
    }

    fn shadow(predicted: &str) -> ShadowPrediction {
        ShadowPrediction {
            adapter: "s".into(),
            predicted: vec![predicted.into()],
        }
    }

    /// Whichever of the feedback and the shadow's answer comes first, the shadow is judged exactly once.
    #[test]
    fn the_shadow_is_judged_once_whether_it_answers_before_or_after_the_feedback() {
        let recent = RecentRequests::new(3, 1 << 20);
        recent.insert("before".into(), request("ab"));
        assert!(recent.attach_shadow("before", shadow("a")).is_empty());
        let judged = recent.claim_judgement("before", 0, "a").unwrap();
        assert_eq!(judged.shadow, Some(("s".to_owned(), true)));

        recent.insert("after".into(), request("ab"));
        let judged = recent.claim_judgement("after", 0, "a").unwrap();
        assert_eq!(judged.shadow, None, "the shadow has not answered yet");
        assert_eq!(recent.attach_shadow("after", shadow("b")), [false]);
        assert!(recent.claim_judgement("after", 0, "a").is_none());
    }
}
