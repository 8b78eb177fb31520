//! The rollout state machine on a registry of tiny adapters: starting, sticky routing, evidence, the
//! analysis acting, promotion and its recovery after a crash, and restoring from `rollouts.json`.

use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::adapters::peft;
use crate::config::AdaptersConfig;
use crate::model::adapter::Target;
use crate::model::{tiny, BertConfig};

/// A registry with task `t` whose stable generation is `one`, and a second generation `two`; returns
/// the two ids.
fn registry(data: &Path) -> (Arc<Registry>, String, String) {
    let registry = Registry::open(data, AdaptersConfig::default(), BertConfig::tiny(), true)
        .expect("the registry opens");
    let (one, two) = populate(&registry);
    (Arc::new(registry), one, two)
}

/// Creates task `t` in `registry` with generations `one`, its stable one, and `two`; returns their ids.
fn populate(registry: &Registry) -> (String, String) {
    registry
        .create_task("t", vec!["a".into(), "b".into(), "c".into()])
        .unwrap();
    let mut ids = Vec::new();
    for (name, seed) in [("one", 1), ("two", 2)] {
        let adapter = tiny::adapter(
            &BertConfig::tiny(),
            seed,
            &[Target::Query, Target::Value],
            2,
            false,
        );
        peft::write_dir(&registry.root().join(name), &adapter, 4.0, "tiny").unwrap();
        ids.push(registry.load(name, "t", None).unwrap().0.id.clone());
    }
    (ids.remove(0), ids.remove(0))
}

fn policy() -> RolloutConfig {
    RolloutConfig {
        min_feedback: 20,
        min_requests: 20,
        ..RolloutConfig::default()
    }
}

/// The rollouts of one process, kept in `<data>/rollouts.json`.
fn open(data: &Path, registry: Arc<Registry>) -> Rollouts {
    let store = Box::new(store::FileStore::new(data.join("rollouts.json")));
    Rollouts::open_in(store, registry, Metrics::new(), policy()).expect("the rollouts open")
}

fn start(rollouts: &Rollouts, candidate: &str, steps: &[f64]) -> Rollout {
    rollouts
        .start(
            StartRequest {
                task: "t".into(),
                candidate: candidate.into(),
                steps: Some(steps.to_vec()),
                ..StartRequest::default()
            },
            "test",
            false,
        )
        .expect("the rollout starts")
}

/// Routes `n` requests with keys `k0…`, records each as served in 1 ms, and judges each prediction right
/// where `right(arm)` says so.
fn traffic(rollouts: &Rollouts, n: usize, right: impl Fn(Arm) -> bool) {
    for i in 0..n {
        let route = rollouts.route("t", Some(&format!("k{i}")), "req").unwrap();
        let rollout = route.rollout.as_deref().unwrap();
        rollouts.observe("t", rollout, &route.generation, 0.001, true);
        rollouts.judge(
            "t",
            &route.generation,
            route.arm.as_str(),
            Some(rollout),
            right(route.arm),
        );
    }
}

#[test]
fn a_start_is_checked_against_the_registry_and_the_active_rollout() {
    let data = tempfile::tempdir().unwrap();
    let (registry, one, two) = registry(data.path());
    let rollouts = open(data.path(), registry);
    let request = |task: &str, candidate: &str| StartRequest {
        task: task.into(),
        candidate: candidate.into(),
        ..StartRequest::default()
    };
    let refused = |r| rollouts.start(r, "test", false).unwrap_err();
    assert!(matches!(
        refused(request("nope", &two)),
        RolloutError::NotFound(_)
    ));
    assert!(matches!(
        refused(request("t", "g-nope")),
        RolloutError::NotFound(_)
    ));
    assert!(matches!(
        refused(request("t", &one)),
        RolloutError::Conflict(_)
    ));
    let bad_share = StartRequest {
        traffic: Some(1.5),
        ..request("t", &two)
    };
    assert!(matches!(refused(bad_share), RolloutError::Invalid(_)));
    // A split at 1 leaves stable nothing to compare the candidate with; shadowing all traffic is fine.
    let all = |mode| StartRequest {
        steps: Some(vec![0.5, 1.0]),
        mode: Some(mode),
        ..request("t", &two)
    };
    assert!(matches!(refused(all(Mode::Split)), RolloutError::Invalid(m) if m.contains("below 1")));
    rollouts.start(all(Mode::Shadow), "test", false).unwrap();
    rollouts.rollback("t", "test", "next case".into()).unwrap();

    let first = start(&rollouts, &two, &[0.1, 0.5]);
    assert_eq!((first.stable.as_str(), first.traffic), (one.as_str(), 0.1));
    assert!(rollouts.uses(&one) && rollouts.uses(&two));
    assert!(matches!(
        refused(request("t", &two)),
        RolloutError::Conflict(_)
    ));
    // The trainer's canaries supersede an active rollout instead.
    let second = rollouts.start(request("t", &two), "trainer", true).unwrap();
    assert_ne!(second.id, first.id);
    let list = rollouts.list();
    assert_eq!(list.len(), 1, "one entry per task: its latest rollout");
    assert_eq!(list[0].id, second.id);
}

