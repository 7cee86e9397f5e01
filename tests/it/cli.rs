//! The `kiln` binary: help, presets, config layering and validation.

use std::process::Command;

fn kiln(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .envs(env.iter().copied())
        .env_remove("KILN_CONFIG")
        .output()
        .expect("run kiln");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn help_names_every_command() {
    let (ok, text) = kiln(&["--help"], &[]);
    assert!(ok, "{text}");
    for command in ["serve", "front", "worker", "request", "filters"] {
        assert!(text.contains(command), "{command} missing from:\n{text}");
    }
}

#[test]
fn filters_lists_the_sais_presets() {
    let (ok, text) = kiln(&["filters"], &[]);
    assert!(ok, "{text}");
    for line in ["tiny", "small", "medium", "large", "square"] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    assert!(
        text.contains("125x125") && text.contains("outbound"),
        "{text}"
    );
}

#[test]
fn bad_settings_are_refused_before_anything_binds() {
    let (ok, text) = kiln(&["serve"], &[("KILN_SERVER__LISTEN", "not-an-address")]);
    assert!(!ok);
    assert!(text.contains("server.listen"), "{text}");
    let (ok, text) = kiln(&["serve"], &[("KILN_NETWORK__ALLOW", "[\"10.0.0.0/99\"]")]);
    assert!(!ok);
    assert!(text.contains("network.allow"), "{text}");
    let (ok, text) = kiln(&["serve"], &[("KILN_QUEUE__BACKEND", "carrier-pigeon")]);
    assert!(!ok);
    assert!(text.to_lowercase().contains("queue.backend"), "{text}");
    let (ok, text) = kiln(&["front"], &[]);
    assert!(!ok, "front needs the redis backend");
    assert!(text.contains("redis"), "{text}");
    let (ok, text) = kiln(&["--config", "/nonexistent/kiln.toml", "serve"], &[]);
    assert!(!ok);
    assert!(text.contains("does not exist"), "{text}");
}

#[test]
fn request_reaches_a_running_kiln() {
    // Nothing listens there: the command says so and fails.
    let port = crate::support::free_port();
    let server = format!("http://127.0.0.1:{port}");
    let (ok, text) = kiln(
        &[
            "request",
            "small",
            "http://example.com/a.jpg",
            "--server",
            &server,
        ],
        &[],
    );
    assert!(!ok, "{text}");
}
