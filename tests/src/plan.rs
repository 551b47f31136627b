//! The end-to-end tier's test runner: every case of every [`Suite`] is a test of its own
//! (named `suite::case`, filtered, listed and reported as `cargo test` does, through
//! `libtest-mimic`), while each suite boots its test host once.
//!
//! Cargo runs test binaries one after another, and a test host keeps one core busy, so
//! the end-to-end tests are one binary (`tests/tests/e2e`) whose plan runs as many test
//! hosts at once as there are test threads (`--test-threads`, by default the number of
//! CPUs): the longest suites and tests first (by the cost each declares), so the last
//! one to finish is a short one. A suite boots when the first of its cases to run needs
//! it; its other cases are queued after every suite's first case, by which time their
//! output is there. Only the cases a filter selects run in the boot.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libtest_mimic::{Arguments, Conclusion, Failed, Trial};

use crate::suite::{Suite, SuiteOutput};
use crate::testhost::TestHostOutput;

/// A case's assertions, run on its output.
pub type Check = fn(&TestHostOutput);

/// The suites and tests of a test binary; see the module documentation.
#[derive(Default)]
pub struct Plan {
    suites: Vec<PlannedSuite>,
    tests: Vec<PlannedTest>,
    log_dir: Option<PathBuf>,
}

struct PlannedSuite {
    name: &'static str,
    cost: Duration,
    build: fn() -> Suite,
    checks: &'static [(&'static str, Check)],
    log_dir: Option<PathBuf>,
    selected: OnceLock<Vec<&'static str>>,
    result: OnceLock<Result<SuiteOutput, String>>,
}

struct PlannedTest {
    name: String,
    cost: Duration,
    ignored: bool,
    run: fn(),
}

impl Plan {
    pub fn new() -> Self {
        Self::default()
    }

    /// Suites write their whole serial logs to `<dir>/<suite>.log`.
    pub fn log_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.log_dir = Some(dir.into());
        self
    }

    /// A suite: `build` makes it (and whatever it needs: static binaries, Nix closures)
    /// when its first case runs; `checks` has each of its cases' assertions, by case
    /// name. Every case needs a check and every check a case, or each of its tests fails
    /// saying which. `cost` is roughly how long its boot takes, for the order.
    pub fn suite(
        &mut self,
        name: &'static str,
        cost: Duration,
        build: fn() -> Suite,
        checks: &'static [(&'static str, Check)],
    ) {
        self.suites.push(PlannedSuite {
            name,
            cost,
            build,
            checks,
            log_dir: None,
            selected: OnceLock::new(),
            result: OnceLock::new(),
        });
    }

    /// A test of its own (it may boot a test host of its own, or run QEMU directly).
    pub fn test(&mut self, name: &str, cost: Duration, run: fn()) {
        self.tests.push(PlannedTest {
            name: name.to_owned(),
            cost,
            ignored: false,
            run,
        });
    }

    /// A test that runs only when asked for (`--ignored`): the benchmarks.
    pub fn ignored_test(&mut self, name: &str, run: fn()) {
        self.tests.push(PlannedTest {
            name: name.to_owned(),
            cost: Duration::ZERO,
            ignored: true,
            run,
        });
    }

    /// The tests in the order they run: see the module documentation.
    pub fn trials(self, args: &Arguments) -> Vec<Trial> {
        let mut leaders: Vec<(Duration, Trial)> = Vec::new();
        let mut followers: Vec<Trial> = Vec::new();
        for suite in self.suites {
            let suite = Arc::new(PlannedSuite {
                log_dir: self.log_dir.clone(),
                ..suite
            });
            let selected: Vec<&'static str> = suite
                .checks
                .iter()
                .map(|(case, _)| *case)
                .filter(|case| selected(args, &format!("{}::{case}", suite.name), false))
                .collect();
            let _ = suite.selected.set(selected);
            for (i, &(case, check)) in suite.checks.iter().enumerate() {
                let name = format!("{}::{case}", suite.name);
                let planned = Arc::clone(&suite);
                let trial = Trial::test(name, move || planned.run_case(case, check));
                if i == 0 {
                    leaders.push((suite.cost, trial));
                } else {
                    followers.push(trial);
                }
            }
        }
        for test in self.tests {
            let run = test.run;
            let trial = Trial::test(test.name, move || {
                run();
                Ok(())
            })
            .with_ignored_flag(test.ignored);
            leaders.push((test.cost, trial));
        }
        // Longest first; the sort is stable, so equal costs keep the order given.
        leaders.sort_by_key(|(cost, _)| std::cmp::Reverse(*cost));
        leaders
            .into_iter()
            .map(|(_, trial)| trial)
            .chain(followers)
            .collect()
    }

    /// Runs the tests `args` selects, as `cargo test` would, and returns the tally.
    pub fn run(self, args: &Arguments) -> Conclusion {
        let trials = self.trials(args);
        libtest_mimic::run(args, trials)
    }
}

