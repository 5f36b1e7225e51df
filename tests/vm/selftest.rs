//! The VM runner's self-test (tests/vm/selftest.sh compiles this file with `rustc --test`): one
//! test that passes only inside the runner's guest and one that fails on purpose, so the runner
//! must report the failure and exit with the test binary's status.

#[test]
fn passes_in_the_guest() {
    let out = std::path::Path::new("/run/victor-vm/out");
    assert!(out.is_dir(), "not inside the VM runner's guest ({} is missing)", out.display());
}

#[test]
fn fails_on_purpose() {
    panic!("deliberate failure: the VM runner must report it and exit non-zero");
}
