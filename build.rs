//! Records what `edgecache --version`, `GET /status` and `edgecache_build_info` report about
//! the build: the git commit (12 hex digits) and the build profile, as the compile-time
//! variables `EDGECACHE_COMMIT` and `EDGECACHE_PROFILE`.
//!
//! The commit comes from `git rev-parse` when the source is a git checkout; otherwise (a
//! container build copies no `.git`) from the environment variable `EDGECACHE_COMMIT`, else
//! "unknown". Written here rather than with a crate such as `vergen` or `built`: one git call
//! is all it takes, and those crates add a dependency tree (and, for git, libgit2 or gix) to
//! every build.
//!
//! Cargo reruns this script only when HEAD or the branch it points to moves (or the variable
//! changes), not on every source edit.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=EDGECACHE_COMMIT");
    let commit = git(&["rev-parse", "--short=12", "HEAD"])
        .or_else(|| {
            std::env::var("EDGECACHE_COMMIT")
                .ok()
                .map(|c| c.trim().to_owned())
                .filter(|c| !c.is_empty() && c.chars().all(|ch| ch.is_ascii_alphanumeric()))
        })
        .unwrap_or_else(|| "unknown".to_owned());
    for file in watched() {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    // Cargo's PROFILE is "release" for release-like profiles and "debug" otherwise.
    let profile = std::env::var("PROFILE").unwrap_or_else(|_| "unknown".to_owned());
    println!("cargo:rustc-env=EDGECACHE_COMMIT={commit}");
    println!("cargo:rustc-env=EDGECACHE_PROFILE={profile}");
}

/// The trimmed output of a git command, when git is there and it succeeds.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

/// The files whose change means another commit: HEAD, the branch it names, and the packed
/// refs (where a branch may live instead). Worktrees keep HEAD apart from the refs, so git
/// says where each is. Only files that exist are named: Cargo reruns a script on every build
/// while a file it watches is missing.
fn watched() -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut path_of = |name: &str| {
        if let Some(p) = git(&["rev-parse", "--git-path", name]) {
            files.push(PathBuf::from(p));
        }
    };
    path_of("HEAD");
    path_of("packed-refs");
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        path_of(&branch);
    }
    files.retain(|f| f.exists());
    files
}
