//! The container runtime, behind [`Runtime`], so a CRI runtime
//! (containerd) or podman can replace it without touching the agent.
//!
//! [`ProcessRuntime`] runs each container's `command` and `args` as a host
//! process; no image is pulled. Between fork and exec the child:
//! 1. starts its own session (so it outlives a restarted agent and its
//!    process group can be signalled);
//! 2. writes itself into the pod's cgroups;
//! 3. joins the pod's network namespace (unless `hostNetwork`);
//! 4. unshares a mount namespace in which the pod's own `resolv.conf` and
//!    `hosts` are bind-mounted over `/etc/resolv.conf` and `/etc/hosts`
//!    and its service-account directory over `SERVICE_ACCOUNT_DIR`,
//!    and a UTS namespace whose hostname is the pod's.
//!
//! The image `fairlead` (any tag) is this binary: its entrypoint is
//! `fairlead`, so `args: [echo]` or `command: [fairlead, echo]` run
//! `fairlead echo`. stdout and stderr go, appended, to the container's log
//! file, which survives agent restarts (the agent rotates it).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::api::satoken::SERVICE_ACCOUNT_DIR;

/// What a container runs in: the pod's namespaces, files and cgroups.
#[derive(Clone, Debug)]
pub struct Sandbox {
    /// `/run/netns/<name>`; `None` for `hostNetwork` pods.
    pub netns: Option<PathBuf>,
    /// The pod's `/etc/resolv.conf` and `/etc/hosts`; `None` keeps the
    /// host's.
    pub resolv_conf: Option<PathBuf>,
    pub hosts: Option<PathBuf>,
    /// The pod's hostname (`None`: the host's, for `hostNetwork`).
    pub hostname: Option<String>,
    /// The `cgroup.procs` files to join.
    pub cgroup_procs: Vec<PathBuf>,
    /// The pod's service-account directory (token, ca.crt, namespace),
    /// mounted at [`SERVICE_ACCOUNT_DIR`]; `None` without
    /// automountServiceAccountToken.
    pub service_account: Option<PathBuf>,
}

/// One container to start.
#[derive(Clone, Debug)]
pub struct ContainerRun {
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub log: PathBuf,
}

/// A started container.
#[async_trait]
pub trait Running: Send {
    /// The runtime's id for it (`containerID` without the scheme).
    fn id(&self) -> String;
    /// A handle that signals the container's process, usable while
    /// [`Running::wait`] runs elsewhere.
    fn killer(&self) -> Killer;
    /// Wait for it to end; its exit code (128 + n when killed by signal n).
    async fn wait(&mut self) -> i32;
}

/// A container runtime.
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// The scheme of its container ids (`process://`).
    fn scheme(&self) -> &'static str;
    /// Start a container in `sb`. The error is the message a Waiting
    /// `RunContainerError` status shows.
    async fn start(&self, sb: &Sandbox, c: &ContainerRun) -> Result<Box<dyn Running>, String>;
    /// Take over a container that a previous agent started (its `id`),
    /// if it still runs. Its exit code is not known when it ends (it is
    /// not this process's child): `wait` then returns [`UNKNOWN_EXIT`].
    fn adopt(&self, id: &str) -> Result<Box<dyn Running>, String>;
    /// Run `argv` in the sandbox (exec probes) with `env`, up to `timeout`;
    /// its exit code, or an error (not started, timed out).
    async fn exec(
        &self,
        sb: &Sandbox,
        argv: &[String],
        env: &[(String, String)],
        timeout: Duration,
    ) -> Result<i32, String>;
}

/// A process's start time (clock ticks after boot, `/proc/<pid>/stat`
/// field 22): with the pid, an identity no later process shares.
pub fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it don't.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Record `pid` in `file` (`<pid> <start ticks>`), so it can be found
/// again after the agent restarts.
pub fn record_pid(file: &std::path::Path, pid: i32) {
    if let Some(t) = start_ticks(pid) {
        let _ = std::fs::write(file, format!("{pid} {t}"));
    }
}

