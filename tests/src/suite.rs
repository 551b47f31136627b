//! Many cases in one test-host boot.
//!
//! Booting the test host costs seconds to tens of seconds under TCG (the kernel, the
//! initramfs unpacked, the KVM modules), and a lone test host keeps one of the build
//! machine's two cores busy. A [`Suite`] runs several cases in one boot:
//!
//! - an optional setup script runs first; every variable it sets is exported to the
//!   cases (it runs with `set -a`). It keeps what it makes outside `/tmp` (under
//!   `/suite`, say), because
//! - each case is a script fragment run by its own `sh`, from `/root`, with a fresh,
//!   empty tmpfs on `/tmp` (as a test host of its own would give it) and a deadline of
//!   its own (busybox `timeout`); its files are added to the shared initramfs;
//! - each case's output is bracketed by marker lines that carry a per-run nonce, its
//!   exit status and the test host's uptime, so every case gets a [`TestHostOutput`] of
//!   its own: its part of the serial console, its exit status, its own time. Assertions
//!   written against a test host of their own read the same from it.
//!
//! Cases run one after the other, in the order given, and see what earlier cases left
//! outside `/tmp`. A case that fails does not stop the ones after it; a setup that fails
//! stops them all (each then reports the setup's output).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::testhost::{
    GuestFile, TestHost, TestHostBuilder, TestHostOutput, Timings, marker_value, nonce,
};

/// Where the generated scripts are inside the test host.
const DIR: &str = "/testhost/suite";
/// Time the test host needs around the scripts (boot, initramfs, power-off), on top of
/// the setup's and the cases' own deadlines, under contention on 2 cores.
pub const BOOT_ALLOWANCE: Duration = Duration::from_secs(180);

/// Cases that share one test-host boot; see the module documentation.
#[derive(Debug, Clone)]
pub struct Suite {
    name: String,
    host: TestHostBuilder,
    setup: Option<(String, Duration)>,
    files: Vec<GuestFile>,
    cases: Vec<Case>,
    log_dir: Option<PathBuf>,
    held: Vec<std::sync::Arc<tempfile::TempDir>>,
}

#[derive(Debug, Clone)]
struct Case {
    name: String,
    script: String,
    files: Vec<GuestFile>,
    timeout: Duration,
}

impl Suite {
    /// A suite called `name` (it names the cases' outputs and the log file) that boots
    /// the test host `host` describes.
    pub fn new(name: &str, host: TestHostBuilder) -> Self {
        Suite {
            name: name.to_owned(),
            host,
            setup: None,
            files: Vec::new(),
            cases: Vec::new(),
            log_dir: None,
            held: Vec::new(),
        }
    }