#[test]
fn routing_is_sticky_per_key_splits_at_the_share_and_only_grows_the_candidate() {
    let data = tempfile::tempdir().unwrap();
    let (registry, one, two) = registry(data.path());
    let rollouts = open(data.path(), registry);
    assert!(rollouts.route("t", Some("k"), "r").is_none(), "no rollout");
    start(&rollouts, &two, &[0.2, 0.6]);
    let arms = |rollouts: &Rollouts| -> Vec<Arm> {
        (0..10_000)
            .map(|i| {
                rollouts
                    .route("t", Some(&format!("user-{i}")), "r")
                    .unwrap()
                    .arm
            })
            .collect()
    };
    let at_20 = arms(&rollouts);
    assert_eq!(at_20, arms(&rollouts), "the same key, the same arm");
    let share = |a: &[Arm]| a.iter().filter(|&&a| a == Arm::Candidate).count() as f64 / 10_000.0;
    assert!((share(&at_20) - 0.2).abs() < 0.03, "{}", share(&at_20));
    let route = rollouts.route("t", Some("user-1"), "r").unwrap();
    let expected = if route.arm == Arm::Candidate {
        &two
    } else {
        &one
    };
    assert_eq!(&route.generation, expected);

    rollouts.set_traffic("t", 0.6, "test").unwrap();
    let at_60 = arms(&rollouts);
    assert!((share(&at_60) - 0.6).abs() < 0.03, "{}", share(&at_60));
    assert!(
        at_20
            .iter()
            .zip(&at_60)
            .all(|(before, after)| *before == Arm::Stable || *after == Arm::Candidate),
        "no key moves from the candidate back to stable when its share grows"
    );
}

#[test]
fn evidence_counts_only_the_active_rollouts_own_requests() {
    let data = tempfile::tempdir().unwrap();
    let (registry, one, two) = registry(data.path());
    let rollouts = open(data.path(), registry);
    let r = start(&rollouts, &two, &[0.5]);
    rollouts.observe("t", &r.id, &one, 0.002, true);
    rollouts.observe("t", &r.id, &two, 0.004, false);
    rollouts.observe("t", "r-other", &two, 0.004, true);
    rollouts.judge("t", &two, "candidate", Some(&r.id), true);
    rollouts.judge("t", &two, "pinned", None, false);
    let arms = rollouts.get("t").unwrap().arms;
    assert_eq!((arms.stable.requests, arms.stable.errors), (1, 0));
    assert_eq!((arms.candidate.requests, arms.candidate.errors), (1, 1));
    assert_eq!((arms.candidate.judged, arms.candidate.correct), (1, 1));
}

#[test]
fn the_analysis_advances_then_promotes_a_candidate_as_good_as_stable() {
    let data = tempfile::tempdir().unwrap();
    let (registry, _one, two) = registry(data.path());
    let rollouts = open(data.path(), registry.clone());
    start(&rollouts, &two, &[0.5, 0.9]);
    // Automatic rollouts act; this one was started with the default (automatic).
    assert!(rollouts.evaluate(true).is_empty(), "no evidence yet: hold");
    // Equal accuracy passes once the interval of the difference is within the 0.02 margin.
    traffic(&rollouts, 600, |_| true);
    assert_eq!(
        rollouts.evaluate(true),
        [("t".to_owned(), "advance".to_owned())]
    );
    let r = rollouts.get("t").unwrap();
    assert_eq!((r.step, r.traffic), (1, 0.9));
    assert_eq!(
        r.arms.candidate.requests, 0,
        "a new step gathers new evidence"
    );
    traffic(&rollouts, 3000, |_| true);
    assert_eq!(
        rollouts.evaluate(true),
        [("t".to_owned(), "promote".to_owned())]
    );
    assert_eq!(rollouts.get("t").unwrap().phase, Phase::Promoted);
    assert_eq!(registry.resolve("t").unwrap().id, two, "the alias moved");
    assert!(rollouts.route("t", Some("k1"), "r").is_none());
    let actions: Vec<String> = rollouts
        .get("t")
        .unwrap()
        .decisions
        .iter()
        .map(|d| d.action.clone())
        .collect();
    assert_eq!(actions, ["start", "advance", "promote"]);
}