/// The process recorded in `file`, if that very process still runs.
pub fn recorded_alive(file: &std::path::Path) -> Option<i32> {
    let s = std::fs::read_to_string(file).ok()?;
    let mut it = s.split_whitespace().map(|x| x.parse::<u64>().ok());
    let (Some(Some(pid)), Some(Some(ticks))) = (it.next(), it.next()) else {
        return None;
    };
    let pid = pid as i32;
    (start_ticks(pid) == Some(ticks)).then_some(pid)
}

/// SIGKILL the process group of the process recorded in `file`, if that
/// very process still runs.
pub fn kill_recorded(file: &std::path::Path) {
    if let Some(pid) = recorded_alive(file) {
        // SAFETY: kill(2) of the recorded container's own process group
        // (it started its own session), checked to be the same process.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// Whether `image` is this binary (`fairlead`, `fairlead:<tag>`, or a
/// registry path ending in `/fairlead[:tag]`).
pub fn is_self_image(image: &str) -> bool {
    let name = image.rsplit('/').next().unwrap_or(image);
    let name = name.split(['@', ':']).next().unwrap_or(name);
    name == "fairlead"
}

/// The argv a container runs: `command` then `args`, with the `fairlead`
/// image's entrypoint when `command` is empty and `fairlead` resolved to
/// this binary.
pub fn argv(c: &ContainerRun) -> Result<Vec<String>, String> {
    let mut argv: Vec<String> = if c.command.is_empty() {
        if is_self_image(&c.image) {
            vec!["fairlead".into()]
        } else {
            return Err(format!(
                "container has no command: image {:?} is not fetched, so there is no entrypoint \
                 (only the image \"fairlead\" has one)",
                c.image
            ));
        }
    } else {
        c.command.clone()
    };
    argv.extend(c.args.iter().cloned());
    if argv[0] == "fairlead" && is_self_image(&c.image) {
        argv[0] = std::env::current_exe()
            .map_err(|e| format!("locating the fairlead binary: {e}"))?
            .display()
            .to_string();
    }
    Ok(argv)
}

/// The exit code reported for an adopted container that ended (the
/// kernel only tells a process's parent how it ended).
pub const UNKNOWN_EXIT: i32 = 255;

/// A container process started by an earlier agent: watched through its
/// pidfd, which becomes readable when the process ends.
struct AdoptedProcess {
    pid: i32,
    fd: tokio::io::unix::AsyncFd<OwnedFd>,
    killer: Killer,
}

#[async_trait]
impl Running for AdoptedProcess {
    fn id(&self) -> String {
        self.pid.to_string()
    }
    fn killer(&self) -> Killer {
        self.killer.clone()
    }
    async fn wait(&mut self) -> i32 {
        let _ = self.fd.readable().await;
        UNKNOWN_EXIT
    }
}

/// Host processes in the pod's namespaces (see the module doc).
#[derive(Default)]
pub struct ProcessRuntime;

struct ProcessContainer {
    child: tokio::process::Child,
    pid: i32,
    killer: Killer,
}

/// Signals one process through a pidfd, so a signal never reaches another
/// process that reused the pid after ours was reaped.
#[derive(Clone)]
pub struct Killer(Arc<Option<OwnedFd>>);

impl Killer {
    /// A killer for `pid` (which must not have been reaped yet).
    pub fn for_pid(pid: i32) -> Killer {
        // SAFETY: pidfd_open takes a pid and flags; the result is a new fd
        // or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
        // SAFETY: a fresh fd owned by nobody else.
        Killer(Arc::new(
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) }),
        ))
    }

    /// A killer that signals nothing (for tests).
    pub fn none() -> Killer {
        Killer(Arc::new(None))
    }

    pub fn signal(&self, sig: i32) {
        if let Some(fd) = self.0.as_ref() {
            // SAFETY: pidfd_send_signal with our own pidfd and no siginfo.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    sig,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
            }
        }
    }
}

