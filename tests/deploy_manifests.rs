//! The deployment files in `deploy/`: every Kubernetes manifest against the API's schema (strict), the
//! ServiceMonitor and the references between the manifests (secrets, claims, selectors, probes), the compose
//! file with docker-compose's validator, and every `flywheel` command line in them against this build's
//! flags (`deploy/check.py`; `scripts/deploy-tools.sh` installs its tools).

use std::path::Path;
use std::process::Command;

#[test]
fn the_deployment_files_validate_and_agree_with_the_binary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/deploy-tools.sh (scripts/test.sh does)",
        python.display()
    );
    let out = Command::new(&python)
        .arg(root.join("deploy/check.py"))
        .args(["--flywheel", env!("CARGO_BIN_EXE_flywheel")])
        .output()
        .expect("deploy/check.py runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "deploy/ does not check out:\n{report}"
    );
    assert!(report.contains("0 problems"), "{report}");
}
