//! What an operator sees when `prober` cannot run: a clear error naming the
//! missing thing, and a non-zero exit.

use std::process::{Command, Output};

use prober_tests::{prober_bin, PinDir, VethPair, VETH};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn unknown_interface_is_named() {
    let out = Command::new(prober_bin())
        .arg("--pin-dir")
        .arg(PinDir::new())
        .args(["run", "--iface", "nosuchif0"])
        .output()
        .unwrap();
    // 4, not 1: the interface may appear (the systemd unit retries on 4).
    assert_eq!(out.status.code(), Some(4));
    assert!(
        stderr(&out).contains("no network interface named 'nosuchif0'"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn without_root_it_says_so() {
    let pair = VethPair::new().unwrap();
    let out = pair
        .server
        .command("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(prober_bin())
        .args(["run", "--iface", VETH])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("prober needs root"),
        "{}",
        stderr(&out)
    );
    assert_eq!(pair.server.xdp_program_id(VETH).unwrap(), None);
}

#[test]
fn without_bpffs_it_says_how_to_mount_it() {
    let pair = VethPair::new().unwrap();
    // A pin directory of the operator's choosing on a plain filesystem:
    // prober mounts a bpffs only at its usual place (/sys/fs/bpf, where
    // `ip netns exec` leaves none; tested in probe_netns), never over an
    // operator's directory.
    let dir = std::env::temp_dir().join(prober_tests::unique_name("no-bpffs-"));
    std::fs::create_dir_all(&dir).unwrap();
    let pin_dir = dir.join("prober");
    let out = pair
        .server
        .command(prober_bin())
        .arg("--pin-dir")
        .arg(&pin_dir)
        .args(["run", "--iface", VETH])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("mount -t bpf bpf {}", dir.display())),
        "{}",
        stderr(&out)
    );
    assert_eq!(pair.server.xdp_program_id(VETH).unwrap(), None);
    prober_tests::record(
        "daemon",
        "pin directory not on a bpffs at start",
        1,
        "exit status 1, the message says how to mount it, nothing attached",
        "nothing",
    );
}

#[test]
fn stats_status_and_reload_without_a_daemon_say_it_is_not_running() {
    let pin_dir = PinDir::new();
    for command in ["stats", "status", "reload"] {
        let out = Command::new(prober_bin())
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg(command)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{command}: exit 3 (documented)");
        assert!(
            stderr(&out).contains("prober is not running"),
            "{command}: {}",
            stderr(&out)
        );
    }
}

/// This machine's kernel has no IPVS (shared/docs/toolchain.md): the
/// operator gets the reason, not a panic or a raw errno. The same client
/// against a kernel with IPVS is tested in the guest (guest_ipvs.rs).
#[test]
fn ipvs_list_on_a_kernel_without_ipvs_says_so() {
    let out = Command::new(prober_bin())
        .args(["ipvs", "list"])
        .output()
        .unwrap();
    if std::path::Path::new("/proc/net/ip_vs").exists() {
        eprintln!("skipped: this host kernel has IPVS, so the absent-module error cannot occur");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).trim(),
        "prober: error: this kernel has no IPVS: the generic netlink family \"IPVS\" does not \
         exist and could not be loaded (try `modprobe ip_vs`; the kernel may be built without \
         CONFIG_IP_VS)"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn a_bad_config_names_file_line_and_field() {
    let path =
        std::env::temp_dir().join(format!("{}.toml", prober_tests::unique_name("bad-config-")));
    std::fs::write(&path, "[daemon]\ninterval = \"1s\"\nfall = 0\n").unwrap();
    let out = Command::new(prober_bin())
        .arg("--pin-dir")
        .arg(&*PinDir::new())
        .args(["run", "--iface", "lo", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&path.display().to_string())
            && err.contains("line 3")
            && err.contains("fall = 0"),
        "{err}"
    );
}