#[async_trait]
impl Running for ProcessContainer {
    fn id(&self) -> String {
        self.pid.to_string()
    }
    fn killer(&self) -> Killer {
        self.killer.clone()
    }
    async fn wait(&mut self) -> i32 {
        use std::os::unix::process::ExitStatusExt;
        match self.child.wait().await {
            Ok(st) => st
                .code()
                .or_else(|| st.signal().map(|s| 128 + s))
                .unwrap_or(128),
            Err(_) => 128,
        }
    }
}

/// What the child does between fork and exec, prepared before the fork
/// (nothing in the child allocates).
struct Prepared {
    netns: Option<OwnedFd>,
    cgroups: Vec<OwnedFd>,
    binds: Vec<(CString, CString)>,
    hostname: Option<CString>,
}

impl Prepared {
    fn new(sb: &Sandbox) -> Result<Prepared, String> {
        let open = |p: &PathBuf, write: bool| -> Result<OwnedFd, String> {
            std::fs::OpenOptions::new()
                .read(!write)
                .write(write)
                .open(p)
                .map(OwnedFd::from)
                .map_err(|e| format!("opening {}: {e}", p.display()))
        };
        let cstr = |s: &str| CString::new(s).map_err(|_| format!("NUL in {s:?}"));
        let mut binds = Vec::new();
        if sb.service_account.is_some() {
            // The mount point, on the host (empty; /run is a tmpfs).
            std::fs::create_dir_all(SERVICE_ACCOUNT_DIR)
                .map_err(|e| format!("creating {SERVICE_ACCOUNT_DIR}: {e}"))?;
        }
        for (src, dst) in [
            (&sb.resolv_conf, "/etc/resolv.conf"),
            (&sb.hosts, "/etc/hosts"),
            (&sb.service_account, SERVICE_ACCOUNT_DIR),
        ] {
            if let Some(src) = src {
                binds.push((cstr(&src.display().to_string())?, cstr(dst)?));
            }
        }
        Ok(Prepared {
            netns: sb.netns.as_ref().map(|p| open(p, false)).transpose()?,
            cgroups: sb
                .cgroup_procs
                .iter()
                .map(|p| open(p, true))
                .collect::<Result<_, _>>()?,
            binds,
            hostname: sb.hostname.as_deref().map(cstr).transpose()?,
        })
    }

    /// Runs in the child after fork: only async-signal-safe system calls.
    fn enter(&self) -> std::io::Result<()> {
        let check = |r: libc::c_int| {
            if r < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: plain system calls on file descriptors and C strings
        // prepared before the fork; no allocation, no locks.
        unsafe {
            check(libc::setsid())?;
            // A container runs at the default CPU priority, whatever the
            // thread that started it had (`fairlead up` lowers its node's
            // sync thread). Best effort: raising it back needs CAP_SYS_NICE.
            libc::setpriority(libc::PRIO_PROCESS, 0, 0);
            for fd in &self.cgroups {
                check(libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) as libc::c_int)?;
            }
            if let Some(fd) = &self.netns {
                check(libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET))?;
            }
            let mut flags = libc::CLONE_NEWNS;
            if self.hostname.is_some() {
                flags |= libc::CLONE_NEWUTS;
            }
            check(libc::unshare(flags))?;
            // Our mounts must not propagate back to the host.
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ))?;
            for (src, dst) in &self.binds {
                check(libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?;
            }
            if let Some(h) = &self.hostname {
                check(libc::sethostname(h.as_ptr(), h.as_bytes().len()))?;
            }
        }
        Ok(())
    }
}

/// A command for `argv` that enters `sb` before it execs.
fn command(
    sb: &Sandbox,
    argv: &[String],
    env: &[(String, String)],
) -> Result<tokio::process::Command, String> {
    let prepared = Prepared::new(sb)?;
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_clear();
    // A container gets a PATH when its env has none (as images do).
    if !env.iter().any(|(k, _)| k == "PATH") {
        cmd.env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    // SAFETY: `enter` only makes async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || prepared.enter());
    }
    Ok(tokio::process::Command::from(cmd))
}