#[test]
fn a_manual_rollout_is_analysed_but_not_acted_on() {
    let data = tempfile::tempdir().unwrap();
    let (registry, one, two) = registry(data.path());
    let rollouts = open(data.path(), registry.clone());
    rollouts
        .start(
            StartRequest {
                task: "t".into(),
                candidate: two.clone(),
                steps: Some(vec![0.5]),
                automatic: Some(false),
                ..StartRequest::default()
            },
            "test",
            false,
        )
        .unwrap();
    traffic(&rollouts, 200, |arm| arm == Arm::Stable);
    // The look's verdict stands at every analysis until the next look, for the operator to act on.
    for _ in 0..3 {
        assert!(rollouts.evaluate(true).is_empty());
        let r = rollouts.get("t").unwrap();
        assert_eq!(r.phase, Phase::Active);
        assert!(
            matches!(r.analysis, Some(Verdict::Rollback(_))),
            "{:?}",
            r.analysis
        );
    }
    let done = rollouts.rollback("t", "test", "by hand".into()).unwrap();
    assert_eq!((done.phase, done.traffic), (Phase::RolledBack, 0.0));
    assert_eq!(registry.resolve("t").unwrap().id, one);
    assert!(matches!(
        rollouts.promote("t", "test", "late".into()),
        Err(RolloutError::NotFound(_))
    ));
}

#[test]
fn a_split_share_stays_below_one_and_an_advance_never_lowers_a_share_set_by_hand() {
    let data = tempfile::tempdir().unwrap();
    let (registry, _one, two) = registry(data.path());
    let rollouts = open(data.path(), registry);
    start(&rollouts, &two, &[0.1, 0.5]);
    assert!(matches!(
        rollouts.set_traffic("t", 1.0, "test"),
        Err(RolloutError::Invalid(m)) if m.contains("promote")
    ));
    rollouts.set_traffic("t", 0.8, "test").unwrap();
    traffic(&rollouts, 600, |_| true);
    assert_eq!(
        rollouts.evaluate(true),
        [("t".to_owned(), "advance".to_owned())]
    );
    let r = rollouts.get("t").unwrap();
    assert_eq!(
        (r.step, r.traffic),
        (1, 0.8),
        "no key that saw the candidate goes back"
    );
}

#[test]
fn a_stored_split_rollout_with_a_last_step_of_one_promotes_instead_of_advancing_to_it() {
    let data = tempfile::tempdir().unwrap();
    let (registry, _one, two) = registry(data.path());
    {
        let rollouts = open(data.path(), registry.clone());
        start(&rollouts, &two, &[0.5, 0.9]);
    }
    // As an earlier release stored it: steps up to 1.
    let path = data.path().join("rollouts.json");
    let mut stored: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    stored["rollouts"]["t"][0]["steps"] = serde_json::json!([0.5, 1.0]);
    std::fs::write(&path, stored.to_string()).unwrap();
    let rollouts = open(data.path(), registry.clone());
    assert_eq!(rollouts.get("t").unwrap().steps, [0.5, 1.0]);
    traffic(&rollouts, 600, |_| true);
    assert_eq!(
        rollouts.evaluate(true),
        [("t".to_owned(), "promote".to_owned())]
    );
    assert_eq!(registry.resolve("t").unwrap().id, two);
}

#[test]
fn a_rollback_after_a_promotion_cut_short_moves_the_alias_back() {
    let data = tempfile::tempdir().unwrap();
    let (registry, one, two) = registry(data.path());
    let rollouts = open(data.path(), registry.clone());
    start(&rollouts, &two, &[0.5]);
    // The alias moved; the rollout's write did not happen (the promotion answered 503), and the operator
    // rolls back before the leader completes the promotion.
    registry.set_alias("t", &two).unwrap();
    let r = rollouts.rollback("t", "test", "by hand".into()).unwrap();
    assert_eq!(r.phase, Phase::RolledBack);
    assert!(r.decisions.last().unwrap().reason.contains("back on"));
    assert_eq!(
        registry.resolve("t").unwrap().id,
        one,
        "stable serves again"
    );
}