    /// Keeps `dir` until the suite has run: for host files made while preparing it.
    pub fn hold(mut self, dir: tempfile::TempDir) -> Self {
        self.held.push(std::sync::Arc::new(dir));
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The script that runs before the cases, with `set -a` (its variables reach every
    /// case). A setup that exits non-zero, or runs past `timeout`, fails every case.
    pub fn setup(mut self, script: &str, timeout: Duration) -> Self {
        self.setup = Some((script.to_owned(), timeout));
        self
    }

    /// Files for the whole suite (added to the initramfs before the cases' files).
    pub fn files(mut self, files: impl IntoIterator<Item = GuestFile>) -> Self {
        self.files.extend(files);
        self
    }

    /// Adds a case: `script` runs in `sh` after the setup, with `files` in the test host;
    /// it is killed at `timeout` (it then reports `timed_out`).
    pub fn case(
        mut self,
        name: &str,
        script: &str,
        files: Vec<GuestFile>,
        timeout: Duration,
    ) -> Self {
        assert!(
            !self.cases.iter().any(|c| c.name == name),
            "suite {}: two cases named {name}",
            self.name
        );
        self.cases.push(Case {
            name: name.to_owned(),
            script: script.to_owned(),
            files,
            timeout,
        });
        self
    }

    /// The cases' names, in the order they run.
    pub fn case_names(&self) -> Vec<&str> {
        self.cases.iter().map(|c| c.name.as_str()).collect()
    }

    /// Keeps only the cases `keep` says yes to (to run a subset, as a test filter asks).
    pub fn retain_cases(mut self, keep: impl Fn(&str) -> bool) -> Self {
        self.cases.retain(|c| keep(&c.name));
        self
    }

    /// Also writes the whole serial log to `<dir>/<name>.log`.
    pub fn log_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.log_dir = Some(dir.into());
        self
    }

    /// The deadline for the whole boot: the setup's and every case's, plus
    /// [`BOOT_ALLOWANCE`].
    pub fn timeout(&self) -> Duration {
        BOOT_ALLOWANCE
            + self.setup.as_ref().map_or(Duration::ZERO, |(_, t)| *t)
            + self.cases.iter().map(|c| c.timeout).sum::<Duration>()
    }

    /// Boots the test host once and runs the setup and every case in it.
    ///
    /// An error is the harness failing (QEMU missing, an input that cannot be read);
    /// what the cases did, failures and timeouts included, is in the result.
    pub fn run(self) -> Result<SuiteOutput> {
        let nonce = nonce();
        let (script, files) = self.generate(&nonce);
        let host: TestHost = self.host.clone().build()?;
        let timeout = self.timeout();
        let mut whole = host.run(&script, &files, timeout)?;
        whole.label = format!("the test host of suite {}", self.name);
        let log = match &self.log_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
                let path = dir.join(format!("{}.log", self.name));
                std::fs::write(&path, whole.to_string()).map_err(Error::io(&path))?;
                Some(path)
            }
            None => None,
        };
        Ok(self.parse(whole, &nonce, log))
    }

    /// The test host's script and files.
    fn generate(&self, nonce: &str) -> (String, Vec<GuestFile>) {
        let mut files = self.files.clone();
        let mut script = String::new();
        // The cases find the setup's variables here.
        let env = format!("{DIR}/env.sh");
        script.push_str(&format!(": > {env}\n"));
        if let Some((setup, timeout)) = &self.setup {
            files.push(GuestFile::bytes(
                &format!("{DIR}/setup.sh"),
                setup.as_bytes(),
                0o644,
            ));
            // `set -a` exports what the setup sets; `export -p` hands it to the cases,
            // and only when the setup got to its end.
            files.push(GuestFile::bytes(
                &format!("{DIR}/setup-runner.sh"),
                format!("set -a\n. {DIR}/setup.sh\nexport -p > {env}.new\n"),
                0o644,
            ));
            let _ = write!(
                script,
                "echo \"{SETUP_BEGIN}-{nonce} $(cut -d' ' -f1 /proc/uptime)\"\n\
                 (cd /root && timeout -s KILL {secs} sh {DIR}/setup-runner.sh) </dev/console\n\
                 status=$?\n\
                 [ $status -ne 0 ] || [ -f {env}.new ] || status=1\n\
                 echo\n\
                 echo \"{SETUP_END}-{nonce} $status $(cut -d' ' -f1 /proc/uptime)\"\n\
                 if [ \"$status\" != 0 ]; then exit 1; fi\n\
                 mv {env}.new {env}\n",
                secs = timeout.as_secs(),
            );
        }
        for (i, case) in self.cases.iter().enumerate() {
            files.extend(case.files.iter().cloned());
            let path = format!("{DIR}/case-{i}.sh");
            files.push(GuestFile::bytes(
                &path,
                format!(". {env}\n{}", case.script),
                0o644,
            ));
            // A fresh /tmp for each case, as a test host of its own would have.
            let _ = write!(
                script,
                "echo \"{CASE_BEGIN}-{nonce} {i} $(cut -d' ' -f1 /proc/uptime)\"\n\
                 mount -t tmpfs -o mode=1777 tmpfs /tmp\n\
                 (cd /root && timeout -s KILL {secs} sh {path}) </dev/console\n\
                 status=$?\n\
                 echo\n\
                 echo \"{CASE_END}-{nonce} {i} $status $(cut -d' ' -f1 /proc/uptime)\"\n\
                 cd / && umount -l /tmp\n",
                secs = case.timeout.as_secs(),
            );
        }
        script.push_str("exit 0\n");
        (script, files)
    }

    fn parse(&self, whole: TestHostOutput, nonce: &str, log: Option<PathBuf>) -> SuiteOutput {
        let serial = &whole.serial;
        let log_note = log
            .as_ref()
            .map(|p| format!("; the whole serial log is in {}", p.display()))
            .unwrap_or_default();
        let setup = self.setup.as_ref().map(|(_, timeout)| {
            let section = Section::find(
                serial,
                &format!("{SETUP_BEGIN}-{nonce}"),
                &format!("{SETUP_END}-{nonce}"),
            );
            section.output(
                format!("the setup of suite {}{log_note}", self.name),
                *timeout,
                &whole,
            )
        });
        let setup_failed = setup.as_ref().is_some_and(|s| !s.success());
        let cases = self
            .cases
            .iter()
            .enumerate()
            .map(|(i, case)| {
                let section = Section::find(
                    serial,
                    &format!("{CASE_BEGIN}-{nonce} {i}"),
                    &format!("{CASE_END}-{nonce} {i}"),
                );
                let out = section.output(
                    format!(
                        "case {} of suite {} ({} cases in one test-host boot{log_note})",
                        case.name,
                        self.name,
                        self.cases.len()
                    ),
                    case.timeout,
                    &whole,
                );
                let outcome = if setup_failed {
                    Err(format!(
                        "case {} did not run: the setup of suite {} failed:\n{}",
                        case.name,
                        self.name,
                        setup.as_ref().map(|s| s.to_string()).unwrap_or_default()
                    ))
                } else if section.begin.is_none() {
                    Err(format!(
                        "case {} of suite {} did not start (the test host {}):\n{whole}",
                        case.name,
                        self.name,
                        if whole.timed_out {
                            "ran past its deadline before it"
                        } else {
                            "ended before it"
                        }
                    ))
                } else {
                    Ok(out)
                };
                (case.name.clone(), outcome)
            })
            .collect();
        SuiteOutput {
            name: self.name.clone(),
            whole,
            setup,
            cases,
            log,
        }
    }
}

