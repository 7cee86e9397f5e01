//! The `kiln` binary: help, presets, config layering and validation.

use std::process::Command;

use crate::distributed::Process;
use crate::kiln::{until_ready, Backend, Kiln, ADMIN_KEY};
use crate::support::{free_port, png_rgba, Origin, OriginResponse};

/// Runs the `kiln` binary: whether it succeeded, and its stdout + stderr.
pub fn kiln_cli(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
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
    let (ok, text) = kiln_cli(&["--help"], &[]);
    assert!(ok, "{text}");
    for command in [
        "serve", "front", "worker", "request", "filters", "account", "dispatch", "media", "purge",
        "health",
    ] {
        assert!(text.contains(command), "{command} missing from:\n{text}");
    }
}

#[test]
fn filters_lists_the_sais_presets() {
    let (ok, text) = kiln_cli(&["filters"], &[]);
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
    let (ok, text) = kiln_cli(&["serve"], &[("KILN_SERVER__LISTEN", "not-an-address")]);
    assert!(!ok);
    assert!(text.contains("server.listen"), "{text}");
    let (ok, text) = kiln_cli(&["serve"], &[("KILN_NETWORK__ALLOW", "[\"10.0.0.0/99\"]")]);
    assert!(!ok);
    assert!(text.contains("network.allow"), "{text}");
    let (ok, text) = kiln_cli(&["serve"], &[("KILN_QUEUE__BACKEND", "carrier-pigeon")]);
    assert!(!ok);
    assert!(text.to_lowercase().contains("queue.backend"), "{text}");
    let (ok, text) = kiln_cli(
        &["serve"],
        &[
            ("KILN_SAIS__DEFAULT_FILTERS", "[\"nope\"]"),
            ("KILN_SERVER__LISTEN", "127.0.0.1:1"),
        ],
    );
    assert!(!ok);
    assert!(text.contains("sais.default_filters"), "{text}");
    let (ok, text) = kiln_cli(&["front"], &[]);
    assert!(!ok, "front needs the redis backend");
    assert!(text.contains("redis"), "{text}");
    let (ok, text) = kiln_cli(&["--config", "/nonexistent/kiln.toml", "serve"], &[]);
    assert!(!ok);
    assert!(text.contains("does not exist"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_enqueues_through_a_running_kiln_and_prints_the_record() {
    let kiln = Kiln::start(Backend::Embedded).await;
    let origin = Origin::start().await;
    origin.serve(
        "/shell.png",
        OriginResponse::image("image/png", png_rgba(64, 64, [1, 2, 3, 255])),
    );
    let image_url = origin.url("/shell.png");
    let args = [
        "request",
        "tiny",
        image_url.as_str(),
        "--server",
        kiln.base.as_str(),
    ]
    .map(String::from);
    let (ok, text) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        kiln_cli(&args, &[("KILN_API_KEY", ADMIN_KEY)])
    })
    .await
    .unwrap();
    assert!(ok, "{text}");
    let record: serde_json::Value = serde_json::from_str(text.trim()).expect("the record as JSON");
    assert_eq!(
        record["code"],
        kiln::keys::media_code(&image_url, "default")
    );
    until_ready(record["url"].as_str().unwrap()).await;

    // Nothing listens there: the command says so and fails.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let (ok, text) = kiln_cli(&["request", "small", &image_url, "--server", &nowhere], &[]);
    assert!(!ok, "{text}");

    // Something accepts and never answers: the command gives up after --timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_base = format!("http://{}", silent.local_addr().unwrap());
    let started = std::time::Instant::now();
    let (ok, text) = kiln_cli(
        &[
            "media",
            "0123456789abcdef",
            "--server",
            &silent_base,
            "--timeout",
            "1",
        ],
        &[],
    );
    assert!(!ok, "{text}");
    assert!(text.contains("timed out"), "{text}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));

    // A missing list file is named, with the reason.
    let (ok, text) = kiln_cli(&["dispatch", "default", "--file", "/no/such/list.txt"], &[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("/no/such/list.txt") && text.contains("No such file"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_overrides_reach_a_served_kiln() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let storage = format!("file://{}", dir.path().join("store").display());
    let _kiln = Process::spawn(
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("serve")
            .env_remove("KILN_CONFIG")
            .env("KILN_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("KILN_STORAGE__URL", &storage)
            // What Kubernetes sets for a Service named kiln: not settings.
            .env("KILN_PORT", "tcp://10.0.0.1:8080")
            .env("KILN_SERVICE_HOST", "10.0.0.1")
            .stderr(std::process::Stdio::null()),
    );
    until_ready(&format!("http://127.0.0.1:{port}/readyz")).await;
    assert!(
        dir.path().join("store").is_dir(),
        "storage opened where KILN_STORAGE__URL says"
    );
}

/// Runs the CLI off the test's runtime threads (it blocks on its own runtime).
async fn kiln_cli_async(args: Vec<String>, env: Vec<(&'static str, String)>) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        kiln_cli(&args, &env)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_dispatch_and_media_commands_drive_a_running_kiln() {
    let kiln = Kiln::start(Backend::Embedded).await;
    let origin = Origin::start().await;
    for n in 0..3 {
        origin.serve(
            &format!("/batch/{n}.png"),
            OriginResponse::image("image/png", png_rgba(32, 32, [n as u8 * 50, 0, 0, 255])),
        );
    }
    let server = kiln.base.clone();
    let admin = vec![("KILN_API_KEY", ADMIN_KEY.to_string())];
    let (ok, text) = kiln_cli_async(
        [
            "account", "setup", "clibox", "--approx", "2000", "--server", &server,
        ]
        .map(String::from)
        .to_vec(),
        admin.clone(),
    )
    .await;
    assert!(ok, "{text}");
    let account: serde_json::Value = serde_json::from_str(text.trim()).expect("account JSON");
    assert_eq!(account["binCount"], 2);
    let key = account["apiKey"].as_str().unwrap().to_string();

    let list = tempfile::NamedTempFile::new().unwrap();
    let urls: Vec<String> = (0..3)
        .map(|n| origin.url(&format!("/batch/{n}.png")))
        .collect();
    std::fs::write(list.path(), format!("# a comment\n{}\n\n", urls.join("\n"))).unwrap();
    let (ok, text) = kiln_cli_async(
        vec![
            "dispatch".into(),
            "clibox".into(),
            "--file".into(),
            list.path().display().to_string(),
            "--filter".into(),
            "tiny".into(),
            "--wait".into(),
            "--batch".into(),
            "2".into(),
            "--server".into(),
            server.clone(),
        ],
        vec![("KILN_API_KEY", key.clone())],
    )
    .await;
    assert!(ok, "{text}");
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3, "{text}");
    assert!(rows.iter().all(|r| r["marking"] == "resized"), "{text}");

    // A batch with a URL that fails prints every row and exits non-zero.
    origin.serve("/batch/gone.png", OriginResponse::status(404));
    let (ok, text) = kiln_cli_async(
        vec![
            "dispatch".into(),
            "clibox".into(),
            "--url".into(),
            origin.url("/batch/gone.png"),
            "--url".into(),
            urls[0].clone(),
            "--filter".into(),
            "tiny".into(),
            "--wait".into(),
            "--server".into(),
            server.clone(),
        ],
        vec![("KILN_API_KEY", key.clone())],
    )
    .await;
    assert!(!ok, "{text}");
    assert!(text.contains("1 of 2 URLs failed"), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with('{')).count(),
        2,
        "{text}"
    );

    let code = rows[0]["code"].as_str().unwrap().to_string();
    let (ok, text) = kiln_cli_async(
        vec![
            "media".into(),
            code.clone(),
            "--server".into(),
            server.clone(),
        ],
        vec![("KILN_API_KEY", key.clone())],
    )
    .await;
    assert!(ok, "{text}");
    let record: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(record["code"], code.as_str());
    assert_eq!(record["originalUrl"], urls[0].as_str());

    // Purge by path with the account's key: the variant is gone and renders again.
    let path = record["path"].as_str().unwrap().to_string();
    let variant = kiln.url(&format!("/media/cache/tiny/{path}"));
    assert_eq!(reqwest::get(&variant).await.unwrap().status(), 200);
    let purge = |args: &[&str], key: &str| {
        let mut argv: Vec<String> = vec!["purge".into()];
        argv.extend(args.iter().map(|a| a.to_string()));
        argv.extend(["--server".to_string(), server.clone()]);
        kiln_cli_async(argv, vec![("KILN_API_KEY", key.to_string())])
    };
    let (ok, text) = purge(&[&path], &key).await;
    assert!(ok, "{text}");
    let purged: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(
        purged["variants"],
        serde_json::json!([format!("media/cache/tiny/{path}")])
    );
    assert_eq!(reqwest::get(&variant).await.unwrap().status(), 202);
    until_ready(&variant).await;

    // One filter by media code: the record names the original's path.
    let (ok, text) = purge(&[&code, "--filter", "tiny"], &key).await;
    assert!(ok, "{text}");
    let purged: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(
        purged["variants"],
        serde_json::json!([format!("media/cache/tiny/{path}")])
    );
    until_ready(&variant).await;

    // A whole filter needs the admin key; by media code with the original.
    let (ok, text) = purge(&["--filter", "tiny"], &key).await;
    assert!(!ok && text.contains("403"), "{text}");
    let (ok, text) = purge(&["--filter", "tiny"], ADMIN_KEY).await;
    assert!(ok, "{text}");
    let purged: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(purged["variants"].as_array().unwrap().len(), 3, "{text}");
    let (ok, text) = purge(&[&code, "--original"], &key).await;
    assert!(ok, "{text}");
    let purged: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(purged["original"], path.as_str());
    assert_eq!(purged["record"], code.as_str());
    assert!(!kiln.storage_path(&path).exists());
}
