//! The registry on a tiny model: content ids, aliases, leases, root confinement, restore after restart.

use std::path::Path;

use super::peft;
use super::registry::{Registry, RegistryError, State};
use crate::config::AdaptersConfig;
use crate::model::adapter::Target;
use crate::model::{tiny, BertConfig};

fn write_adapter(root: &Path, name: &str, seed: u64) {
    let config = BertConfig::tiny();
    let adapter = tiny::adapter(&config, seed, &[Target::Query, Target::Value], 4, false);
    peft::write_dir(&root.join(name), &adapter, 8.0, "tiny").unwrap();
}

fn open(data: &Path) -> Registry {
    Registry::open(data, AdaptersConfig::default(), BertConfig::tiny(), true).unwrap()
}

fn labels() -> Vec<String> {
    vec!["a".into(), "b".into(), "c".into()]
}

#[test]
fn loading_the_same_files_twice_yields_one_content_addressed_generation() {
    let data = tempfile::tempdir().unwrap();
    let registry = open(data.path());
    registry.create_task("t", labels()).unwrap();
    write_adapter(registry.root(), "one", 1);
    write_adapter(registry.root(), "copy", 1);
    write_adapter(registry.root(), "two", 2);
    let (g1, new1) = registry.load("one", "t", None).unwrap();
    let (g1b, new1b) = registry.load("copy", "t", None).unwrap();
    let (g2, _) = registry.load("two", "t", Some("canary")).unwrap();
    assert!(new1 && !new1b);
    assert_eq!(g1.id, g1b.id);
    assert_ne!(g1.id, g2.id);
    assert_eq!(
        registry.resolve("t").unwrap().id,
        g1.id,
        "the first generation becomes the stable alias"
    );
    assert_eq!(registry.resolve("canary").unwrap().id, g2.id);
}

#[test]
fn aliases_move_atomically_and_leases_outlive_deletion() {
    let data = tempfile::tempdir().unwrap();
    let registry = open(data.path());
    registry.create_task("t", labels()).unwrap();
    write_adapter(registry.root(), "one", 1);
    write_adapter(registry.root(), "two", 2);
    let (g1, _) = registry.load("one", "t", None).unwrap();
    let (g2, _) = registry.load("two", "t", None).unwrap();
    let lease = registry.resolve("t").unwrap();
    assert!(
        matches!(registry.delete(&g1.id), Err(RegistryError::Conflict(_))),
        "in use by an alias"
    );
    registry.set_alias("t", &g2.id).unwrap();
    registry.delete(&g1.id).unwrap();
    assert!(registry.resolve(&g1.id).is_none());
    assert_eq!(lease.id, g1.id);
    assert!(
        lease.adapter.is_some(),
        "the in-flight lease still holds the weights"
    );
    assert!(matches!(
        registry.set_alias("t", "g-nope"),
        Err(RegistryError::NotFound(_))
    ));
}

#[test]
fn paths_that_leave_the_adapter_root_are_refused() {
    let data = tempfile::tempdir().unwrap();
    let registry = open(data.path());
    registry.create_task("t", labels()).unwrap();
    let outside = tempfile::tempdir().unwrap();
    write_adapter(outside.path(), "evil", 1);
    std::os::unix::fs::symlink(outside.path().join("evil"), registry.root().join("link")).unwrap();
    for path in ["../evil", "/etc", "a/../../x", "link", ""] {
        let err = registry.load(path, "t", None).unwrap_err();
        assert!(
            matches!(err, RegistryError::Forbidden(_)),
            "{path:?}: {err}"
        );
    }
}

