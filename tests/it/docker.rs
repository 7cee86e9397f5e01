//! What can be checked of `docker/` without a Docker engine: the image's
//! ENV, USER, CMD and HEALTHCHECK run against the test build of kiln as a
//! non-root user, `--locked` builds accept Cargo.lock, and every service of
//! the compose file runs a real kiln command with settings kiln accepts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::distributed::Process;
use crate::kiln::until_ready;
use crate::support::{eventually, free_port, jpeg};

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// A Dockerfile instruction's JSON-array argument (`CMD ["kiln", "serve"]`).
fn exec_form(line: &str) -> Vec<String> {
    let array = &line[line.find('[').expect("exec form")..];
    serde_json::from_str(array).expect("a JSON array")
}

struct Image {
    env: BTreeMap<String, String>,
    user: String,
    cmd: Vec<String>,
    healthcheck: Vec<String>,
}

/// The runtime stage of docker/Dockerfile (everything after its last FROM).
fn runtime_image() -> Image {
    let text = std::fs::read_to_string(repo_file("docker/Dockerfile")).unwrap();
    let runtime = text.rsplit("\nFROM ").next().unwrap();
    let mut image = Image {
        env: BTreeMap::new(),
        user: String::new(),
        cmd: Vec::new(),
        healthcheck: Vec::new(),
    };
    for line in runtime.lines().map(str::trim) {
        if let Some(pair) = line.strip_prefix("ENV ") {
            let (key, value) = pair.split_once('=').expect("ENV KEY=VALUE");
            image.env.insert(key.to_string(), value.to_string());
        } else if let Some(user) = line.strip_prefix("USER ") {
            image.user = user.to_string();
        } else if line.starts_with("CMD ") {
            image.cmd = exec_form(line);
        } else if line.starts_with("HEALTHCHECK ") {
            image.healthcheck = exec_form(&line[line.find(" CMD ").expect("HEALTHCHECK CMD")..]);
        }
    }
    image
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_kiln_as_a_non_root_user_and_its_healthcheck_passes() {
    let image = runtime_image();
    assert!(
        !image.user.is_empty() && image.user != "root",
        "USER {}",
        image.user
    );
    assert_eq!(image.cmd, ["kiln", "serve"]);
    assert_eq!(image.healthcheck[0], "kiln");
    // The paths and port the image fixes, moved into a temp dir and a free port.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut env = image.env.clone();
    let moved = [
        ("KILN_SERVER__LISTEN", format!("0.0.0.0:{port}")),
        (
            "KILN_STORAGE__URL",
            dir.path().join("var").display().to_string(),
        ),
        (
            "KILN_SERVER__UPGRADE_SOCK",
            dir.path().join("upgrade.sock").display().to_string(),
        ),
    ];
    for (key, value) in &moved {
        assert!(env.contains_key(*key), "the Dockerfile sets {key}");
        env.insert(key.to_string(), value.clone());
    }
    env.insert("KILN_NETWORK__ALLOW".into(), "[\"127.0.0.1/32\"]".into());

    // As an unprivileged user when the test runs as root (CI), as the image does.
    let unprivileged = |program: &str, args: &[String]| {
        let mut command = if is_root() {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
            c.arg(program);
            c
        } else {
            Command::new(program)
        };
        command.args(args).env_remove("KILN_CONFIG").envs(&env);
        command
    };
    if is_root() {
        std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
    }
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let log = std::fs::File::create(dir.path().join("kiln.log")).unwrap();
    let _serving = Process::spawn(
        unprivileged(kiln, &image.cmd[1..])
            .stdout(log.try_clone().unwrap())
            .stderr(log),
    );
    let healthcheck = image.healthcheck[1..].to_vec();
    let read_log = || std::fs::read_to_string(dir.path().join("kiln.log")).unwrap_or_default();
    eventually(
        Duration::from_secs(30),
        "the HEALTHCHECK command passes",
        || {
            let status = unprivileged(kiln, &healthcheck).output().unwrap().status;
            async move { status.success().then_some(()) }
        },
    )
    .await;

    // It writes storage as that user: a miss is rendered and served.
    let original = dir.path().join("var/default/0/x.jpg");
    std::fs::create_dir_all(original.parent().unwrap()).unwrap();
    std::fs::write(&original, jpeg(400, 300, [10, 200, 10])).unwrap();
    let url = format!("http://127.0.0.1:{port}/media/cache/small/default/0/x.jpg");
    assert_eq!(reqwest::get(&url).await.unwrap().status(), 202);
    until_ready(&url).await;
    let variant = dir.path().join("var/media/cache/small/default/0/x.jpg");
    assert!(variant.is_file(), "{}", read_log());
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The Dockerfile builds with `--locked`: Cargo.lock must match Cargo.toml.
#[test]
fn cargo_lock_is_current_for_locked_builds() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["metadata", "--locked", "--offline", "--format-version", "1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `${VAR:?message}` and `${VAR}` as compose would fill them in, with a
/// stand-in value; `${VAR:-default}` with its default.
fn interpolated(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closed ${") + start;
        match rest[start..end].split_once(":-") {
            Some((_, default)) => out.push_str(default),
            None => out.push_str("stand-in-value-0123456789"),
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

#[test]
fn every_compose_service_runs_a_kiln_command_with_settings_kiln_accepts() {
    let text = std::fs::read_to_string(repo_file("docker/compose.yml")).unwrap();
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    doc.apply_merge().unwrap();
    let services = doc["services"].as_mapping().expect("services");
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let mut roles = Vec::new();
    for (name, service) in services {
        let name = name.as_str().unwrap();
        let mut service = service.clone();
        service.apply_merge().unwrap();
        if service["image"].as_str() != Some("kiln") {
            continue;
        }
        let command: Vec<String> = serde_yaml::from_value(service["command"].clone()).unwrap();
        assert_eq!(command[0], "kiln", "{name}");
        roles.push(command[1].clone());
        let mut environment: BTreeMap<String, String> = BTreeMap::new();
        if let Some(mapping) = service["environment"].as_mapping() {
            let mut mapping = serde_yaml::Value::Mapping(mapping.clone());
            mapping.apply_merge().unwrap();
            for (key, value) in mapping.as_mapping().unwrap() {
                let value = match value {
                    serde_yaml::Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other).unwrap().trim().to_string(),
                };
                environment.insert(key.as_str().unwrap().to_string(), interpolated(&value));
            }
        }
        assert!(
            environment.contains_key("KILN_REDIS__URL"),
            "{name} shares Redis"
        );
        // URLs in records and webhooks must be the front's, as clients see it.
        assert_eq!(
            environment
                .get("KILN_SERVER__PUBLIC_URL")
                .map(String::as_str),
            Some("http://localhost:8080"),
            "{name}"
        );
        let run = |args: &[&str]| {
            let output = Command::new(kiln)
                .args(args)
                .env_remove("KILN_CONFIG")
                .envs(&environment)
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(output.status.success(), "{name}: kiln {args:?}: {text}");
        };
        // Its command parses, and its settings load and validate (unknown keys are refused).
        let mut help: Vec<&str> = command[1..].iter().map(String::as_str).collect();
        help.push("--help");
        run(&help);
        run(&["filters"]);
        if let Some(test) = service["healthcheck"]["test"].as_sequence() {
            let test: Vec<&str> = test.iter().filter_map(|v| v.as_str()).collect();
            assert_eq!(&test[..2], ["CMD", "kiln"], "{name}");
            let mut help = test[2..].to_vec();
            help.push("--help");
            run(&help);
        }
    }
    roles.sort();
    assert_eq!(roles, ["front", "worker", "worker"]);
    let redis: Vec<String> = serde_yaml::from_value(services["redis"]["command"].clone()).unwrap();
    assert!(
        redis.windows(2).any(|w| w == ["--appendonly", "yes"]),
        "Redis keeps an append-only file: {redis:?}"
    );
}
