use super::*;

#[test]
fn no_file_content_is_the_default_configuration() {
    assert_eq!(Config::parse("").unwrap(), Config::default());
}

#[test]
fn a_full_file_is_read() {
    let config = Config::parse(
        r#"
[daemon]
interval = "200ms"
rise = 3
manual_weights = "overwrite"

[weights]
floor = 0.2
slow_start = "1m"

[[service]]
match = "tcp:192.0.2.10:80"
port = 8080
fall = 5

[[service]]
match = "fwmark:7"
probe = "none"
"#,
    )
    .unwrap();
    assert_eq!(config.interval, Duration::from_millis(200));
    assert_eq!(config.limits, RiseFall { rise: 3, fall: 3 });
    assert_eq!(config.manual_weights, ManualWeights::Overwrite);
    assert_eq!(config.policy.floor, 0.2);
    assert_eq!(config.policy.slow_start, Duration::from_secs(60));
    let web = config
        .service(&parse_service("tcp:192.0.2.10:80").unwrap())
        .unwrap();
    assert_eq!((web.port, web.fall), (Some(8080), Some(5)));
    let marked = config
        .service(&ServiceKey::Fwmark {
            family: Family::Ipv4,
            mark: 7,
        })
        .unwrap();
    assert_eq!(marked.probe, Some(ProbeChoice::None));
    assert_eq!(
        marked.policy, config.policy,
        "no overrides: the global policy"
    );
}

#[test]
fn a_service_can_have_its_own_weight_policy() {
    let config = Config::parse(
        "[weights]\nfloor = 0.2\n[[service]]\nmatch = \"tcp:192.0.2.10:80\"\n[service.weights]\nlatency_aware = false\npanic_threshold = 0.3\n",
    )
    .unwrap();
    let key = parse_service("tcp:192.0.2.10:80").unwrap();
    let (latency_aware, policy) = config.weights_for(&key);
    assert!(!latency_aware);
    assert_eq!(
        (policy.panic_threshold, policy.floor),
        (0.3, 0.2),
        "override on top of the global policy"
    );
    let other = parse_service("tcp:192.0.2.11:80").unwrap();
    assert_eq!(config.weights_for(&other), (true, config.policy));
    let err =
        Config::parse("[[service]]\nmatch = \"fwmark:1\"\n[service.weights]\ndecay = \"1s\"\n")
            .unwrap_err();
    assert!(
        err.to_string().contains("line 4") && err.to_string().contains("decay"),
        "{err}"
    );
}

#[test]
fn errors_name_line_and_field() {
    let cases = [
        (
            "[daemon]\ninterval = \"fast\"\n",
            "line 2",
            "not a duration",
        ),
        ("[daemon]\n\nrise = 0\n", "line 3", "not a count"),
        ("[weights]\nfloor = 1.5\n", "line 2", "not a share"),
        (
            "[[service]]\nmatch = \"tcp:1.2.3.4\"\n",
            "line 2",
            "no port",
        ),
        ("[daemon]\nintervall = \"1s\"\n", "line 2", "intervall"),
        (
            "[daemon]\ninterval = \"fast\"\n",
            "line 2",
            "`interval = \"fast\"`",
        ),
        (
            "[[service]]\nmatch = \"fwmark:1\"\nport = 0\n",
            "line 3",
            "not a port",
        ),
    ];
    for (text, line, what) in cases {
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(err.contains(line) && err.contains(what), "{text:?}: {err}");
    }
    let check_cases = [
        (
            "[[service]]\nmatch = \"fwmark:1\"\n\n[[service.check]]\ntype = \"tcp\"\npath = \"/\"\n",
            "line 4",
            "`path` does not apply",
        ),
        (
            "[[service]]\nmatch = \"fwmark:1\"\n[service.check]\ntype = \"http\"\nbody_regex = \"(\"\n",
            "line 1",
            "body_regex is not a regular expression",
        ),
        (
            "[[service]]\nmatch = \"fwmark:1\"\n[[service.check]]\ntype = \"gopher\"\n",
            "line 4",
            "unknown variant `gopher`",
        ),
        (
            "[[service]]\nmatch = \"fwmark:1\"\n[[service.check]]\ntype = \"dns\"\n",
            "line 3",
            "`query`",
        ),
        (
            "[[service]]\nmatch = \"fwmark:1\"\n[[service.check]]\ntype = \"command\"\ncommand = []\n",
            "line 5",
            "program and its arguments",
        ),
        (
            "[alerts]\nwebhook = \"ftp://x/\"\n",
            "line 2",
            "not a webhook URL",
        ),
        ("[agent]\ndeadline = \"5s\"\n", "line 1", "missing field `port`"),
        ("[agent]\nport = 60001\n", "line 2", "ports of direct-routing checks"),
        (
            "[[service]]\nmatch = \"fwmark:1\"\n[[service.check]]\ntype = \"http\"\ntls_verify = true\n",
            "line 3",
            "`tls_verify` does not apply",
        ),
        (
            "[[service]]\nmatch = \"fwmark:1\"\n[[service.check]]\ntype = \"https\"\ntls_verify = true\n",
            "line 3",
            "needs `host`",
        ),
        (
            "[[service]]\nmatch = \"fwmark:1\"\n[[service.check]]\ntype = \"http\"\nhost = \"a\\r\\nX-Evil: 1\"\n",
            "line 3",
            "without spaces",
        ),
        (
            "[[service]]\nmatch = \"fwmark:1\"\nprobe = \"none\"\n[[service.check]]\ntype = \"tcp\"\n",
            "line 1",
            "probe = \"none\"",
        ),
    ];
    for (text, line, what) in check_cases {
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(err.contains(line) && err.contains(what), "{text:?}: {err}");
    }
    let twice = "[[service]]\nmatch = \"fwmark:1\"\n[[service]]\nmatch = \"fwmark:1\"\n";
    assert!(Config::parse(twice)
        .unwrap_err()
        .to_string()
        .contains("configured twice"));
}

#[test]
fn the_agent_key_file_is_read_and_must_be_private() {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::temp_dir().join(format!("prober-key-test-{}", std::process::id()));
    std::fs::write(&path, "00112233445566778899aabbccddeeff\n").unwrap();
    let text = format!(
        "[agent]\nport = 5555\nkey_file = {:?}\n",
        path.display().to_string()
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Config::parse(&text).unwrap_err().to_string();
    assert!(
        err.contains("line 3") && err.contains("key_file") && err.contains("chmod 600"),
        "{err}"
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = Config::parse(&text).unwrap();
    assert_eq!(
        config.agent.unwrap().key,
        Some(crate::agent::parse_key("00112233445566778899aabbccddeeff").unwrap())
    );
    std::fs::write(&path, "short\n").unwrap();
    let err = Config::parse(&text).unwrap_err().to_string();
    assert!(err.contains("32 hex digits"), "{err}");
    std::fs::remove_file(&path).unwrap();
    let err = Config::parse(&text).unwrap_err().to_string();
    assert!(err.contains("No such file"), "{err}");
}
