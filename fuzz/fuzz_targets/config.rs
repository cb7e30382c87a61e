//! The config file parser on arbitrary text: it returns a configuration or
//! an error that says something, and never panics.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prober_user::config::{parse_service, Config};

fuzz_target!(|data: &[u8]| {
    // A config file that is not UTF-8 never gets this far (reading it fails
    // first); the lossy text still exercises the parser on its neighbours.
    let text = String::from_utf8_lossy(data);
    match Config::parse(&text) {
        Ok(config) => {
            // What `prober check` and the daemon do with a parsed file.
            let _ = format!("{config:?}");
            for service in &config.services {
                let _ = config.weights_for(&service.service);
            }
        }
        Err(e) => {
            let message = format!("{e:#}");
            assert!(!message.trim().is_empty(), "an empty error for {text:?}");
        }
    }
    // `match = "..."` values, and the same function the CLI uses.
    for line in text.lines() {
        if let Err(e) = parse_service(line.trim()) {
            assert!(!e.is_empty(), "an empty error for service {line:?}");
        }
    }
});