impl PlannedSuite {
    fn run_case(&self, case: &str, check: Check) -> Result<(), Failed> {
        let result = self.result.get_or_init(|| self.boot());
        let suite = result.as_ref().map_err(|e| Failed::from(e.clone()))?;
        let out = suite.case(case).map_err(Failed::from)?;
        check(out);
        Ok(())
    }

    /// Builds the suite, checks it against the checks, and runs its selected cases.
    fn boot(&self) -> Result<SuiteOutput, String> {
        let suite = catch_unwind(AssertUnwindSafe(self.build)).map_err(|panic| {
            format!(
                "suite {}: preparing it failed: {}",
                self.name,
                panic_message(&panic)
            )
        })?;
        if suite.name() != self.name {
            return Err(format!(
                "the plan's suite {} builds a suite named {}",
                self.name,
                suite.name()
            ));
        }
        let cases = suite.case_names();
        let checks: Vec<&str> = self.checks.iter().map(|(c, _)| *c).collect();
        let unchecked: Vec<&&str> = cases.iter().filter(|c| !checks.contains(c)).collect();
        let missing: Vec<&&str> = checks.iter().filter(|c| !cases.contains(c)).collect();
        if !unchecked.is_empty() || !missing.is_empty() {
            return Err(format!(
                "suite {}: cases without checks {unchecked:?}, checks without cases {missing:?}",
                self.name
            ));
        }
        let selected = self.selected.get().cloned().unwrap_or_default();
        let mut suite = suite.retain_cases(|case| selected.contains(&case));
        if let Some(dir) = &self.log_dir {
            suite = suite.log_dir(dir);
        }
        let out = catch_unwind(AssertUnwindSafe(|| suite.run()))
            .map_err(|panic| format!("suite {}: {}", self.name, panic_message(&panic)))?
            .map_err(|e| format!("suite {}: cannot run its test host: {e}", self.name))?;
        eprintln!("{}", out.summary());
        Ok(out)
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panicked".to_owned())
}

/// Whether `args` select the test `name`: libtest-mimic's own rule (a filter matches a
/// part of the name, or all of it with `--exact`; `--skip` the same way; `--ignored`
/// selects only ignored tests). A suite boots only for the cases selected.
fn selected(args: &Arguments, name: &str, ignored: bool) -> bool {
    let matches = |pattern: &str| {
        if args.exact {
            name == pattern
        } else {
            name.contains(pattern)
        }
    };
    if args.filter.as_deref().is_some_and(|f| !matches(f)) {
        return false;
    }
    if args.skip.iter().any(|s| matches(s)) {
        return false;
    }
    if args.ignored && !ignored {
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testhost::TestHost;

    fn nothing(_: &TestHostOutput) {}
    fn noop() {}
    fn short() -> Suite {
        Suite::new("short", TestHost::builder())
    }
    fn long() -> Suite {
        Suite::new("long", TestHost::builder())
    }

    const SHORT: &[(&str, Check)] = &[("a", nothing), ("b", nothing)];
    const LONG: &[(&str, Check)] = &[("c", nothing), ("d", nothing)];

    fn plan() -> Plan {
        let mut plan = Plan::new();
        plan.suite("short", Duration::from_secs(10), short, SHORT);
        plan.test("alone", Duration::from_secs(30), noop);
        plan.suite("long", Duration::from_secs(100), long, LONG);
        plan.ignored_test("bench", noop);
        plan
    }

    #[test]
    fn first_cases_longest_first_then_the_rest() {
        let args = Arguments::from_iter(["e2e"]);
        let names: Vec<String> = plan()
            .trials(&args)
            .iter()
            .map(|t| t.name().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "long::c", "alone", "short::a", "bench", "short::b", "long::d"
            ]
        );
    }

    #[test]
    fn filters_select_cases_the_way_libtest_mimic_does() {
        let args = Arguments::from_iter(["e2e", "long::d", "--exact"]);
        assert!(selected(&args, "long::d", false));
        assert!(!selected(&args, "long::c", false));
        let args = Arguments::from_iter(["e2e", "short", "--skip", "::b"]);
        assert!(selected(&args, "short::a", false));
        assert!(!selected(&args, "short::b", false));
        assert!(!selected(&args, "long::c", false));
        let args = Arguments::from_iter(["e2e", "--ignored"]);
        assert!(selected(&args, "bench", true));
        assert!(!selected(&args, "short::a", false));
    }
}
