//! The fuzz targets' stored inputs on stable Rust, without libFuzzer: the
//! seed corpus (`fuzz/corpus/<target>/seed-*`, written from the tests'
//! inputs) and every input that once crashed a target
//! (`fuzz/regressions/<target>/`, kept when the crash was fixed). Each
//! runs through the same function the fuzzer calls, so its properties
//! (replies parse back, patches are idempotent, ...) are checked here too.

use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("dns_query", fairlead::fuzzing::dns_query),
    ("api_body", fairlead::fuzzing::api_body),
    ("selectors", fairlead::fuzzing::selectors),
    ("patches", fairlead::fuzzing::patches),
    ("config", fairlead::fuzzing::config),
    ("nft_netlink", fairlead::fuzzing::nft_netlink),
    ("store_keys", fairlead::fuzzing::store_keys),
];

/// The files of `dir` whose name starts with `prefix` (sorted).
fn inputs(dir: &Path, prefix: &str) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && !n.starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

#[test]
fn stored_inputs_pass_every_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut failed = Vec::new();
    for (name, target) in TARGETS {
        let seeds = inputs(&root.join("corpus").join(name), "seed-");
        assert!(!seeds.is_empty(), "no seed inputs for {name}");
        let regressions = inputs(&root.join("regressions").join(name), "");
        for file in seeds.iter().chain(&regressions) {
            let data = std::fs::read(file).unwrap();
            if std::panic::catch_unwind(|| target(&data)).is_err() {
                failed.push(file.display().to_string());
            }
        }
    }
    assert!(
        failed.is_empty(),
        "inputs that fail their target: {failed:#?}"
    );
}

/// The DNS target answers from a real zone (else the fuzzer would only
/// ever reach NXDOMAIN): a seed's A query gets the Service's ClusterIP.
#[test]
fn the_dns_target_answers_from_its_zone() {
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/dns_query/seed-a-web");
    let data = std::fs::read(seed).unwrap();
    let reply = fairlead::fuzzing::dns_reply(&data, false).expect("an answer");
    assert_eq!(reply[3] & 0x0f, 0, "NOERROR");
    assert_eq!(u16::from_be_bytes([reply[6], reply[7]]), 1, "one answer");
    assert_eq!(reply[reply.len() - 4..], [10, 96, 0, 20]);
}
