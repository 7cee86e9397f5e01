//! A real caching proxy for CDN tests: Debian's `nginx` as a child process
//! with `proxy_cache` in front of an upstream, on a free loopback port.
//!
//! Owns the child (killed and reaped on drop) and its temp dir (config,
//! cache, temp files, error log). Every answer carries
//! `X-Cache-Status: $upstream_cache_status` (MISS, HIT, REVALIDATED, …).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Nginx {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// `nginx` from `$NGINX`, `PATH` or `/usr/sbin`, caching what it proxies
    /// to `upstream` (`host:port`) as a CDN would: keyed by URL, honouring
    /// the upstream's Cache-Control and revalidating with its ETag. Under
    /// `/short/` the same upstream is cached for one second whatever it
    /// says, to exercise revalidation.
    pub fn start(upstream: &str) -> Nginx {
        let dir = tempfile::Builder::new()
            .prefix("kiln-nginx-")
            .tempdir()
            .expect("nginx temp dir");
        let port = super::free_port();
        let d = dir.path().display();
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    proxy_cache_path {d}/cache keys_zone=kiln:1m;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_cache_revalidate on;
    # The path is the variant (the default key would let /short/ share entries).
    proxy_cache_key $scheme$host$request_uri;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://{upstream};
            proxy_cache kiln;
            add_header X-Cache-Status $upstream_cache_status always;
        }}
        location /short/ {{
            proxy_pass http://{upstream}/;
            proxy_cache kiln;
            proxy_ignore_headers Cache-Control Expires;
            proxy_cache_valid 200 1s;
            add_header X-Cache-Status $upstream_cache_status always;
        }}
    }}
}}
"#
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let child = Command::new(binary())
            .args(["-p", &dir.path().display().to_string(), "-c"])
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx (scripts/test installs it)");
        let nginx = Nginx { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {port}: {}",
                nginx.error_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NGINX") {
        return path.into();
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file());
    on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"))
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
