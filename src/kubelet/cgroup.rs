//! A cgroup per pod, applying the sum of its containers' `resources.limits`
//! and telling an OOM kill from any other SIGKILL.
//!
//! Two layouts, chosen once at start ([`Cgroups::detect`]):
//! * **v2** where the unified hierarchy has the `memory` controller:
//!   `<root>/fairlead/pod<uid>` with `memory.max`, `cpu.max`, and OOM kills
//!   counted in `memory.events` (`oom_kill N`);
//! * **v1** otherwise, where `memory` and `cpu` are mounted as their own
//!   hierarchies: `memory/fairlead/pod<uid>` (`memory.limit_in_bytes`,
//!   `oom_kill N` in `memory.oom_control`) and `cpu/fairlead/pod<uid>`
//!   (`cpu.cfs_quota_us` over `cpu.cfs_period_us`).
//!
//! A process joins by writing `0` to each `cgroup.procs` between fork and
//! exec (see the runtime), so nothing it allocates escapes its limit.
//! Without either layout (no cgroupfs, not root) pods run without limits.

use std::path::{Path, PathBuf};

/// Where this node's pod cgroups live.
#[derive(Clone, Debug)]
pub enum Cgroups {
    V2(PathBuf),
    V1 {
        memory: PathBuf,
        cpu: Option<PathBuf>,
    },
    None,
}

/// The parent of every pod cgroup, under each hierarchy.
const PARENT: &str = "fairlead";

/// The CFS period the CPU limit is expressed over (the kubelet's).
const CPU_PERIOD_US: u64 = 100_000;

/// A pod's limits: the sums over its containers, `None` where any
/// container is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub cpu_millis: Option<u64>,
}

impl Cgroups {
    /// The host's layout, looked up under `/sys/fs/cgroup`.
    pub fn detect() -> Cgroups {
        Self::detect_at(Path::new("/sys/fs/cgroup"))
    }

    fn detect_at(root: &Path) -> Cgroups {
        let controllers =
            std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "memory") {
            return Cgroups::V2(root.join(PARENT));
        }
        let memory = root.join("memory");
        if memory.join("memory.limit_in_bytes").exists() {
            let cpu = ["cpu", "cpu,cpuacct"]
                .iter()
                .map(|d| root.join(d))
                .find(|d| d.join("cpu.cfs_quota_us").exists());
            return Cgroups::V1 {
                memory: memory.join(PARENT),
                cpu: cpu.map(|c| c.join(PARENT)),
            };
        }
        Cgroups::None
    }

    /// The cgroup of pod `uid` (not created yet).
    pub fn pod(&self, uid: &str) -> PodCgroup {
        let leaf = format!("pod{uid}");
        let dirs = match self {
            Cgroups::V2(p) => vec![p.join(&leaf)],
            Cgroups::V1 { memory, cpu } => std::iter::once(memory.join(&leaf))
                .chain(cpu.as_ref().map(|c| c.join(&leaf)))
                .collect(),
            Cgroups::None => Vec::new(),
        };
        PodCgroup {
            v2: matches!(self, Cgroups::V2(_)),
            dirs,
        }
    }

    /// Every pod cgroup that exists, by pod uid.
    pub fn pods(&self) -> Vec<String> {
        let parent = match self {
            Cgroups::V2(p) => p,
            Cgroups::V1 { memory, .. } => memory,
            Cgroups::None => return Vec::new(),
        };
        let Ok(rd) = std::fs::read_dir(parent) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("pod")
                    .map(String::from)
            })
            .collect()
    }
}

impl Cgroups {
    /// Remove the parent `fairlead` cgroups if no pod cgroup is left in
    /// them (another node on this host may still have some).
    pub fn remove_parents_if_empty(&self) {
        let parents: Vec<&PathBuf> = match self {
            Cgroups::V2(p) => vec![p],
            Cgroups::V1 { memory, cpu } => std::iter::once(memory).chain(cpu.as_ref()).collect(),
            Cgroups::None => Vec::new(),
        };
        for p in parents {
            let _ = std::fs::remove_dir(p);
        }
    }
}

/// One pod's cgroup, in one (v2) or two (v1 memory, cpu) hierarchies.
#[derive(Clone, Debug)]
pub struct PodCgroup {
    v2: bool,
    dirs: Vec<PathBuf>,
}

