//! The contract every [`FeedbackStore`] keeps, run against each engine: SQLite always, PostgreSQL where the
//! tests have one (`FLYWHEEL_TEST_POSTGRES_URL`, which `scripts/test.sh` sets).

use std::sync::Arc;

use super::postgres::PostgresStore;
use super::sqlite::SqliteStore;
use super::{FeedbackStore, NewFeedback};

fn row(text: &str, label: &str) -> NewFeedback {
    NewFeedback {
        task: "spam".into(),
        text: text.into(),
        label: label.into(),
        request_id: None,
        adapter: None,
        arm: None,
    }
}

/// An opener of each engine there is, over one fresh database: each call opens the store anew, as a
/// restarted process or another replica would. The directory holds the SQLite file.
type Opener = Box<dyn Fn() -> Arc<dyn FeedbackStore>>;

fn engines() -> Vec<(&'static str, Opener, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("feedback.sqlite");
    let sqlite: Opener = Box::new(move || Arc::new(SqliteStore::open(&path).unwrap()));
    let mut out = vec![("sqlite", sqlite, dir)];
    if let Some(config) = crate::postgres::testing::scratch() {
        let postgres: Opener = Box::new(move || {
            Arc::new(PostgresStore::new(
                crate::postgres::connect(&config).unwrap(),
            ))
        });
        out.push(("postgres", postgres, tempfile::tempdir().unwrap()));
    }
    out
}

#[test]
fn rows_survive_reopening() {
    for (engine, open, _dir) in engines() {
        let ids = open().append(&[row("a", "spam"), row("b", "ham")]).unwrap();
        let listed = open().list("spam", 0, 10).unwrap();
        assert_eq!(
            listed.iter().map(|f| f.id).collect::<Vec<_>>(),
            ids.iter().map(|a| a.id).collect::<Vec<_>>(),
            "{engine}"
        );
    }
}

#[test]
fn rows_list_in_id_order_and_the_newest_come_oldest_first() {
    for (engine, open, _dir) in engines() {
        let store = open();
        let ids = store
            .append(&[row("a", "spam"), row("b", "ham"), row("c", "spam")])
            .unwrap();
        let listed = store.list("spam", 0, 10).unwrap();
        assert_eq!(
            listed.iter().map(|f| f.id).collect::<Vec<_>>(),
            ids.iter().map(|a| a.id).collect::<Vec<_>>(),
            "{engine}"
        );
        assert_eq!(store.list("spam", ids[0].id, 1).unwrap()[0].text, "b");
        let newest = store.latest("spam", 2, 100).unwrap();
        assert_eq!(
            newest.iter().map(|f| f.text.as_str()).collect::<Vec<_>>(),
            ["b", "c"],
            "{engine}: the newest rows, oldest first"
        );
        assert_eq!(store.count("spam").unwrap(), 3, "{engine}");
        assert_eq!(store.count("other").unwrap(), 0, "{engine}");
        assert!(store.list("other", 0, 10).unwrap().is_empty());
    }
}

#[test]
fn a_training_read_cuts_each_text_at_a_number_of_characters() {
    for (engine, open, _dir) in engines() {
        let store = open();
        store
            .append(&[
                row("好评！很好的酒店，下次还来", "ham"),
                row("short", "spam"),
            ])
            .unwrap();
        let cut = store.latest("spam", 10, 4).unwrap();
        assert_eq!(
            cut.iter().map(|f| f.text.as_str()).collect::<Vec<_>>(),
            ["好评！很", "shor"],
            "{engine}: characters, not bytes"
        );
        assert_eq!(
            store.list("spam", 0, 10).unwrap()[0].text,
            "好评！很好的酒店，下次还来",
            "{engine}: the stored text is whole"
        );
    }
}

#[test]
fn every_field_reads_back_as_written() {
    for (engine, open, _dir) in engines() {
        let store = open();
        let full = NewFeedback {
            task: "意图".into(),
            text: "退款什么时候到账？ 🙂".into(),
            label: "售后".into(),
            request_id: Some("req-1".into()),
            adapter: Some("gen-abc".into()),
            arm: Some("candidate".into()),
        };
        store.append(std::slice::from_ref(&full)).unwrap();
        let back = &store.list("意图", 0, 1).unwrap()[0];
        assert_eq!(
            (&back.task, &back.text, &back.label),
            (&full.task, &full.text, &full.label),
            "{engine}"
        );
        assert_eq!(
            (&back.request_id, &back.adapter, &back.arm),
            (&full.request_id, &full.adapter, &full.arm),
            "{engine}"
        );
        assert_eq!(back.count, 1);
        assert!(back.created_at > 1_700_000_000, "{engine}: unix seconds");
    }
}

#[test]
fn duplicates_are_counted_not_doubled_but_a_new_label_is_a_new_row() {
    for (engine, open, _dir) in engines() {
        let store = open();
        let first = store.append(&[row("same", "spam")]).unwrap()[0];
        assert!(!first.duplicate);
        let again = store
            .append(&[row("same", "spam"), row("same", "spam")])
            .unwrap();
        assert!(
            again.iter().all(|a| a.duplicate && a.id == first.id),
            "{engine}: {again:?}"
        );
        let relabelled = store.append(&[row("same", "ham")]).unwrap()[0];
        assert!(!relabelled.duplicate, "{engine}");
        let listed = store.list("spam", 0, 10).unwrap();
        assert_eq!(listed.len(), 2, "{engine}");
        assert_eq!(listed[0].count, 3, "{engine}");
    }
}

