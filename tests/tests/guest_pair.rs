//! An active/backup pair of directors, in the qemu guest with real IPVS:
//! VRRP by keepalived in VRRP-only mode (`keepalived -P`), the IPVS sync
//! daemon between them, prober on both, zero-config. A NAT service over two
//! real servers, one of them dead: both directors must have it at weight 0
//! (a pool of two with one dead is no director-side fault), so that after
//! the master dies every new connection through the backup succeeds. (With
//! the old panic default, half of them failed.)
//!
//! ```text
//!  client 198.51.100.50 --[front bridge]-- eth1 of A and B (VIP .100)
//!  A 192.0.2.1, B 192.0.2.2 --[back bridge]-- real servers .10 (alive), .11 (dead)
//!                          (the real servers' gateway: 192.0.2.254, a VRRP address)
//! ```

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    process::{Child, Stdio},
    time::Duration,
};

use prober_tests::{unique_name, wait_for, Daemon, NetNs, PeerXdp, PinDir};

const VIP: &str = "198.51.100.100";
const SERVICE: &str = "198.51.100.100:80";
const ALIVE: &str = "192.0.2.10:80";
const DEAD: &str = "192.0.2.11:80";

/// One director: its namespace, its keepalived, its prober.
struct Director {
    ns: NetNs,
    keepalived: Option<Child>,
    daemon: Option<Daemon>,
    _pin_dir: PinDir,
    _port_xdp: PeerXdp,
}

impl Director {
    fn weights(&self) -> std::collections::BTreeMap<String, u32> {
        let out =
            prober_tests::run(self.ns.command("ipvsadm").args(["-Ln", "-t", SERVICE])).unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&"->") && f.len() >= 4 && f[1] != "RemoteAddress:Port")
                    .then(|| (f[1].to_string(), f[3].parse().unwrap_or(u32::MAX)))
            })
            .collect()
    }

    fn owns_vip(&self) -> bool {
        prober_tests::run(
            self.ns
                .command("ip")
                .args(["-4", "addr", "show", "dev", "eth1"]),
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("{VIP}/")))
        .unwrap_or(false)
    }
}

impl Drop for Director {
    fn drop(&mut self) {
        if let Some(mut k) = self.keepalived.take() {
            let _ = k.kill();
            let _ = k.wait();
        }
    }
}

/// Plugs `ns`'s `ifname` into `bridge` of `switch` as port `port`.
fn plug(switch: &NetNs, bridge: &str, ns: &NetNs, ifname: &str, port: &str, addr: &str) {
    prober_tests::plug_into_bridge(switch, bridge, ns, ifname, port, addr).unwrap();
}

fn keepalived_config(name: &str, me: &str, peer: &str, priority: u32) -> String {
    format!(
        "global_defs {{\n  router_id {name}\n  enable_script_security\n}}\n\
         vrrp_instance pair {{\n  state BACKUP\n  interface eth0\n  virtual_router_id 51\n\
         \x20 priority {priority}\n  advert_int 1\n  nopreempt\n\
         \x20 unicast_src_ip {me}\n  unicast_peer {{\n    {peer}\n  }}\n\
         \x20 virtual_ipaddress {{\n    {VIP}/24 dev eth1\n    192.0.2.254/24 dev eth0\n  }}\n}}\n"
    )
}

