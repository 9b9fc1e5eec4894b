//! The RCU rules that the types enforce, pinned with their exact compiler errors.
//!
//! Each `ui/*.rs` must fail to compile with the error recorded next to it in `ui/*.stderr`
//! (regenerate with `TRYBUILD=overwrite cargo test -p rcu --test compile_fail`, then check that
//! each error is still the intended one).
#![cfg(not(loom))]

#[test]
fn misuse_is_a_compile_error() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
