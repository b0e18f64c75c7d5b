//! External programs some tests drive (Prometheus, promtool, Alertmanager), installed by
//! `make test` from Debian's packages. Missing under `CI=true` is a failure, never a skip.

use std::path::PathBuf;

/// The program's path on `PATH`, or `None` (with a loud notice) outside CI.
pub fn find(program: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(program)).find(|p| p.is_file()));
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{program} is not installed: `make test` installs it; CI must run this test"
        );
        eprintln!("SKIPPED: {program} is not installed (make test installs it)");
    }
    found
}