#[test]
fn a_restart_restores_rollouts_and_completes_a_promotion_a_crash_cut_short() {
    let data = tempfile::tempdir().unwrap();
    let (registry, _one, two) = registry(data.path());
    let id = {
        let rollouts = open(data.path(), registry.clone());
        let r = start(&rollouts, &two, &[0.3]);
        traffic(&rollouts, 10, |_| true);
        // Each analysis checkpoints the evidence.
        assert!(rollouts.evaluate(true).is_empty());
        r.id
    };
    let restored = open(data.path(), registry.clone());
    let r = restored.get("t").unwrap();
    assert_eq!(
        (r.id.as_str(), r.phase, r.traffic),
        (id.as_str(), Phase::Active, 0.3)
    );
    let counted = |a: &Arms| a.stable.requests + a.candidate.requests;
    assert_eq!(
        (counted(&r.arms), counted(&r.totals)),
        (10, 10),
        "the evidence resumes"
    );
    traffic(&restored, 5, |_| true);
    assert_eq!(counted(&restored.get("t").unwrap().totals), 15);

    // A promotion moves the alias, then records the rollout: a crash between the two leaves the alias on
    // the candidate, and the next start finishes the promotion.
    registry.set_alias("t", &two).unwrap();
    let restored = open(data.path(), registry);
    let r = restored.get("t").unwrap();
    assert_eq!(r.phase, Phase::Promoted);
    assert_eq!(r.decisions.last().unwrap().by, "restart");
}

/// A replica's registry and rollouts.
type Replica = (Arc<Registry>, Rollouts);

/// Two replicas on one PostgreSQL database: each has its registry over the shared index (tiny generations
/// `one`, stable, and `two` under one adapter root) and its rollouts over the shared store; with `two`'s id.
/// `None` where the tests have no PostgreSQL.
fn replicas(root: &Path) -> Option<([Replica; 2], String)> {
    let config = crate::postgres::testing::scratch()?;
    let open = |name: &str| {
        let pool = crate::postgres::connect(&config).unwrap();
        let registry = Arc::new(
            Registry::open_in(
                root,
                Box::new(crate::adapters::index_store::PostgresIndex::new(
                    pool.clone(),
                )),
                None,
                AdaptersConfig::default(),
                BertConfig::tiny(),
                true,
            )
            .unwrap(),
        );
        let store = Box::new(store::PostgresStore::new(pool, name.to_owned()));
        let rollouts =
            Rollouts::open_in(store, registry.clone(), Metrics::new(), policy()).unwrap();
        (registry, rollouts)
    };
    let (a, b) = (open("a"), open("b"));
    let (_, id) = populate(&a.0);
    b.0.sync().unwrap();
    Some(([a, b], id))
}

#[test]
fn replicas_share_a_rollout_route_alike_add_up_evidence_and_see_each_others_decisions() {
    let root = tempfile::tempdir().unwrap();
    let Some(([(registry_a, a), (registry_b, b)], two)) = replicas(root.path()) else {
        return;
    };
    let r = start(&a, &two, &[0.5, 0.9]);
    assert!(b.route("t", Some("k"), "r").is_none(), "not taken in yet");
    assert!(b.sync().unwrap(), "B takes A's rollout in");
    assert!(!b.sync().unwrap(), "and nothing more");
    for i in 0..1000 {
        let key = format!("user-{i}");
        let (on_a, on_b) = (a.route("t", Some(&key), "x"), b.route("t", Some(&key), "y"));
        assert_eq!(
            on_a.unwrap().generation,
            on_b.unwrap().generation,
            "{key} sees one arm on both replicas"
        );
    }

    traffic(&a, 300, |_| true);
    traffic(&b, 300, |_| true);
    for replica in [&a, &b, &a] {
        replica.exchange().unwrap();
    }
    let counted = |arms: &Arms| arms.stable.requests + arms.candidate.requests;
    for replica in [&a, &b] {
        let seen = replica.get("t").unwrap();
        assert_eq!(counted(&seen.arms), 600, "both replicas' requests count");
        assert_eq!(seen.arms.candidate.judged + seen.arms.stable.judged, 600);
    }

    // Only the leader acts on the analysis, and the other replica follows.
    assert!(b.evaluate(false).is_empty(), "a follower does not act");
    assert_eq!(a.evaluate(true), [("t".to_owned(), "advance".to_owned())]);
    assert!(b.sync().unwrap());
    let on_b = b.get("t").unwrap();
    assert_eq!(
        (on_b.id.as_str(), on_b.step, on_b.traffic),
        (r.id.as_str(), 1, 0.9)
    );
    assert_eq!(counted(&on_b.arms), 0, "the new step starts afresh");
    assert_eq!(counted(&on_b.totals), 600, "the rollout's totals go on");
    assert_eq!(
        on_b.decisions.last().unwrap().stable.requests
            + on_b.decisions.last().unwrap().candidate.requests,
        600,
        "the advance logged both replicas' evidence"
    );

    // A promotion by hand on B moves the shared alias and ends the rollout on A.
    b.promote("t", "test", "by hand".into()).unwrap();
    assert!(a.sync().unwrap());
    assert_eq!(a.get("t").unwrap().phase, Phase::Promoted);
    assert!(a.route("t", Some("k"), "r").is_none());
    registry_a.sync().unwrap();
    assert_eq!(registry_a.resolve("t").unwrap().id, two, "the alias moved");
    assert_eq!(registry_b.resolve("t").unwrap().id, two);
}

