//! A Python interpreter with the packages a test needs: `$FAIRLEAD_PYTHON`
//! (scripts/test's venv) when it has them, else `target/pyvenv`, created and
//! completed with pip on first use.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn can_import(py: &Path, module: &str) -> bool {
    Command::new(py)
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A Python that can import `module` (installing `package` if needed).
pub fn python_with(module: &str, package: &str) -> PathBuf {
    if let Some(p) = std::env::var_os("FAIRLEAD_PYTHON").map(PathBuf::from) {
        if can_import(&p, module) {
            return p;
        }
    }
    // One installer at a time: two tests of a binary running pip into the
    // same venv at once saw a half-installed package (CI: "cannot import
    // grpc" while the other test's pip was still writing it).
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyvenv");
    let py = venv.join("bin/python");
    if !can_import(&py, module) {
        if !py.exists() {
            let st = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .expect("run python3 -m venv (install python3-venv)");
            assert!(st.success(), "python3 -m venv {} failed", venv.display());
        }
        let st = Command::new(venv.join("bin/pip"))
            .args(["install", "-q", package])
            .status()
            .expect("run pip");
        assert!(st.success(), "pip install {package} failed");
        assert!(
            can_import(&py, module),
            "{} cannot import {module}",
            py.display()
        );
    }
    py
}
