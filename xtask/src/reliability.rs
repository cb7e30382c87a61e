//! `cargo xtask reliability`: runs every test that tries a fault or a
//! hostile input (on the host, under libFuzzer, and against real IPVS in
//! the guest), collects the rows they record (`prober_tests::record`) and
//! writes RELIABILITY.md from them. Rows exist only for tests that passed;
//! if any test fails, nothing is written.

use std::{fmt::Write as _, fs, path::Path, process::Command, time::Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{
    build_ebpf, fuzz, run_command,
    setup::{self, require_root},
    vm, workspace_root,
};

/// Host test targets that record rows.
const HOST_TESTS: &[&str] = &[
    "datapath_fuzz",
    "datapath_fixtures",
    "checks_fixtures",
    "passive_flood",
    "probe_netns",
    "cli_errors",
];

/// Guest test targets that record rows.
const GUEST_TESTS: &[&str] = &["guest_faults"];

/// How long each fuzz target runs for the report.
const FUZZ_SECONDS: u64 = 120;

const RECORDS_ENV: &str = "PROBER_RECORDS";

pub fn run() -> Result<()> {
    let started = Instant::now();
    require_root()?;
    let tools = setup::run()?;
    build_ebpf::run(&tools)?;
    let root = workspace_root();
    let out = vm::target_dir().join("reliability");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    let host_records = out.join("host.jsonl");

    println!("[reliability] host tests: {}", HOST_TESTS.join(", "));
    run_command(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(&root)
            .args(["build", "--package", "prober-user"]),
    )?;
    let mut host = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    host.current_dir(&root)
        .args(["test", "--package", "prober-tests"])
        .env(RECORDS_ENV, &host_records);
    for test in HOST_TESTS {
        host.args(["--test", test]);
    }
    run_command(&mut host).context("host tests failed: RELIABILITY.md not written")?;

    println!("[reliability] fuzzing ({FUZZ_SECONDS} s per target)");
    let fuzzed = fuzz::run(FUZZ_SECONDS, &[])?;
    fuzz::check(&fuzzed).context("fuzzing found a crash: RELIABILITY.md not written")?;

    println!("[reliability] guest tests: {}", GUEST_TESTS.join(", "));
    vm::test_in_guest(&vm::VmTestOptions {
        tests: GUEST_TESTS.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    })
    .context("guest tests failed: RELIABILITY.md not written")?;
    let guest_records = vm::target_dir().join("vm-test").join("records.jsonl");

    let mut rows = read_rows(&host_records)?;
    rows.extend(read_rows(&guest_records)?);
    for f in &fuzzed {
        rows.push(serde_json::json!({
            "area": "config and netlink input",
            "what": format!("cargo-fuzz target `{}` ({})", f.target, fuzz_target_input(&f.target)),
            "tries": f.runs,
            "observed": format!("{} runs in {} s, {} crashes or panics", f.runs, f.seconds, f.crashes),
            "lost": "nothing",
        }));
    }
    if rows.is_empty() {
        bail!("the tests recorded no rows ({RECORDS_ENV} not honoured?)");
    }
    let text = document(&rows)?;
    let path = root.join("RELIABILITY.md");
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "[reliability] {} rows written to {} in {:.0} s",
        rows.len(),
        path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn fuzz_target_input(target: &str) -> &'static str {
    match target {
        "config" => "any text as the config file",
        "netlink" => "any bytes as IPVS's netlink replies",
        _ => "arbitrary input",
    }
}

fn read_rows(path: &Path) -> Result<Vec<Value>> {
    let Ok(text) = fs::read_to_string(path) else {
        bail!("{} is missing: the tests recorded nothing", path.display());
    };
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("{}, line {}: not a JSON row", path.display(), i + 1))
        })
        .collect()
}

fn document(rows: &[Value]) -> Result<String> {
    let output = |cmd: &mut Command| -> String {
        cmd.output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let commit = output(Command::new("git").current_dir(workspace_root()).args([
        "rev-parse",
        "--short",
        "HEAD",
    ]));
    let dirty = !output(Command::new("git").current_dir(workspace_root()).args([
        "status",
        "--porcelain",
        "--untracked-files=no",
    ]))
    .is_empty();
    let kernel = output(Command::new("uname").arg("-r"));
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]));
    let mut text = String::new();
    writeln!(text, "# Reliability")?;
    writeln!(text)?;
    writeln!(
        text,
        "Every fault and hostile input prober was tried against, how many times, what was \
         observed and what was lost. Written by `cargo xtask reliability` from the rows the \
         tests record once their assertions held; do not edit by hand."
    )?;
    writeln!(text)?;
    writeln!(
        text,
        "- Run: {date}, commit `{commit}`{}",
        if dirty { " with local changes" } else { "" }
    )?;
    writeln!(
        text,
        "- Machine: {cpu}, {cores} cores; host kernel {kernel} (XDP/TC, BPF_PROG_TEST_RUN); IPVS in a qemu guest on Debian's 6.1 kernel"
    )?;
    writeln!(text)?;
    writeln!(
        text,
        "| area | fault or hostile input | tries | observed | lost |"
    )?;
    writeln!(text, "| --- | --- | ---: | --- | --- |")?;
    let cell = |v: &Value| {
        v.as_str()
            .unwrap_or("")
            .replace('|', "\\|")
            .replace('\n', " ")
    };
    for row in rows {
        writeln!(
            text,
            "| {} | {} | {} | {} | {} |",
            cell(&row["area"]),
            cell(&row["what"]),
            row["tries"].as_u64().unwrap_or(0),
            cell(&row["observed"]),
            cell(&row["lost"]),
        )?;
    }
    Ok(text)
}