#[test]
fn replicas_starting_rollouts_at_once_start_one() {
    let root = tempfile::tempdir().unwrap();
    let Some(([(_, a), (_, b)], two)) = replicas(root.path()) else {
        return;
    };
    let request = || StartRequest {
        task: "t".into(),
        candidate: two.clone(),
        ..StartRequest::default()
    };
    // B has not seen A's rollout: only the store's lock stands between the two.
    let results = std::thread::scope(|s| {
        let (ra, rb) = (
            s.spawn(|| a.start(request(), "test", false)),
            s.spawn(|| b.start(request(), "test", false)),
        );
        [ra.join().unwrap(), rb.join().unwrap()]
    });
    let started = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(started, 1, "{results:?}");
    assert!(results
        .iter()
        .any(|r| matches!(r, Err(RolloutError::Conflict(_)))));
    b.sync().unwrap();
    a.sync().unwrap();
    assert_eq!(a.get("t").unwrap().id, b.get("t").unwrap().id);
}

#[test]
fn a_candidate_gone_from_the_registry_is_not_routed_and_the_leader_rolls_its_rollout_back() {
    let data = tempfile::tempdir().unwrap();
    let (registry, one, two) = registry(data.path());
    let rollouts = open(data.path(), registry.clone());
    let r = start(&rollouts, &two, &[0.999]);
    assert_eq!(rollouts.route("t", Some("k"), "x").unwrap().generation, two);
    // Deleted elsewhere (another replica's admin call), or not fetched here yet.
    registry.delete(&two).unwrap();
    let route = rollouts.route("t", Some("k"), "x").unwrap();
    assert_eq!(
        (route.generation.as_str(), route.rollout.as_deref()),
        (one.as_str(), None),
        "stable serves the candidate's share, outside the evidence"
    );
    assert!(
        rollouts.evaluate(false).is_empty(),
        "a follower leaves it to the leader"
    );
    assert_eq!(
        rollouts.evaluate(true),
        [("t".to_owned(), "rollback".to_owned())]
    );
    let ended = rollouts.get("t").unwrap();
    assert_eq!((ended.id, ended.phase), (r.id, Phase::RolledBack));
    assert_eq!(ended.decisions.last().unwrap().by, "analysis");
}

#[test]
fn a_promotion_whose_record_failed_after_the_alias_moved_is_completed_by_the_leader() {
    let data = tempfile::tempdir().unwrap();
    let (registry, _one, two) = registry(data.path());
    let rollouts = open(data.path(), registry.clone());
    start(&rollouts, &two, &[0.5]);
    // The alias moved; the rollout's write did not happen (the store failed, the call answered 503).
    registry.set_alias("t", &two).unwrap();
    assert_eq!(
        rollouts.evaluate(true),
        [("t".to_owned(), "promote".to_owned())]
    );
    let r = rollouts.get("t").unwrap();
    assert_eq!(
        (r.phase, r.decisions.last().unwrap().by.as_str()),
        (Phase::Promoted, "analysis")
    );
}

