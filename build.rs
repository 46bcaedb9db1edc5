//! Stamps the binary with the commit it was built from and the build date
//! (`fairlead --version`). Outside a git checkout both read "unknown".

use std::path::Path;
use std::process::Command;

fn main() {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    // SOURCE_DATE_EPOCH (reproducible builds) when set, else today (UTC).
    let date = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(epoch) => Command::new("date")
            .args(["-u", "-d", &format!("@{epoch}"), "+%Y-%m-%d"])
            .output()
            .ok(),
        Err(_) => Command::new("date").args(["-u", "+%Y-%m-%d"]).output().ok(),
    }
    .filter(|o| o.status.success())
    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=FAIRLEAD_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=FAIRLEAD_BUILD_DATE={date}");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    // Run again when HEAD moves: HEAD itself (a checkout) and the file of
    // the branch it points to (a commit). Only paths that exist: cargo
    // reruns a build script on every build for a path that does not.
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        let dir = Path::new(&dir);
        let mut watch = vec![dir.join("HEAD"), dir.join("packed-refs")];
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watch.push(dir.join(branch));
        }
        for p in watch.into_iter().filter(|p| p.exists()) {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    } else {
        println!("cargo:rerun-if-changed=build.rs");
    }
}