const SETUP_BEGIN: &str = "TESTHOST-SETUP-BEGIN";
const SETUP_END: &str = "TESTHOST-SETUP-END";
const CASE_BEGIN: &str = "TESTHOST-CASE-BEGIN";
const CASE_END: &str = "TESTHOST-CASE-END";

/// One bracketed part of the serial log.
struct Section<'a> {
    /// Uptime at the begin marker, if it was printed.
    begin: Option<f64>,
    /// Exit status and uptime from the end marker, if it was printed.
    end: Option<(i32, f64)>,
    text: &'a str,
}

impl<'a> Section<'a> {
    /// The text after the line that starts with `begin` (followed by a space) up to the
    /// line that holds `end` (followed by a space). The end marker is printed after an
    /// empty line, so a last line without a newline stays whole; that empty line is left
    /// out.
    fn find(serial: &'a str, begin: &str, end: &str) -> Section<'a> {
        let begin_marker = format!("{begin} ");
        let Some(at) = serial
            .match_indices(&begin_marker)
            .map(|(at, _)| at)
            .find(|&at| at == 0 || serial.as_bytes()[at - 1] == b'\n')
        else {
            return Section {
                begin: None,
                end: None,
                text: "",
            };
        };
        let begin_uptime = marker_value(&serial[at..], begin);
        let start = serial[at..].find('\n').map_or(serial.len(), |n| at + n + 1);
        let end_marker = format!("{end} ");
        let (text, end) = match serial[start..].find(&end_marker) {
            Some(n) => {
                let text = &serial[start..start + n];
                let text = text.strip_suffix('\n').unwrap_or(text);
                let line = serial[start + n + end_marker.len()..]
                    .lines()
                    .next()
                    .unwrap_or("");
                let mut words = line.split_whitespace();
                let status = words.next().and_then(|w| w.parse().ok());
                let uptime = words.next().and_then(|w| w.parse().ok());
                (text, status.zip(uptime))
            }
            None => (&serial[start..], None),
        };
        Section {
            begin: begin_uptime,
            end,
            text,
        }
    }

    /// The section as the output of a run of its own.
    fn output(&self, label: String, timeout: Duration, whole: &TestHostOutput) -> TestHostOutput {
        let elapsed = match (self.begin, self.end) {
            (Some(begin), Some((_, end))) => Duration::from_secs_f64((end - begin).max(0.0)),
            _ => Duration::ZERO,
        };
        let exit_code = self.end.map(|(status, _)| status);
        // busybox timeout kills with SIGKILL: 128 + 9, at the deadline.
        let killed_at_deadline =
            exit_code == Some(137) && elapsed + Duration::from_secs(1) >= timeout;
        TestHostOutput {
            label,
            serial: self.text.to_owned(),
            exit_code: if killed_at_deadline { None } else { exit_code },
            timed_out: killed_at_deadline || (self.end.is_none() && whole.timed_out),
            elapsed,
            timings: Timings {
                script_start_uptime: self.begin,
                script_end_uptime: self.end.map(|(_, up)| up),
                ..Timings::default()
            },
        }
    }
}

/// What a [`Suite`] run gave: the whole boot, the setup's part and each case's.
#[derive(Debug)]
pub struct SuiteOutput {
    pub name: String,
    /// The whole boot (its serial log holds every case's).
    pub whole: TestHostOutput,
    /// The setup's part, if the suite has a setup.
    pub setup: Option<TestHostOutput>,
    cases: Vec<(String, std::result::Result<TestHostOutput, String>)>,
    /// Where the whole serial log was written, if anywhere.
    pub log: Option<PathBuf>,
}

impl SuiteOutput {
    /// The output of case `name`, or why it has none (not in the suite, did not run
    /// because the setup failed or the test host ended first).
    pub fn case(&self, name: &str) -> std::result::Result<&TestHostOutput, String> {
        match self.cases.iter().find(|(n, _)| n == name) {
            Some((_, Ok(out))) => Ok(out),
            Some((_, Err(why))) => Err(why.clone()),
            None => Err(format!("suite {} has no case named {name}", self.name)),
        }
    }

