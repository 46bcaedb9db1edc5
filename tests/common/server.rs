//! A real `fairlead apiserver` process for integration tests, and the real
//! kubectl pointed at it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a fresh API server may take to write its kubeconfig.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// One API server child process with its own data directory. Killed on drop.
pub struct Fairlead {
    pub data_dir: PathBuf,
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:<port>`
    pub url: String,
    pub port: u16,
    args: Vec<String>,
    child: Option<Child>,
    _tmp: Option<tempfile::TempDir>,
}

impl Fairlead {
    /// Start `fairlead apiserver` on a free port with a fresh data dir.
    pub fn start(extra: &[&str]) -> Fairlead {
        let tmp = tempfile::Builder::new()
            .prefix("fairlead-test-")
            .tempdir()
            .expect("temp dir");
        let mut f = Fairlead::start_in(tmp.path(), extra);
        f._tmp = Some(tmp);
        f
    }

    /// Start with a given data directory (kept by the caller).
    pub fn start_in(dir: &Path, extra: &[&str]) -> Fairlead {
        let mut f = Fairlead {
            data_dir: dir.to_path_buf(),
            kubeconfig: dir.join("kubeconfig"),
            url: String::new(),
            port: 0,
            args: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            _tmp: None,
        };
        f.spawn();
        f
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.join("apiserver.log"))
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fairlead"));
        cmd.arg("apiserver")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--secure-port")
            .arg(self.port.to_string())
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        let mut child = cmd.spawn().expect("spawn fairlead");
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.kubeconfig) {
                let server = text
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("server: "))
                    .expect("kubeconfig has a server")
                    .trim()
                    .to_string();
                self.port = server.rsplit(':').next().unwrap().parse().unwrap();
                self.url = server;
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("fairlead exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "fairlead did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("apiserver.log")).unwrap_or_default()
    }

    /// SIGKILL the server (no clean shutdown).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// The server's process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Run kubectl against this server.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        kubectl_cmd(&self.kubeconfig, args)
            .output()
            .expect("run kubectl (is it on PATH?)")
    }

    /// Run kubectl with `input` on stdin.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Output {
        run_with_stdin(kubectl_cmd(&self.kubeconfig, args), input)
    }

    /// Run kubectl and return stdout, panicking with stderr on failure.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        stdout_ok(format_args!("kubectl {args:?}"), self.kubectl(args))
    }

    /// A kube-rs client authenticated with the admin kubeconfig.
    pub async fn client(&self) -> kube::Client {
        client_for(&self.kubeconfig).await
    }
}

impl Drop for Fairlead {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A kube-rs client for a kubeconfig file (its user's identity).
pub async fn client_for(kubeconfig: &Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("kubeconfig");
    kube::Client::try_from(cfg).expect("client")
}

/// A kubectl command using `kubeconfig`.
pub fn kubectl_cmd(kubeconfig: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("kubectl");
    cmd.arg("--kubeconfig").arg(kubeconfig).args(args);
    // Keep kubectl's discovery cache per test, not in the user's home.
    cmd.env(
        "KUBECACHEDIR",
        kubeconfig.parent().unwrap().join("kubectl-cache"),
    );
    cmd
}

/// The stdout of `what`, which ran to `out`; panics with its stderr (and
/// stdout) when it failed.
pub fn stdout_ok(what: impl std::fmt::Display, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run `cmd` with `input` on its stdin; stdout and stderr captured.
pub fn run_with_stdin(mut cmd: Command, input: &str) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {:?}: {e}", cmd.get_program()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Poll `f` until it returns Some, or panic after `deadline` with `what`.
pub fn poll<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
