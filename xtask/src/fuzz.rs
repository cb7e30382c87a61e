//! `cargo xtask fuzz`: the parsers of untrusted input under libFuzzer
//! (cargo-fuzz, nightly): `config` is the config file parser, `netlink`
//! the parsers of the kernel's IPVS replies. The targets live in `fuzz/`
//! (a workspace of its own); cargo-fuzz is installed into the cache first
//! when `cargo fuzz` is missing, so a fresh machine needs nothing else.
//!
//! Corpora: `fuzz/corpus/TARGET` (what libFuzzer found, not committed;
//! for `config` also the example configs of the repository, written there
//! on every run) and `fuzz/seeds/TARGET` (committed). Crash inputs go to
//! `fuzz/artifacts/TARGET`.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::{run_command, setup, workspace_root};

/// Every fuzz target, in the order they run.
pub const TARGETS: &[&str] = &["config", "netlink"];
pub const DEFAULT_SECONDS: u64 = 60;
/// Builds with the stable toolchain here and drives the nightly one.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// `cargo fuzz build` and `run` options. No sanitizer: the parsers are safe
/// Rust, where AddressSanitizer finds nothing a panic would not, and it made
/// the targets ten times slower (its bookkeeping of every allocation).
/// Release, with debug assertions and overflow checks (cargo-fuzz's default).
const BUILD_OPTIONS: &[&str] = &["--sanitizer", "none"];
/// An input slower than this is a hang (libFuzzer writes a timeout-* file).
const INPUT_TIMEOUT_SECONDS: u64 = 10;

/// What one target's run found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuzzOutcome {
    pub target: String,
    /// Inputs run (libFuzzer's "Done N runs in S second(s)").
    pub runs: u64,
    pub seconds: u64,
    /// Inputs that crashed (panicked), hung or ran out of memory: 0 passes.
    pub crashes: u64,
    /// Where libFuzzer wrote them.
    pub artifacts: Vec<PathBuf>,
}

/// Sets up, builds and runs each of `targets` (all when empty) for
/// `seconds`; crashes are reported in the outcomes, not as an error (see
/// [`check`]). Errors are failures to set up, build or run.
pub fn run(seconds: u64, targets: &[String]) -> Result<Vec<FuzzOutcome>> {
    let targets = chosen(targets)?;
    let started = Instant::now();
    let bin_dir = install_cargo_fuzz()?;
    write_config_seeds()?;
    let mut build = cargo_fuzz(bin_dir.as_deref())?;
    build
        .args(["build", "--fuzz-dir", "fuzz"])
        .args(BUILD_OPTIONS);
    if targets.len() == 1 {
        build.arg(&targets[0]);
    }
    println!(
        "[fuzz] building {} (nightly, release, overflow checks; a first build takes a few minutes)",
        targets.join(", ")
    );
    run_command(&mut build).context("building the fuzz targets")?;
    let mut outcomes = Vec::new();
    for target in &targets {
        let outcome = run_target(bin_dir.as_deref(), target, seconds)?;
        println!(
            "[fuzz] {}: {} runs in {} s, {} crashes",
            outcome.target, outcome.runs, outcome.seconds, outcome.crashes
        );
        outcomes.push(outcome);
    }
    println!("[fuzz] done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(outcomes)
}

/// `cargo xtask fuzz`: [`run`], a table of the figures, and an error naming
/// each crash input.
pub fn command(seconds: u64, targets: &[String]) -> Result<()> {
    let outcomes = run(seconds, targets)?;
    println!(
        "[fuzz] {:<10} {:>12} {:>8} {:>8}",
        "target", "runs", "seconds", "crashes"
    );
    for o in &outcomes {
        println!(
            "[fuzz] {:<10} {:>12} {:>8} {:>8}",
            o.target, o.runs, o.seconds, o.crashes
        );
    }
    check(&outcomes)
}

/// Fails when any target crashed, naming the inputs and how to replay them.
pub fn check(outcomes: &[FuzzOutcome]) -> Result<()> {
    let crashed: Vec<String> = outcomes
        .iter()
        .filter(|o| o.crashes > 0)
        .flat_map(|o| {
            o.artifacts.iter().map(move |a| {
                format!(
                    "{}: {} (replay: cargo +nightly fuzz run --fuzz-dir fuzz -s none {} {})",
                    o.target,
                    a.display(),
                    o.target,
                    a.display()
                )
            })
        })
        .collect();
    if !crashed.is_empty() {
        bail!(
            "fuzzing found {} crashing input(s):\n  {}",
            crashed.len(),
            crashed.join("\n  ")
        );
    }
    Ok(())
}

fn chosen(targets: &[String]) -> Result<Vec<String>> {
    if targets.is_empty() {
        return Ok(TARGETS.iter().map(|t| t.to_string()).collect());
    }
    for t in targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!(
                "no fuzz target '{t}': the targets are {}",
                TARGETS.join(", ")
            );
        }
    }
    Ok(targets.to_vec())
}