#[test]
fn a_label_posted_again_after_a_correction_becomes_the_newest_row() {
    for (engine, open, _dir) in engines() {
        let store = open();
        let first = store.append(&[row("flip", "spam")]).unwrap()[0];
        store.append(&[row("other", "ham")]).unwrap();
        let corrected = store.append(&[row("flip", "ham")]).unwrap()[0];
        // Posted again: "spam" is what the caller means now, so its row moves after the correction.
        let again = store.append(&[row("flip", "spam")]).unwrap()[0];
        assert!(again.duplicate, "{engine}");
        assert!(
            again.id > corrected.id,
            "{engine}: {again:?} after {corrected:?}"
        );
        let listed = store.list("spam", 0, 10).unwrap();
        let flip: Vec<(i64, &str, i64)> = listed
            .iter()
            .filter(|f| f.text == "flip")
            .map(|f| (f.id, f.label.as_str(), f.count))
            .collect();
        assert_eq!(
            flip,
            [(corrected.id, "ham", 1), (again.id, "spam", 2)],
            "{engine}"
        );
        let moved = listed.iter().find(|f| f.id == again.id).unwrap();
        let original = first.id;
        assert!(
            listed.iter().all(|f| f.id != original),
            "{engine}: the old id is gone"
        );
        assert!(
            moved.created_at > 0,
            "{engine}: the first posting's time is kept"
        );
        assert_eq!(store.count("spam").unwrap(), 3, "{engine}");
        // Once newest, posting it again counts in place; within one batch the same holds row by row, and
        // each answer names the row where the batch left it (the first spam was moved by the third).
        let batch = store
            .append(&[row("flip", "spam"), row("flip", "ham"), row("flip", "spam")])
            .unwrap();
        assert_eq!(batch[0].id, batch[2].id, "{engine}: {batch:?}");
        assert!(
            batch[2].id > batch[1].id && batch[1].id > again.id,
            "{engine}: {batch:?}"
        );
        let listed = store.list("spam", 0, 10).unwrap();
        assert!(
            batch.iter().all(|a| listed.iter().any(|f| f.id == a.id)),
            "{engine}: every answer names a stored row: {batch:?} {listed:?}"
        );
        let newest = store.latest("spam", 1, 100).unwrap();
        assert_eq!(
            (
                newest[0].text.as_str(),
                newest[0].label.as_str(),
                newest[0].count
            ),
            ("flip", "spam", 4),
            "{engine}"
        );
    }
}

#[test]
fn a_batch_answers_in_its_own_order_whatever_order_it_is_written_in() {
    for (engine, open, _dir) in engines() {
        let store = open();
        let texts = ["zulu", "alpha", "mike", "alpha", "bravo"];
        let appended = store.append(&texts.map(|t| row(t, "spam"))).unwrap();
        let listed = store.list("spam", 0, 10).unwrap();
        for (text, a) in texts.iter().zip(&appended) {
            let stored = listed.iter().find(|f| f.id == a.id).unwrap();
            assert_eq!(stored.text, *text, "{engine}: each answer is its own row's");
        }
        assert_eq!(
            appended.iter().filter(|a| a.duplicate).count(),
            1,
            "{engine}: the second alpha"
        );
    }
}

#[test]
fn replicas_appending_overlapping_batches_at_once_lose_nothing_and_count_everything() {
    const WRITERS: usize = 4;
    const ROUNDS: usize = 25;
    for (engine, open, _dir) in engines() {
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let store = open();
                std::thread::spawn(move || {
                    for round in 0..ROUNDS {
                        // Every writer posts the same shared texts, in its own order, and one of its own.
                        let mut batch: Vec<NewFeedback> = (0..8)
                            .map(|k| row(&format!("shared {k}"), "spam"))
                            .collect();
                        batch.rotate_left((w + round) % 8);
                        batch.push(row(&format!("own {w} {round}"), "ham"));
                        store.append(&batch).expect("every append commits");
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let rows = open().list("spam", 0, 1000).unwrap();
        assert_eq!(rows.len(), 8 + WRITERS * ROUNDS, "{engine}");
        for shared in rows.iter().filter(|f| f.text.starts_with("shared")) {
            assert_eq!(
                shared.count as usize,
                WRITERS * ROUNDS,
                "{engine}: {shared:?}"
            );
        }
    }
}

#[test]
fn a_reader_paging_by_id_while_replicas_write_misses_no_row() {
    const WRITERS: usize = 4;
    const BATCHES: usize = 40;
    for (engine, open, _dir) in engines() {
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (store, done) = (open(), done.clone());
                std::thread::spawn(move || {
                    let mut ids = Vec::new();
                    for b in 0..BATCHES {
                        let batch: Vec<NewFeedback> = (0..5)
                            .map(|i| row(&format!("{w}/{b}/{i}"), "spam"))
                            .collect();
                        ids.extend(store.append(&batch).unwrap().into_iter().map(|a| a.id));
                    }
                    done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    ids
                })
            })
            .collect();
        // The reader keeps only a cursor, as an export job would: what it passes it never sees again.
        let reader = open();
        let mut seen = std::collections::BTreeSet::new();
        let mut after = 0;
        loop {
            let finished = done.load(std::sync::atomic::Ordering::SeqCst) == WRITERS;
            let page = reader.list("spam", after, 7).unwrap();
            if page.is_empty() && finished {
                break;
            }
            for f in page {
                seen.insert(f.id);
                after = f.id;
            }
        }
        let written: std::collections::BTreeSet<i64> = writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        let missed: Vec<_> = written.difference(&seen).collect();
        assert!(missed.is_empty(), "{engine}: the cursor passed {missed:?}");
    }
}
