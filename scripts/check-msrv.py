#!/usr/bin/env python3
"""Checks that the declared minimum Rust version is true of the dependencies.

The workspace declares `rust-version` (every crate inherits it, so cargo
refuses an older toolchain with a clear message, and clippy's
`incompatible_msrv` lint refuses standard-library APIs newer than it). This
script refuses a dependency in Cargo.lock that itself needs a newer Rust:
then the declaration would be a promise the build cannot keep.

Usage: scripts/check-msrv.py  (reads `cargo metadata`; exits 1 naming the
dependencies that need more, 0 otherwise)
"""
import json
import subprocess
import sys


def version(text):
    parts = [int(p) for p in text.split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def main():
    meta = json.loads(subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked"],
        check=True, capture_output=True, text=True).stdout)
    members = set(meta["workspace_members"])
    declared = {p["rust_version"] for p in meta["packages"] if p["id"] in members}
    if len(declared) != 1 or None in declared:
        print(f"every workspace crate must inherit one rust-version; found {sorted(map(str, declared))}")
        return 1
    msrv = declared.pop()
    too_new = sorted(
        (p["name"], p["version"], p["rust_version"])
        for p in meta["packages"]
        if p["id"] not in members and p.get("rust_version") and version(p["rust_version"]) > version(msrv)
    )
    for name, ver, needs in too_new:
        print(f"{name} {ver} needs Rust {needs}, above the declared rust-version {msrv}")
    if too_new:
        print("raise rust-version in Cargo.toml, or pin those dependencies to older versions")
        return 1
    print(f"rust-version {msrv} holds for all {len(meta['packages']) - len(members)} dependencies")
    return 0


if __name__ == "__main__":
    sys.exit(main())