/// The folder holding `cargo-fuzz` to put first on PATH, or None when the
/// one already on PATH works.
fn install_cargo_fuzz() -> Result<Option<PathBuf>> {
    let nightly = setup::command_stdout(Command::new("rustup").args([
        "run",
        "nightly",
        "rustc",
        "--version",
    ]))
    .context(
        "the nightly toolchain is missing: `rustup toolchain list` must show nightly \
         (cargo-fuzz needs it for the sanitizer and coverage flags)",
    )?;
    println!("[fuzz] nightly: {}", nightly.trim());
    let cache = setup::cache_dir().join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    let bin_dir = cache.join("bin");
    if let Some(version) = cargo_fuzz_version(Some(&bin_dir)) {
        println!("[fuzz] {version}: present in {}", bin_dir.display());
        return Ok(Some(bin_dir));
    }
    if let Some(version) = cargo_fuzz_version(None) {
        println!("[fuzz] {version}: present on PATH");
        return Ok(None);
    }
    println!(
        "[fuzz] cargo-fuzz {CARGO_FUZZ_VERSION}: installing into {} (one time, about 2 minutes)",
        cache.display()
    );
    run_command(
        Command::new("cargo")
            .args([
                "install",
                "cargo-fuzz",
                "--locked",
                "--version",
                CARGO_FUZZ_VERSION,
            ])
            .arg("--root")
            .arg(&cache)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR"),
    )
    .context("installing cargo-fuzz")?;
    match cargo_fuzz_version(Some(&bin_dir)) {
        Some(version) => println!("[fuzz] {version}: installed"),
        None => bail!(
            "cargo-fuzz was installed into {} but does not start",
            bin_dir.display()
        ),
    }
    Ok(Some(bin_dir))
}

/// `cargo-fuzz 0.13.2` when `cargo fuzz` runs (from `bin_dir`, else PATH).
fn cargo_fuzz_version(bin_dir: Option<&Path>) -> Option<String> {
    let out = cargo_fuzz(bin_dir).ok()?.arg("--version").output().ok()?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && version.starts_with("cargo-fuzz")).then_some(version)
}

/// `cargo fuzz` on the nightly toolchain, from the workspace root, free of
/// the stable toolchain's variables that `cargo xtask` runs with.
fn cargo_fuzz(bin_dir: Option<&Path>) -> Result<Command> {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz"])
        .current_dir(workspace_root());
    if let Some(bin_dir) = bin_dir {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![bin_dir.to_path_buf()];
        paths.extend(std::env::split_paths(&path));
        cmd.env(
            "PATH",
            std::env::join_paths(paths).context("building PATH")?,
        );
    }
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTDOC",
        "CARGO",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    Ok(cmd)
}