impl PodCgroup {
    /// Create the cgroup and apply `limits`.
    pub fn create(&self, limits: Limits) -> Result<(), String> {
        for d in &self.dirs {
            if self.v2 {
                // Controllers must be enabled in every ancestor's subtree.
                if let Some(parent) = d.parent() {
                    let _ = std::fs::create_dir_all(parent);
                    if let Some(root) = parent.parent() {
                        let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory +cpu");
                    }
                    let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory +cpu");
                }
            }
            std::fs::create_dir_all(d)
                .map_err(|e| format!("creating cgroup {}: {e}", d.display()))?;
        }
        let write = |file: &str, v: String| -> Result<(), String> {
            for d in &self.dirs {
                let p = d.join(file);
                if p.exists() {
                    return std::fs::write(&p, &v)
                        .map_err(|e| format!("writing {}: {e}", p.display()));
                }
            }
            Ok(())
        };
        if self.v2 {
            write(
                "memory.max",
                limits.memory_bytes.map_or("max".into(), |b| b.to_string()),
            )?;
            write(
                "cpu.max",
                match limits.cpu_millis {
                    Some(m) => format!("{} {CPU_PERIOD_US}", (m * CPU_PERIOD_US / 1000).max(1000)),
                    None => format!("max {CPU_PERIOD_US}"),
                },
            )?;
        } else {
            write(
                "memory.limit_in_bytes",
                limits.memory_bytes.map_or("-1".into(), |b| b.to_string()),
            )?;
            write("cpu.cfs_period_us", CPU_PERIOD_US.to_string())?;
            write(
                "cpu.cfs_quota_us",
                limits.cpu_millis.map_or("-1".into(), |m| {
                    (m * CPU_PERIOD_US / 1000).max(1000).to_string()
                }),
            )?;
        }
        Ok(())
    }

    /// The `cgroup.procs` files a process writes itself into.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|d| d.join("cgroup.procs"))
            .filter(|p| p.exists())
            .collect()
    }

    /// How many processes of the pod the kernel's OOM killer has killed.
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        self.dirs
            .iter()
            .find_map(|d| std::fs::read_to_string(d.join(file)).ok())
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// The pids in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        self.dirs
            .first()
            .and_then(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// SIGKILL everything in the cgroup, then remove it (retrying while
    /// the killed processes exit).
    pub fn destroy(&self) {
        for _ in 0..50 {
            let pids = self.pids();
            for p in &pids {
                // SAFETY: kill(2) on a pid read from the pod's own cgroup.
                unsafe {
                    libc::kill(*p, libc::SIGKILL);
                }
            }
            let mut all_gone = true;
            for d in &self.dirs {
                if d.exists() && std::fs::remove_dir(d).is_err() {
                    all_gone = false;
                }
            }
            if all_gone {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        tracing::warn!(cgroup = ?self.dirs, "could not remove a pod cgroup");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_v1_and_v2_layouts() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(Cgroups::detect_at(d.path()), Cgroups::None));
        std::fs::create_dir_all(d.path().join("memory")).unwrap();
        std::fs::write(d.path().join("memory/memory.limit_in_bytes"), "").unwrap();
        std::fs::create_dir_all(d.path().join("cpu,cpuacct")).unwrap();
        std::fs::write(d.path().join("cpu,cpuacct/cpu.cfs_quota_us"), "").unwrap();
        let Cgroups::V1 { memory, cpu } = Cgroups::detect_at(d.path()) else {
            panic!("v1 expected")
        };
        assert_eq!(memory, d.path().join("memory/fairlead"));
        assert_eq!(cpu, Some(d.path().join("cpu,cpuacct/fairlead")));
        std::fs::write(d.path().join("cgroup.controllers"), "cpu io memory pids").unwrap();
        assert!(matches!(Cgroups::detect_at(d.path()), Cgroups::V2(_)));
    }

    #[test]
    fn counts_oom_kills_from_either_file() {
        let d = tempfile::tempdir().unwrap();
        let v1 = PodCgroup {
            v2: false,
            dirs: vec![d.path().to_path_buf()],
        };
        std::fs::write(
            d.path().join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        assert_eq!(v1.oom_kills(), 2);
        let v2 = PodCgroup {
            v2: true,
            dirs: vec![d.path().to_path_buf()],
        };
        std::fs::write(d.path().join("memory.events"), "low 0\noom 1\noom_kill 1\n").unwrap();
        assert_eq!(v2.oom_kills(), 1);
    }
}
