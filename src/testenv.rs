//! The services the test suites run against (PostgreSQL, an S3-compatible server), which `scripts/test.sh`
//! starts and names in the environment.

/// The value of `var`, which names a service `scripts/test.sh` starts. `None`, with a note on stderr, when
/// it is unset, unless `required` is set too, when it panics: the suite must not skip silently there.
pub fn service(var: &str, required: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(value) => Some(value),
        Err(_) => {
            assert!(
                std::env::var_os(required).is_none(),
                "{var} is not set (scripts/test.sh starts the service and sets it)"
            );
            eprintln!("skipped: {var} is not set (scripts/test.sh sets it)");
            None
        }
    }
}