#[test]
fn corrupt_truncated_and_mismatched_adapters_are_invalid_and_change_nothing() {
    let data = tempfile::tempdir().unwrap();
    let registry = open(data.path());
    registry.create_task("t", labels()).unwrap();
    registry
        .create_task("two_labels", vec!["x".into(), "y".into()])
        .unwrap();
    write_adapter(registry.root(), "ok", 1);
    write_adapter(registry.root(), "bad", 1);
    let weights = registry.root().join("bad").join(peft::WEIGHTS_FILE);
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 100]).unwrap();
    assert!(matches!(
        registry.load("bad", "t", None),
        Err(RegistryError::Invalid(_))
    ));
    std::fs::write(
        registry.root().join("bad").join(peft::CONFIG_FILE),
        b"{not json",
    )
    .unwrap();
    assert!(matches!(
        registry.load("bad", "t", None),
        Err(RegistryError::Invalid(_))
    ));
    assert!(
        matches!(
            registry.load("ok", "two_labels", None),
            Err(RegistryError::Invalid(_))
        ),
        "3 outputs, 2 labels"
    );
    assert!(matches!(
        registry.load("ok", "nope", None),
        Err(RegistryError::NotFound(_))
    ));
    assert_eq!(registry.ready_count(), 0);
}

#[test]
fn a_restart_restores_tasks_generations_and_aliases_and_marks_changed_files_failed() {
    let data = tempfile::tempdir().unwrap();
    let (id1, id2) = {
        let registry = open(data.path());
        registry.create_task("t", labels()).unwrap();
        write_adapter(registry.root(), "one", 1);
        write_adapter(registry.root(), "two", 2);
        let (g1, _) = registry.load("one", "t", None).unwrap();
        let (g2, _) = registry.load("two", "t", Some("canary")).unwrap();
        (g1.id.clone(), g2.id.clone())
    };
    write_adapter(&data.path().join("adapters"), "two", 3);
    let registry = open(data.path());
    assert_eq!(registry.task("t").unwrap().labels, labels());
    assert_eq!(registry.resolve("t").unwrap().id, id1);
    assert_eq!(registry.resolve("t").unwrap().state, State::Ready);
    let changed = registry.resolve("canary").unwrap();
    assert_eq!(changed.id, id2);
    assert!(
        matches!(changed.state, State::Failed(_)),
        "{:?}",
        changed.state
    );
}

#[test]
fn task_names_labels_and_limits_are_checked() {
    let data = tempfile::tempdir().unwrap();
    let limits = AdaptersConfig {
        max_adapters: 1,
        ..AdaptersConfig::default()
    };
    let registry = Registry::open(data.path(), limits, BertConfig::tiny(), true).unwrap();
    assert!(registry.create_task("bad name", labels()).is_err());
    assert!(registry.create_task("t", vec!["only".into()]).is_err());
    assert!(registry
        .create_task("t", vec!["a".into(), "a".into()])
        .is_err());
    registry.create_task("t", labels()).unwrap();
    assert!(
        registry.create_task("t", labels()).is_ok(),
        "re-creating with the same labels is idempotent"
    );
    assert!(matches!(
        registry.create_task("t", vec!["x".into(), "y".into()]),
        Err(RegistryError::Conflict(_))
    ));
    write_adapter(registry.root(), "one", 1);
    write_adapter(registry.root(), "two", 2);
    registry.load("one", "t", None).unwrap();
    assert!(matches!(
        registry.load("two", "t", None),
        Err(RegistryError::Conflict(_))
    ));
}

#[test]
fn the_same_files_for_two_tasks_are_two_generations_each_task_its_own() {
    let data = tempfile::tempdir().unwrap();
    let registry = open(data.path());
    registry.create_task("a", labels()).unwrap();
    registry.create_task("b", labels()).unwrap();
    write_adapter(registry.root(), "shared", 1);
    let (ga, _) = registry.load("shared", "a", None).unwrap();
    let (gb, new) = registry.load("shared", "b", None).unwrap();
    assert!(new);
    assert_ne!(ga.id, gb.id);
    assert_eq!(registry.resolve("b").unwrap().task, "b");
}

