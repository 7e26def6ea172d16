//! Helpers shared by the unit tests of several modules (compiled for tests only).

use proptest::test_runner::Config;

/// The budget of every property test: a fixed number of cases, so CI's run time does not
/// depend on `PROPTEST_CASES`, and no failure-persistence file written into the source tree
/// (a failing case is printed shrunk; it becomes a named regression test beside the property).
pub(crate) fn props() -> Config {
    Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    }
}