#[test]
fn steps_must_rise_and_the_decision_log_keeps_its_start_and_latest_entries() {
    let data = tempfile::tempdir().unwrap();
    let (registry, _, two) = registry(data.path());
    let rollouts = open(data.path(), registry);
    for steps in [vec![0.9, 0.1], vec![0.2, 0.2]] {
        let refused = rollouts.start(
            StartRequest {
                task: "t".into(),
                candidate: two.clone(),
                steps: Some(steps.clone()),
                ..StartRequest::default()
            },
            "test",
            false,
        );
        assert!(
            matches!(refused, Err(RolloutError::Invalid(_))),
            "{steps:?}: {refused:?}"
        );
    }
    start(&rollouts, &two, &[0.1, 0.5]);
    let sets = record::MAX_DECISIONS + 50;
    for i in 0..sets {
        rollouts
            .set_traffic("t", 0.01 + i as f64 / 1_000.0, "manual")
            .unwrap();
    }
    let log = rollouts.get("t").unwrap().decisions;
    assert_eq!(log.len(), record::MAX_DECISIONS);
    assert_eq!(log[0].action, "start");
    let last = log.last().unwrap();
    assert_eq!(last.action, "traffic");
    assert!((last.traffic - (0.01 + (sets - 1) as f64 / 1_000.0)).abs() < 1e-12);
    // The oldest traffic changes went; the log runs on from the start to the newest.
    assert!(
        (log[1].traffic - (0.01 + (sets - record::MAX_DECISIONS + 1) as f64 / 1_000.0)).abs()
            < 1e-12
    );
}

#[test]
fn a_generation_in_a_rollout_is_not_deleted_and_a_deleted_one_cannot_start_one() {
    let data = tempfile::tempdir().unwrap();
    let (registry, _, two) = registry(data.path());
    let rollouts = open(data.path(), registry.clone());
    start(&rollouts, &two, &[0.5]);
    let refused = rollouts.unless_in_use(&two, || registry.delete(&two));
    assert!(
        matches!(refused, Err(RolloutError::Conflict(_))),
        "{refused:?}"
    );
    assert!(registry.resolve(&two).is_some());
    rollouts.rollback("t", "test", "done".into()).unwrap();
    rollouts
        .unless_in_use(&two, || registry.delete(&two))
        .unwrap()
        .unwrap();
    assert!(!registry.listed(&two));
    let started = rollouts.start(
        StartRequest {
            task: "t".into(),
            candidate: two.clone(),
            ..StartRequest::default()
        },
        "test",
        false,
    );
    assert!(
        matches!(started, Err(RolloutError::NotFound(_))),
        "{started:?}"
    );
}

#[test]
fn online_accuracy_waits_for_enough_judgements_and_ends_with_its_generation_or_rollout() {
    let data = tempfile::tempdir().unwrap();
    let (registry, one, two) = registry(data.path());
    let rollouts = open(data.path(), registry);
    // As a scrape reads it (asking the gauge vector would create the series).
    let gauge = |arm: &str| {
        let series = format!("flywheel_online_accuracy{{arm=\"{arm}\",task=\"t\"}} ");
        let exposition = rollouts.metrics.render();
        let line = exposition.lines().find(|l| l.starts_with(&series))?;
        line[series.len()..].parse::<f64>().ok()
    };
    // One disagreeing judgement is no figure yet.
    rollouts.judge("t", &one, "stable", None, false);
    assert_eq!(gauge("stable"), None);
    for _ in 0..19 {
        rollouts.judge("t", &one, "stable", None, true);
    }
    assert_eq!(gauge("stable"), Some(0.95));

    let r = start(&rollouts, &two, &[0.5]);
    traffic(&rollouts, 80, |arm| arm == Arm::Stable);
    assert!(
        gauge("candidate").is_some_and(|a| a < 0.5),
        "{:?}",
        gauge("candidate")
    );
    rollouts.rollback("t", "test", "wrong".into()).unwrap();
    assert_eq!(
        gauge("candidate"),
        None,
        "the rolled-back arm's accuracy must not stand"
    );
    // Labels that arrive late for the ended rollout's predictions do not bring it back.
    for _ in 0..30 {
        rollouts.judge("t", &two, "candidate", Some(&r.id), false);
    }
    assert_eq!(gauge("candidate"), None);
    // The next candidate starts from nothing: none of its predecessor's record.
    let next = start(&rollouts, &two, &[0.5]);
    for _ in 0..20 {
        rollouts.judge("t", &two, "candidate", Some(&next.id), true);
    }
    assert_eq!(gauge("candidate"), Some(1.0));
}