/// A start error in the kubelet's words.
fn start_error(argv0: &str, e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "failed to start container: exec: {argv0:?}: executable file not found in $PATH"
        ),
        std::io::ErrorKind::PermissionDenied => {
            format!("failed to start container: exec: {argv0:?}: permission denied")
        }
        _ => format!("failed to start container: {argv0:?}: {e}"),
    }
}

#[async_trait]
impl Runtime for ProcessRuntime {
    fn scheme(&self) -> &'static str {
        "process"
    }

    async fn start(&self, sb: &Sandbox, c: &ContainerRun) -> Result<Box<dyn Running>, String> {
        let argv = argv(c)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&c.log)
            .map_err(|e| format!("opening the log {}: {e}", c.log.display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = command(sb, &argv, &c.env)?;
        if let Some(d) = &c.working_dir {
            cmd.current_dir(d);
        }
        cmd.stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(false);
        let child = cmd.spawn().map_err(|e| start_error(&argv[0], &e))?;
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        Ok(Box::new(ProcessContainer {
            child,
            pid,
            killer: Killer::for_pid(pid),
        }))
    }

    fn adopt(&self, id: &str) -> Result<Box<dyn Running>, String> {
        let pid: i32 = id
            .parse()
            .map_err(|_| format!("not a process id: {id:?}"))?;
        // SAFETY: pidfd_open takes a pid and flags; the result is a new fd
        // or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
        if fd < 0 {
            return Err(format!(
                "process {pid}: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: a fresh fd owned by nobody else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let signal_fd = owned.try_clone().map_err(|e| e.to_string())?;
        // SAFETY: the AsyncFd owns `owned`, which stays open (and the same
        // fd) until the AsyncFd is dropped.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.to_string())?;
        Ok(Box::new(AdoptedProcess {
            pid,
            fd,
            killer: Killer(Arc::new(Some(signal_fd))),
        }))
    }

    async fn exec(
        &self,
        sb: &Sandbox,
        argv: &[String],
        env: &[(String, String)],
        timeout: Duration,
    ) -> Result<i32, String> {
        if argv.is_empty() {
            return Err("exec probe without a command".into());
        }
        // Exec probes join the pod's namespaces but not its cgroups (a
        // probe must not count against the container's memory).
        let sb = Sandbox {
            cgroup_procs: Vec::new(),
            ..sb.clone()
        };
        let mut cmd = command(&sb, argv, env)?;
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| start_error(&argv[0], &e))?;
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(st)) => Ok(st.code().unwrap_or(128)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => {
                // kill_on_drop ends the process group leader; the probe's
                // session may have more.
                if let Some(pid) = child.id() {
                    // SAFETY: kill(2) on the probe's own process group.
                    unsafe {
                        libc::kill(-(pid as i32), libc::SIGKILL);
                    }
                }
                Err(format!("command timed out after {timeout:?}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(image: &str, command: &[&str], args: &[&str]) -> ContainerRun {
        ContainerRun {
            image: image.into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            working_dir: None,
            log: PathBuf::from("/dev/null"),
        }
    }

    #[test]
    fn the_fairlead_image_is_this_binary() {
        for i in [
            "fairlead",
            "fairlead:1.2",
            "example.org/x/fairlead@sha256:ab",
            "fairlead:latest",
        ] {
            assert!(is_self_image(i), "{i}");
        }
        for i in ["busybox", "fairleadx", "nginx:fairlead"] {
            assert!(!is_self_image(i), "{i}");
        }
        let exe = std::env::current_exe().unwrap().display().to_string();
        assert_eq!(
            argv(&run("fairlead", &[], &["echo"])).unwrap(),
            [exe.clone(), "echo".into()]
        );
        assert_eq!(
            argv(&run("fairlead:v1", &["fairlead", "echo"], &["--name", "a"])).unwrap(),
            [exe, "echo".into(), "--name".into(), "a".into()]
        );
        assert_eq!(
            argv(&run("busybox", &["sh", "-c"], &["exit 1"])).unwrap(),
            ["sh", "-c", "exit 1"]
        );
        assert!(argv(&run("busybox", &[], &["x"]))
            .unwrap_err()
            .contains("no command"));
    }
}