/// Runs one target for `seconds`, streaming libFuzzer's output less its
/// line per new input (the whole of it goes to a log file).
fn run_target(bin_dir: Option<&Path>, target: &str, seconds: u64) -> Result<FuzzOutcome> {
    let root = workspace_root();
    let fuzz_dir = root.join("fuzz");
    let corpus = fuzz_dir.join("corpus").join(target);
    let seeds = fuzz_dir.join("seeds").join(target);
    fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    fs::create_dir_all(fuzz_dir.join("artifacts").join(target))?;
    let log_path = fuzz_dir
        .join("target")
        .join(format!("xtask-fuzz-{target}.log"));
    fs::create_dir_all(log_path.parent().expect("a file in a folder"))?;

    let mut cmd = cargo_fuzz(bin_dir)?;
    cmd.args(["run", "--fuzz-dir", "fuzz"])
        .args(BUILD_OPTIONS)
        .arg(target)
        .arg(&corpus);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    cmd.arg("--").args([
        format!("-max_total_time={seconds}"),
        format!("-timeout={INPUT_TIMEOUT_SECONDS}"),
        "-print_final_stats=1".to_string(),
    ]);
    println!(
        "[fuzz] {target}: {seconds} s, corpus {} ({} inputs){}; log {}",
        relative(&corpus),
        files_in(&corpus),
        if seeds.is_dir() {
            format!(" and seeds {} ({})", relative(&seeds), files_in(&seeds))
        } else {
            String::new()
        },
        relative(&log_path)
    );
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting `cargo fuzz run`")?;
    let mut log = Vec::new();
    let mut output = Output::default();
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr is piped"));
    let mut line = Vec::new();
    loop {
        line.clear();
        if stderr.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        log.extend_from_slice(&line);
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        if !output.read(text) {
            println!("  {text}");
        }
    }
    let status = child.wait()?;
    fs::write(&log_path, &log).with_context(|| format!("writing {}", log_path.display()))?;
    let artifacts: Vec<PathBuf> = output.artifacts.iter().map(|a| root.join(a)).collect();
    let runs = output
        .done
        .map(|(runs, _)| runs)
        .or(output.executed)
        .or(output.last_count);
    match runs {
        Some(runs) if status.success() || !artifacts.is_empty() => Ok(FuzzOutcome {
            target: target.to_string(),
            runs,
            seconds: output
                .done
                .map_or(started.elapsed().as_secs(), |(_, seconds)| seconds),
            crashes: artifacts.len() as u64,
            artifacts,
        }),
        _ => bail!(
            "fuzz target {target} did not run to its end ({status}); its output is in {}",
            log_path.display()
        ),
    }
}

/// What libFuzzer's output says.
#[derive(Default)]
struct Output {
    /// "Done N runs in S second(s)".
    done: Option<(u64, u64)>,
    /// The count of the last status line ("#N\tpulse ..."): the runs when it
    /// stopped at a crash.
    last_count: Option<u64>,
    /// "stat::number_of_executed_units: N" (-print_final_stats), printed
    /// after a crash too.
    executed: Option<u64>,
    /// "Test unit written to PATH": crash-*, timeout-*, oom-*, leak-*.
    artifacts: Vec<String>,
    /// Inside libFuzzer's "Recommended dictionary" (not shown).
    in_dictionary: bool,
}

impl Output {
    /// Takes one line; true when it is not worth showing.
    fn read(&mut self, line: &str) -> bool {
        if line.contains("###### Recommended dictionary") {
            self.in_dictionary = true;
        }
        if self.in_dictionary {
            self.in_dictionary = !line.contains("###### End of recommended dictionary");
            return true;
        }
        if line.trim_start().starts_with("NEW_FUNC")
            || line.starts_with("INFO: Loaded ")
            // No sanitizer, so none of its hooks.
            || line.starts_with("WARNING: Failed to find function \"__sanitizer_")
        {
            return true;
        }
        if let Some(rest) = line.strip_prefix("Done ") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            if let [runs, "runs", "in", seconds, ..] = words[..] {
                if let (Ok(runs), Ok(seconds)) = (runs.parse(), seconds.parse()) {
                    self.done = Some((runs, seconds));
                }
            }
            return false;
        }
        if let Some(count) = line.strip_prefix("stat::number_of_executed_units:") {
            self.executed = count.trim().parse().ok();
            return false;
        }
        if let Some(path) = line.split("Test unit written to ").nth(1) {
            self.artifacts.push(path.trim().to_string());
            return false;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let mut words = rest.split_whitespace();
            if let Some(count) = words.next().and_then(|c| c.parse().ok()) {
                self.last_count = Some(count);
                // A line per input that found something new.
                if matches!(words.next(), Some("NEW" | "REDUCE" | "RELOAD")) {
                    return true;
                }
            }
        }
        false
    }
}

fn files_in(dir: &Path) -> usize {
    fs::read_dir(dir).map_or(0, |d| d.filter_map(|e| e.ok()).count())
}

fn relative(path: &Path) -> String {
    let root = workspace_root();
    path.strip_prefix(&root)
        .unwrap_or(path)
        .display()
        .to_string()
}

// ------------------------------------------------------------------ seeds