fn start_keepalived(ns: &NetNs, config: &str) -> Child {
    let base = std::env::temp_dir().join(unique_name("keepalived-"));
    let conf = base.with_extension("conf");
    std::fs::write(&conf, config).unwrap();
    ns.command("keepalived")
        .args(["-P", "--dont-fork", "--log-console", "--log-detail"])
        .arg("-f")
        .arg(&conf)
        .arg("-p")
        .arg(base.with_extension("pid"))
        .arg("-r")
        .arg(base.with_extension("vrrp.pid"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting keepalived (Debian's package, installed by cargo xtask vm-test)")
}

/// New connections to the VIP from the client: how many succeed.
fn connections(client: &NetNs, n: usize) -> usize {
    client
        .enter(move || {
            let vip = SocketAddr::V4(SocketAddrV4::new(VIP.parse().unwrap(), 80));
            (0..n)
                .filter(|_| TcpStream::connect_timeout(&vip, Duration::from_secs(2)).is_ok())
                .count()
        })
        .unwrap()
}

#[test]
fn after_failover_the_backup_already_routes_around_a_dead_server_of_two() {
    let back = NetNs::new("prbw").unwrap();
    back.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    back.ip(&["link", "set", "br0", "up"]).unwrap();
    back.ip(&["link", "add", "br1", "type", "bridge"]).unwrap();
    back.ip(&["link", "set", "br1", "up"]).unwrap();

    let client = NetNs::new("prbc").unwrap();
    plug(&back, "br1", &client, "eth0", "c0", "198.51.100.50/24");
    let mut servers = Vec::new();
    for (i, addr) in ["192.0.2.10", "192.0.2.11"].iter().enumerate() {
        let ns = NetNs::new("prbr").unwrap();
        plug(
            &back,
            "br0",
            &ns,
            "eth0",
            &format!("s{i}"),
            &format!("{addr}/24"),
        );
        ns.ip(&["route", "add", "default", "via", "192.0.2.254"])
            .unwrap();
        servers.push(ns);
    }
    let _listener = servers[0]
        .listen(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 80))
        .unwrap();
    // The second real server's host is dead: it answers nothing.
    servers[1].ip(&["link", "set", "eth0", "down"]).unwrap();

    let mut directors = Vec::new();
    for (i, (me, peer, priority)) in [
        ("192.0.2.1", "192.0.2.2", 150),
        ("192.0.2.2", "192.0.2.1", 100),
    ]
    .into_iter()
    .enumerate()
    {
        let ns = NetNs::new("prbd").unwrap();
        plug(
            &back,
            "br0",
            &ns,
            "eth0",
            &format!("d{i}"),
            &format!("{me}/24"),
        );
        plug(
            &back,
            "br1",
            &ns,
            "eth1",
            &format!("f{i}"),
            &format!("198.51.100.{}/24", i + 1),
        );
        ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
        // Frames the director's XDP sends into its veth reach the bridge
        // only if the bridge's end runs XDP too (veth's rule).
        let port_xdp = PeerXdp::attach(&back, &format!("d{i}")).unwrap();
        ns.run_with_input(
            "ipvsadm",
            &["-R"],
            &format!("-A -t {SERVICE} -s rr\n-a -t {SERVICE} -r {ALIVE} -m -w 100\n-a -t {SERVICE} -r {DEAD} -m -w 100\n"),
        )
        .unwrap();
        // The IPVS sync daemon: the master sends its connections, the
        // backup takes them.
        let role = if i == 0 { "master" } else { "backup" };
        prober_tests::run(ns.command("ipvsadm").args([
            "--start-daemon",
            role,
            "--mcast-interface",
            "eth0",
        ]))
        .unwrap();
        let keepalived = start_keepalived(
            &ns,
            &keepalived_config(&format!("d{i}"), me, peer, priority),
        );
        let pin_dir = PinDir::new();
        let daemon = Daemon::start(&ns, "eth0", &pin_dir).unwrap();
        directors.push(Director {
            ns,
            keepalived: Some(keepalived),
            daemon: Some(daemon),
            _pin_dir: pin_dir,
            _port_xdp: port_xdp,
        });
    }

    // One master (the higher priority, as nothing preempts), and prober on
    // both has taken the dead server out: no panic on a pool of two.
    wait_for(Duration::from_secs(60), || {
        Ok((directors[0].owns_vip() && !directors[1].owns_vip()).then_some(()))
    })
    .expect("the first director is master");
    for (i, d) in directors.iter().enumerate() {
        wait_for(Duration::from_secs(60), || {
            Ok((d.weights().get(DEAD) == Some(&0)).then_some(()))
        })
        .unwrap_or_else(|e| {
            panic!(
                "director {i}: {e}: {:?}\n{}",
                d.weights(),
                d.daemon.as_ref().unwrap().log()
            )
        });
        assert_eq!(d.weights().get(ALIVE), Some(&100), "director {i}");
        let log = d.daemon.as_ref().unwrap().log();
        assert!(!log.contains("PANIC"), "director {i}: {log}");
        assert!(!log.contains("director-side fault"), "director {i}: {log}");
    }
    let before = connections(&client, 20);
    assert_eq!(before, 20, "through the master");

    // The master dies (its keepalived and prober with it).
    let mut master = directors.remove(0);
    if let Some(mut k) = master.keepalived.take() {
        k.kill().unwrap();
        k.wait().unwrap();
    }
    master.daemon.take().unwrap().stop(libc::SIGKILL).unwrap();
    master.ns.ip(&["link", "set", "eth1", "down"]).unwrap();
    master.ns.ip(&["link", "set", "eth0", "down"]).unwrap();
    let backup = &directors[0];
    wait_for(Duration::from_secs(60), || {
        Ok(backup.owns_vip().then_some(()))
    })
    .expect("the backup takes the VIP");

    let after = connections(&client, 50);
    println!(
        "after failover: {after} of 50 new connections through the backup succeeded (weights there: {:?})",
        backup.weights()
    );
    assert_eq!(after, 50, "new connections after failover");
    assert_eq!(backup.weights().get(DEAD), Some(&0));
}
