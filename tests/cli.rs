//! The command line itself: `--version`, `--log-format`, `completion`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const FAIRLEAD: &str = env!("CARGO_BIN_EXE_fairlead");

fn run(args: &[&str]) -> std::process::Output {
    Command::new(FAIRLEAD)
        .args(args)
        .output()
        .expect("run fairlead")
}

/// `--version` names the commit the binary was built from and a date.
#[test]
fn version_names_the_commit_and_build_date() {
    let out = run(&["--version"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    // Built from this checkout (CI runs on a fresh clone).
    if let Some(head) = head {
        assert!(text.contains(&format!("commit {head}")), "{text}");
    }
    let date = text
        .split("built ")
        .nth(1)
        .and_then(|r| r.strip_suffix(")\n"))
        .unwrap_or_else(|| panic!("no build date: {text}"));
    assert!(
        date.len() == 10 && date.chars().filter(|c| *c == '-').count() == 2,
        "{text}"
    );
}

/// `completion` prints scripts the shells accept; an unknown shell is a
/// one-line error and a non-zero exit.
#[test]
fn completion_scripts() {
    let out = run(&["completion", "bash"]);
    assert!(out.status.success(), "{out:?}");
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(script.contains("_fairlead()"), "{script}");
    assert!(script.contains("complete -F _fairlead"), "{script}");
    // bash parses it, and it completes subcommands.
    let check = Command::new("bash")
        .arg("-c")
        .arg(
            "source /dev/stdin; COMP_WORDS=(fairlead u); COMP_CWORD=1; _fairlead fairlead u fairlead; \
             printf '%s\\n' \"${COMPREPLY[@]}\"",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(script.as_bytes())?;
            c.wait_with_output()
        })
        .expect("bash");
    let words = String::from_utf8_lossy(&check.stdout);
    assert!(
        words.lines().any(|w| w == "up"),
        "completions of 'u': {words:?} {}",
        String::from_utf8_lossy(&check.stderr)
    );
    for shell in ["zsh", "fish"] {
        let out = run(&["completion", shell]);
        assert!(out.status.success() && !out.stdout.is_empty(), "{shell}");
    }
    let bad = run(&["completion", "nope"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.lines()
            .next()
            .unwrap_or("")
            .contains("invalid value 'nope'"),
        "{err}"
    );
}

/// `--log-format json` writes each log line as one JSON object.
#[test]
fn json_logs() {
    let mut child = Command::new(FAIRLEAD)
        .args(["--log-format", "json", "echo", "--name", "x"])
        .args(["--bind", "127.0.0.1", "--http-port", "0"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("fairlead echo");
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    assert_eq!(v["level"], "INFO", "{v}");
    assert_eq!(v["fields"]["message"], "echo servers running", "{v}");
}