/// Writes the repository's example configs to `fuzz/corpus/config` as
/// `seed-*.toml` (replacing the previous ones): the README's, the config
/// module's documentation and tests', the demo's and the tests' files.
fn write_config_seeds() -> Result<()> {
    let root = workspace_root();
    let mut sources = vec![
        PathBuf::from("README.md"),
        PathBuf::from("prober-user/src/config.rs"),
        PathBuf::from("tests/src/bin/demo.rs"),
    ];
    let mut test_files: Vec<PathBuf> = fs::read_dir(root.join("tests/tests"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| PathBuf::from("tests/tests").join(e.file_name()))
                .filter(|p| p.extension().is_some_and(|x| x == "rs"))
                .collect()
        })
        .unwrap_or_default();
    test_files.sort();
    sources.extend(test_files);

    let mut seeds = BTreeMap::new();
    let mut from = Vec::new();
    for source in &sources {
        let Ok(text) = fs::read_to_string(root.join(source)) else {
            continue;
        };
        let found = config_examples(&text, source.extension().is_some_and(|x| x == "rs"));
        if found.is_empty() {
            continue;
        }
        let stem = source
            .file_stem()
            .map_or("x".into(), |s| s.to_string_lossy().to_lowercase());
        from.push(format!("{} {}", found.len(), source.display()));
        for (i, seed) in found.into_iter().enumerate() {
            if !seeds.values().any(|s| *s == seed) {
                seeds.insert(format!("seed-{stem}-{i:02}.toml"), seed);
            }
        }
    }

    let dir = root.join("fuzz/corpus/config");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut changed = 0;
    for entry in fs::read_dir(&dir)?.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("seed-") && !seeds.contains_key(&name) {
            fs::remove_file(entry.path())?;
            changed += 1;
        }
    }
    for (name, text) in &seeds {
        let path = dir.join(name);
        if fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            changed += 1;
        }
    }
    println!(
        "[fuzz] config seeds: {} in {} ({} changed): {}",
        seeds.len(),
        relative(&dir),
        changed,
        from.join(", ")
    );
    Ok(())
}

/// The TOML examples in a file: ```toml blocks of Markdown or of a Rust
/// file's `//!` documentation, and (in Rust) string literals that hold a
/// table header.
fn config_examples(text: &str, rust: bool) -> Vec<String> {
    let mut found = Vec::new();
    let doc: String = if rust {
        text.lines()
            .filter_map(|l| l.trim_start().strip_prefix("//!"))
            .map(|l| format!("{}\n", l.strip_prefix(' ').unwrap_or(l)))
            .collect()
    } else {
        text.to_string()
    };
    let mut block: Option<String> = None;
    for line in doc.lines() {
        match (&mut block, line.trim()) {
            (None, "```toml") => block = Some(String::new()),
            (Some(_), "```") => found.extend(block.take()),
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    if rust {
        found.extend(string_literals(text).into_iter().filter(|s| {
            s.lines().any(|l| {
                let l = l.trim();
                l.starts_with('[') && l.ends_with(']') && l.len() > 2
            })
        }));
    }
    found
}

/// The contents of `r#"..."#` and `"..."` literals (escapes \n, \t, \",
/// \\ undone); a rough scan that is good enough for finding examples.
fn string_literals(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find('"') {
        if rest[..at].ends_with('\'') && rest[at + 1..].starts_with('\'') {
            rest = &rest[at + 2..]; // '"', a char
            continue;
        }
        if rest[..at].ends_with("r#") {
            let body = &rest[at + 1..];
            let Some(end) = body.find("\"#") else { break };
            out.push(body[..end].to_string());
            rest = &body[end + 2..];
            continue;
        }
        let body = &rest[at + 1..];
        let mut value = String::new();
        let mut chars = body.char_indices();
        let mut end = body.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    end = i + 1;
                    break;
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, 't')) => value.push('\t'),
                    // A line continuation: the newline and the indentation go.
                    Some((_, '\n')) => {
                        let skipped: String = body[i + 2..]
                            .chars()
                            .take_while(|c| c.is_whitespace())
                            .collect();
                        for _ in skipped.chars() {
                            chars.next();
                        }
                    }
                    Some((_, other)) => value.push(other),
                    None => break,
                },
                c => value.push(c),
            }
        }
        out.push(value);
        rest = &body[end.min(body.len())..];
    }
    out
}