    /// One paragraph on where the boot's time went, case by case.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "suite {}: {} case(s) in one test-host boot, {:.1} s wall; {}",
            self.name,
            self.cases.len(),
            self.whole.elapsed.as_secs_f64(),
            self.whole.timings
        );
        if let Some(setup) = &self.setup {
            let _ = write!(s, "; setup {:.1} s", setup.elapsed.as_secs_f64());
        }
        for (name, out) in &self.cases {
            match out {
                Ok(out) => {
                    let _ = write!(
                        s,
                        "\n    {name}: {:.1} s, exit {}",
                        out.elapsed.as_secs_f64(),
                        out.exit_code
                            .map_or("none (killed at its deadline)".to_owned(), |c| c
                                .to_string())
                    );
                }
                Err(_) => {
                    let _ = write!(s, "\n    {name}: did not run");
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(serial: &str, timed_out: bool) -> TestHostOutput {
        TestHostOutput {
            label: "test host".into(),
            serial: serial.into(),
            exit_code: None,
            timed_out,
            elapsed: Duration::from_secs(10),
            timings: Timings::default(),
        }
    }

    fn suite() -> Suite {
        Suite::new("s", TestHost::builder().without_guest_kernel())
            .case("a", "echo a", vec![], Duration::from_secs(60))
            .case("b", "echo b", vec![], Duration::from_secs(5))
            .case("c", "echo c", vec![], Duration::from_secs(60))
    }

    #[test]
    fn cases_get_their_own_output_status_and_time() {
        let serial = "boot noise\n\
            TESTHOST-CASE-BEGIN-n1 0 1.50\n\
            first line\nno newline at the end\n\
            TESTHOST-CASE-END-n1 0 3 4.00\n\
            TESTHOST-CASE-BEGIN-n1 1 4.10\n\
            stuck\n\
            TESTHOST-CASE-END-n1 1 137 9.20\n\
            TESTHOST-CASE-BEGIN-n1 2 9.30\n\
            half";
        let out = suite().parse(whole(serial, true), "n1", None);
        let a = out.case("a").unwrap();
        assert_eq!(a.serial, "first line\nno newline at the end");
        assert_eq!(a.exit_code, Some(3));
        assert!(!a.timed_out);
        assert_eq!(a.elapsed, Duration::from_millis(2500));
        assert!(a.label.contains("case a of suite s"), "{}", a.label);
        // Killed by timeout(1) at its 5 s deadline.
        let b = out.case("b").unwrap();
        assert!(b.timed_out && b.exit_code.is_none(), "{b:?}");
        // Still running when the whole test host was killed.
        let c = out.case("c").unwrap();
        assert!(c.timed_out && c.exit_code.is_none(), "{c:?}");
        assert_eq!(c.serial, "half");
        assert!(out.case("d").is_err());
    }

    #[test]
    fn markers_need_the_nonce_and_a_line_of_their_own() {
        let serial = "TESTHOST-CASE-BEGIN-fake 0 1.0\nx\nTESTHOST-CASE-END-fake 0 0 2.0\n\
                      echo TESTHOST-CASE-BEGIN-n1 0 1.0\n";
        let out = suite().parse(whole(serial, false), "n1", None);
        let why = out.case("a").unwrap_err();
        assert!(why.contains("did not start"), "{why}");
    }

    #[test]
    fn a_failed_setup_fails_every_case_with_its_output() {
        let serial = "TESTHOST-SETUP-BEGIN-n1 1.0\nimport failed\nTESTHOST-SETUP-END-n1 1 2.0\n";
        let out =
            suite()
                .setup("false", Duration::from_secs(60))
                .parse(whole(serial, false), "n1", None);
        for case in ["a", "b", "c"] {
            let why = out.case(case).unwrap_err();
            assert!(
                why.contains("setup of suite s failed") && why.contains("import failed"),
                "{why}"
            );
        }
    }

    #[test]
    fn the_deadline_covers_every_case() {
        let s = suite().setup("true", Duration::from_secs(10));
        assert_eq!(s.timeout(), BOOT_ALLOWANCE + Duration::from_secs(135));
        assert_eq!(
            s.clone().retain_cases(|n| n != "b").case_names(),
            ["a", "c"]
        );
    }
}