#[test]
fn names_that_would_shadow_aliases_or_ids_are_refused() {
    let data = tempfile::tempdir().unwrap();
    let registry = open(data.path());
    registry.create_task("t", labels()).unwrap();
    write_adapter(registry.root(), "one", 1);
    let (g, _) = registry.load("one", "t", Some("canary")).unwrap();
    assert!(matches!(
        registry.create_task("canary", labels()),
        Err(RegistryError::Conflict(_))
    ));
    assert!(
        matches!(
            registry.set_alias(&g.id, &g.id),
            Err(RegistryError::Invalid(_))
        ),
        "ids are not aliases"
    );
    assert!(matches!(
        registry.create_task("g-abc", labels()),
        Err(RegistryError::Invalid(_))
    ));
}

#[test]
fn a_changed_sidecar_is_a_new_generation_and_symlinked_files_are_refused() {
    let data = tempfile::tempdir().unwrap();
    let registry = open(data.path());
    registry.create_task("t", labels()).unwrap();
    write_adapter(registry.root(), "one", 1);
    let (before, _) = registry.load("one", "t", None).unwrap();
    std::fs::write(
        registry
            .root()
            .join("one")
            .join(super::registry::SIDECAR_FILE),
        br#"{"head": "mean"}"#,
    )
    .unwrap();
    let (after, new) = registry.load("one", "t", None).unwrap();
    assert!(new && after.id != before.id);

    let outside = tempfile::tempdir().unwrap();
    write_adapter(outside.path(), "real", 2);
    std::fs::create_dir_all(registry.root().join("linked")).unwrap();
    for f in [peft::CONFIG_FILE, peft::WEIGHTS_FILE] {
        std::os::unix::fs::symlink(
            outside.path().join("real").join(f),
            registry.root().join("linked").join(f),
        )
        .unwrap();
    }
    let err = registry.load("linked", "t", None).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

/// A registry over the shared index in `config`'s database and the adapter root `root`, as a replica opens
/// it.
fn open_shared(root: &Path, config: &crate::config::StoreConfig) -> Registry {
    open_shared_with(root, config, None)
}

/// [`open_shared`] with the generations' files in `objects`.
fn open_shared_with(
    root: &Path,
    config: &crate::config::StoreConfig,
    objects: Option<super::objects::Objects>,
) -> Registry {
    let pool = crate::postgres::connect(config).unwrap();
    Registry::open_in(
        root,
        Box::new(super::index_store::PostgresIndex::new(pool)),
        objects,
        AdaptersConfig::default(),
        BertConfig::tiny(),
        true,
    )
    .unwrap()
}

/// Two registries over one shared PostgreSQL index and one adapter root, as two replicas would open them;
/// `None` where the tests have no PostgreSQL.
fn replicas(root: &Path) -> Option<(Registry, Registry, crate::config::StoreConfig)> {
    let config = crate::postgres::testing::scratch()?;
    Some((
        open_shared(root, &config),
        open_shared(root, &config),
        config,
    ))
}

#[test]
fn replicas_on_a_shared_index_take_in_each_others_tasks_generations_and_alias_moves() {
    let root = tempfile::tempdir().unwrap();
    let Some((a, b, config)) = replicas(root.path()) else {
        return;
    };
    a.create_task("t", labels()).unwrap();
    write_adapter(a.root(), "one", 1);
    write_adapter(a.root(), "two", 2);
    let (g1, _) = a.load("one", "t", None).unwrap();
    assert!(b.task("t").is_none(), "not taken in yet");
    assert!(b.sync().unwrap(), "B sees A's changes");
    assert!(!b.sync().unwrap(), "and nothing more");
    assert_eq!(b.task("t").unwrap().labels, labels());
    assert_eq!(
        b.resolve("t").unwrap().id,
        g1.id,
        "the stable alias, loaded"
    );
    // B loads and moves the alias; A takes it in.
    let (g2, _) = b.load("two", "t", None).unwrap();
    b.set_alias("t", &g2.id).unwrap();
    assert_eq!(a.resolve("t").unwrap().id, g1.id);
    a.sync().unwrap();
    assert_eq!(a.resolve("t").unwrap().id, g2.id);
    // A deletes the older generation; B stops serving it.
    a.delete(&g1.id).unwrap();
    b.sync().unwrap();
    assert!(b.resolve(&g1.id).is_none());
    // A generation B has not taken in is still listed, from the shared index; a deleted one is not.
    write_adapter(a.root(), "three", 3);
    let (g3, _) = a.load("three", "t", None).unwrap();
    assert!(b.resolve(&g3.id).is_none() && b.listed(&g3.id));
    assert!(!b.listed(&g1.id) && !a.listed(&g1.id));
    a.delete(&g3.id).unwrap();
    assert!(!b.listed(&g3.id));
    // A third replica, started now, restores everything from the shared index.
    let c = open_shared(root.path(), &config);
    assert_eq!(c.resolve("t").unwrap().id, g2.id);
    assert_eq!(c.ready_count(), 1);
}

#[test]
fn changes_made_on_two_replicas_at_once_are_all_kept() {
    let root = tempfile::tempdir().unwrap();
    let Some((a, b, _)) = replicas(root.path()) else {
        return;
    };
    let (a, b) = (std::sync::Arc::new(a), std::sync::Arc::new(b));
    let writers: Vec<_> = [("a", a.clone()), ("b", b.clone())]
        .into_iter()
        .map(|(prefix, registry)| {
            std::thread::spawn(move || {
                for i in 0..15 {
                    registry
                        .create_task(&format!("{prefix}{i}"), labels())
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    for registry in [&a, &b] {
        registry.sync().unwrap();
        assert_eq!(registry.tasks().len(), 30, "no replica's change was lost");
    }
}

#[test]
fn a_change_wakes_the_other_replicas_waiting_for_one() {
    let root = tempfile::tempdir().unwrap();
    let Some((a, b, _)) = replicas(root.path()) else {
        return;
    };
    let b = std::sync::Arc::new(b);
    // The first wait opens the listening connection; the change comes while the second one waits.
    b.wait_for_change(std::time::Duration::from_millis(10));
    let waiter = {
        let b = b.clone();
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            b.wait_for_change(std::time::Duration::from_secs(60));
            started.elapsed()
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    a.create_task("t", labels()).unwrap();
    let waited = waiter.join().unwrap();
    assert!(
        waited < std::time::Duration::from_secs(60),
        "woken by the change, not the timeout"
    );
    assert!(b.sync().unwrap());
    assert!(b.task("t").is_some());
}

#[test]
fn a_generation_whose_files_were_missing_loads_once_they_arrive() {
    let (shared_root, late_root) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let Some(config) = crate::postgres::testing::scratch() else {
        return;
    };
    // B's view of the adapter directory lags: the files are not there yet when it takes the change in.
    let (a, b) = (
        open_shared(shared_root.path(), &config),
        open_shared(late_root.path(), &config),
    );
    a.create_task("t", labels()).unwrap();
    write_adapter(a.root(), "one", 1);
    let (g, _) = a.load("one", "t", None).unwrap();
    b.sync().unwrap();
    assert!(
        matches!(b.resolve("t").unwrap().state, State::Failed(_)),
        "failed here, so not served"
    );
    assert_eq!(b.ready_count(), 0);
    write_adapter(b.root(), "one", 1);
    a.create_task("u", labels()).unwrap();
    b.sync().unwrap();
    let loaded = b.resolve("t").unwrap();
    assert_eq!(
        (loaded.id.as_str(), &loaded.state),
        (g.id.as_str(), &State::Ready),
        "loaded at the next change"
    );
}

/// A scratch database and a `file://` object store in a temporary directory (kept alive by the first
/// value), with the store's URL; `None` where the tests have no PostgreSQL.
fn database_and_object_store() -> Option<(tempfile::TempDir, crate::config::StoreConfig, String)> {
    let config = crate::postgres::testing::scratch()?;
    let objects = tempfile::tempdir().unwrap();
    let url = format!("file://{}", objects.path().display());
    Some((objects, config, url))
}

#[test]
fn replicas_without_a_shared_directory_fetch_generations_from_the_object_store() {
    let Some((_objects, config, url)) = database_and_object_store() else {
        return;
    };
    let (root_a, root_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let open = |root: &Path| {
        open_shared_with(
            root,
            &config,
            Some(super::objects::Objects::open(&url).unwrap()),
        )
    };
    let (a, b) = (open(root_a.path()), open(root_b.path()));
    a.create_task("t", labels()).unwrap();
    write_adapter(a.root(), "one", 1);
    let (g, _) = a.load("one", "t", None).unwrap();
    assert!(b.sync().unwrap());
    let fetched = b.resolve("t").unwrap();
    assert_eq!(
        (fetched.id.as_str(), &fetched.state),
        (g.id.as_str(), &State::Ready),
        "fetched into B's own directory, checked against its content id, and served"
    );
    assert!(b.root().join("one").join(peft::WEIGHTS_FILE).is_file());

    // A replica started later restores from the store too; one whose cached copy was tampered with
    // refuses it rather than serve other weights under the generation's id.
    let root_c = tempfile::tempdir().unwrap();
    let c = open(root_c.path());
    assert_eq!(c.resolve("t").unwrap().state, State::Ready);
    write_adapter(root_c.path(), "one", 2);
    let d = open(root_c.path());
    assert!(matches!(d.resolve("t").unwrap().state, State::Failed(_)));
}

#[test]
fn generations_registered_before_the_object_store_was_set_are_uploaded_at_the_next_start() {
    let Some((_objects, config, url)) = database_and_object_store() else {
        return;
    };
    let (root, empty) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let before = open_shared(root.path(), &config);
    before.create_task("t", labels()).unwrap();
    write_adapter(before.root(), "one", 1);
    let (g, _) = before.load("one", "t", None).unwrap();
    let store = || Some(super::objects::Objects::open(&url).unwrap());
    assert!(!store().unwrap().contains(&g.id).unwrap());
    // A process holding the files starts with the object store set, and stores them.
    open_shared_with(root.path(), &config, store());
    assert!(store().unwrap().contains(&g.id).unwrap());
    let fresh = open_shared_with(empty.path(), &config, store());
    assert_eq!(fresh.resolve("t").unwrap().state, State::Ready);
}

#[test]
fn aliases_are_limited_and_removable_but_a_tasks_stable_alias_stays() {
    let data = tempfile::tempdir().unwrap();
    let limits = AdaptersConfig {
        max_aliases: 2,
        ..AdaptersConfig::default()
    };
    let registry = Registry::open(data.path(), limits, BertConfig::tiny(), true).unwrap();
    registry.create_task("t", labels()).unwrap();
    write_adapter(registry.root(), "one", 1);
    let (g, _) = registry.load("one", "t", Some("canary")).unwrap();
    registry.set_alias("shadow", &g.id).unwrap();
    assert!(
        matches!(registry.set_alias("third", &g.id), Err(RegistryError::Conflict(m)) if m.contains("alias limit")),
        "two besides the task's own"
    );
    registry
        .set_alias("canary", &g.id)
        .expect("moving an existing alias takes no room");
    assert!(matches!(
        registry.delete(&g.id),
        Err(RegistryError::Conflict(_))
    ));
    assert!(matches!(
        registry.delete_alias("t"),
        Err(RegistryError::Conflict(_))
    ));
    assert!(matches!(
        registry.delete_alias("nope"),
        Err(RegistryError::NotFound(_))
    ));
    registry.delete_alias("shadow").unwrap();
    assert!(registry.resolve("shadow").is_none());
    registry.set_alias("third", &g.id).expect("room again");
    // A restart reads the same aliases back.
    drop(registry);
    let reopened = open(data.path());
    let mut names: Vec<String> = reopened.list().into_iter().flat_map(|(_, a)| a).collect();
    names.sort();
    assert_eq!(names, ["canary", "t", "third"]);
}
