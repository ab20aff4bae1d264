//! The three proxies under test, configured for the same job: terminate
//! mutual TLS (same server certificate, device CAs and AEAD suites, TLS 1.2
//! and 1.3) and carry device WebSockets to an echo upstream. Settings and
//! the reason for each are in bench/README.md.

use std::path::Path;

/// TLS 1.2 suites in OpenSSL names (the ECDSA server key makes these the set).
pub const TLS12_CIPHERS: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305";
pub const TLS13_SUITES: &str = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxy {
    Holdfast,
    Haproxy,
    Nginx,
}

impl Proxy {
    pub fn parse(s: &str) -> Option<Proxy> {
        match s {
            "holdfast" => Some(Proxy::Holdfast),
            "haproxy" => Some(Proxy::Haproxy),
            "nginx" => Some(Proxy::Nginx),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Proxy::Holdfast => "holdfast",
            Proxy::Haproxy => "haproxy",
            Proxy::Nginx => "nginx",
        }
    }

    /// Debian package that provides it (peers only).
    pub fn package(self) -> Option<&'static str> {
        match self {
            Proxy::Holdfast => None,
            Proxy::Haproxy => Some("haproxy"),
            Proxy::Nginx => Some("nginx"),
        }
    }
}

/// Connections each peer may hold: every device costs a peer two file
/// descriptors (device and upstream), under a per-process limit.
pub fn peer_maxconn(fd_limit: u64) -> u64 {
    fd_limit.saturating_sub(200) / 2
}

/// The storm's and the drain's limits, as each proxy spells them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// TLS handshakes started per second (0: none).
    pub handshakes_per_sec: u32,
    /// Upstream streams (connections) opened per second (0: none).
    pub opens_per_sec: u32,
    /// The drain window in seconds (drain scenario only).
    pub drain_over: Option<f64>,
}

impl Limits {
    /// holdfast's `[admission]` table (devices wait for an open rather than being shed).
    fn holdfast(&self) -> String {
        let mut t = String::from("[admission]\nwsm_open_queue = 1000000\nwsm_open_wait_ms = 120000\n");
        if self.handshakes_per_sec > 0 {
            t.push_str(&format!("handshakes_per_sec = {}\n", self.handshakes_per_sec));
        }
        if self.opens_per_sec > 0 {
            t.push_str(&format!("wsm_opens_per_sec = {}\n", self.opens_per_sec));
        }
        t
    }
}

#[allow(clippy::too_many_arguments)]
pub fn holdfast_config(
    pki: &Path,
    port: u16,
    wsm: &[String],
    shards: usize,
    cpus: &str,
    metrics_port: u16,
    (moving_per_shard, resume_per_sec): (u32, u32),
    limits: &Limits,
) -> String {
    let admission = limits.holdfast();
    let wsm = wsm.iter().map(|w| format!("\"{w}\"")).collect::<Vec<_>>().join(", ");
    format!(
        r#"[listen]
addr = "127.0.0.1:{port}"
shards = {shards}
cpus = "{cpus}"
backlog = 65535

[tls]
cert_chain = "{pki}/server-chain.pem"
key = "{pki}/server.key"
blocklist = "{pki}/blocklist.txt"

[[tls.client_ca]]
file = "{pki}/fleet-2024.pem"

[[tls.client_ca]]
file = "{pki}/fleet-2019.pem"
ignore_validity = true

[websocket]
idle_timeout_secs = 3600

[upstream]
wsm = [{wsm}]
links_per_shard = 1
resume_per_sec = {resume_per_sec}

[buffers]
per_shard = 1024

[metrics]
addr = "127.0.0.1:{metrics_port}"

[upgrade]
pid_file = "{pki}/holdfast.pid"
moving_per_shard = {moving_per_shard}

[control]
socket = "{pki}/control.sock"

{admission}
"#,
        pki = pki.display()
    )
}

pub fn haproxy_config(pki: &Path, port: u16, upstream: &str, threads: usize, maxconn: u64, limits: &Limits) -> String {
    let mut global = String::new();
    let mut frontend = String::new();
    if limits.handshakes_per_sec > 0 {
        global.push_str(&format!("    maxsslrate {}\n", limits.handshakes_per_sec));
    }
    if limits.opens_per_sec > 0 {
        frontend.push_str(&format!("    rate-limit sessions {}\n", limits.opens_per_sec));
    }
    if let Some(w) = limits.drain_over {
        // Soft stop (SIGUSR1): closes spread over the window, the rest cut at its end.
        global.push_str(&format!("    close-spread-time {}ms\n    hard-stop-after {}ms\n", (w * 1000.0) as u64, (w * 1000.0) as u64));
    }
    format!(
        r#"global
    nbthread {threads}
    maxconn {maxconn}
{global}
    ssl-default-bind-ciphers {TLS12_CIPHERS}
    ssl-default-bind-ciphersuites {TLS13_SUITES}
    ssl-default-bind-options ssl-min-ver TLSv1.2
    tune.ssl.cachesize 20000
    tune.bufsize 16384

defaults
    mode http
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout http-request 10s

frontend devices
    bind 127.0.0.1:{port} ssl crt {pki}/haproxy-server.pem ca-file {pki}/device-cas.pem verify required
    maxconn {maxconn}
{frontend}    default_backend echo

backend echo
    server echo {upstream} maxconn {maxconn}
"#,
        pki = pki.display()
    )
}

pub fn nginx_config(pki: &Path, work: &Path, port: u16, upstream: &str, workers: usize, maxconn: u64, limits: &Limits) -> String {
    let main = limits.drain_over.map(|w| format!("worker_shutdown_timeout {}ms;\n", (w * 1000.0) as u64)).unwrap_or_default();
    // Upgrades beyond the rate wait (a burst queue, no nodelay): the upstream
    // sees them at the rate. nginx has no handshake-rate limit.
    let (zone, req) = if limits.opens_per_sec > 0 {
        (
            format!("limit_req_zone $scheme zone=opens:1m rate={}r/s;\n", limits.opens_per_sec),
            "limit_req zone=opens burst=1000000;\n".to_string(),
        )
    } else {
        (String::new(), String::new())
    };
    format!(
        r#"{main}worker_processes {workers};
worker_cpu_affinity auto;
worker_rlimit_nofile {nofile};
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
daemon off;
user root;

events {{
    worker_connections {wc};
    multi_accept on;
}}

http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ciphers {TLS12_CIPHERS};
    ssl_conf_command Ciphersuites {TLS13_SUITES};
    ssl_session_cache shared:SSL:50m;
    ssl_session_tickets on;
    ssl_buffer_size 4k;
    {zone}
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        '' close;
    }}

    upstream echo {{
        server {upstream};
    }}

    server {{
        listen 127.0.0.1:{port} ssl reuseport backlog=65535;
        ssl_certificate {pki}/server-chain.pem;
        ssl_certificate_key {pki}/server.key;
        ssl_client_certificate {pki}/device-cas.pem;
        ssl_verify_client on;

        location / {{
            {req}
            proxy_pass http://echo;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
            proxy_buffer_size 4k;
        }}
    }}
}}
"#,
        pki = pki.display(),
        work = work.display(),
        nofile = maxconn * 2 + 100,
        wc = maxconn * 2 + 50,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_carry_the_same_suites_and_certificates() {
        // A real directory: holdfast's validation checks the pid file's.
        let dir = std::env::temp_dir().join(format!("hf-bench-peers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = dir.as_path();
        let none = Limits::default();
        let h = haproxy_config(pki, 8443, "127.0.0.1:9000", 1, 9000, &none);
        let n = nginx_config(pki, Path::new("/w"), 8443, "127.0.0.1:9000", 1, 9000, &none);
        for c in [&h, &n] {
            assert!(c.contains(TLS12_CIPHERS) && c.contains(TLS13_SUITES));
            assert!(c.contains(&pki.join("device-cas.pem").display().to_string()));
        }
        assert!(h.contains("verify required") && h.contains("nbthread 1"));
        assert!(n.contains("ssl_verify_client on") && n.contains("worker_processes 1;"));
        let storm = Limits { handshakes_per_sec: 500, opens_per_sec: 300, drain_over: Some(30.0) };
        let hf = holdfast_config(pki, 8443, &["127.0.0.1:9000".into(), "127.0.0.1:9001".into()], 1, "0", 9100, (256, 2000), &storm);
        assert!(hf.contains("shards = 1") && hf.contains("cpus = \"0\""));
        let checked = holdfast::config::Config::parse(&hf, Path::new("/x.toml"));
        let _ = std::fs::remove_dir_all(&dir);
        let checked = checked.expect("holdfast config validates");
        assert_eq!((checked.admission.handshakes_per_sec, checked.admission.wsm_opens_per_sec), (Some(500), Some(300)));
        let h = haproxy_config(pki, 8443, "127.0.0.1:9000", 1, 9000, &storm);
        assert!(h.contains("maxsslrate 500") && h.contains("rate-limit sessions 300") && h.contains("hard-stop-after 30000ms"), "{h}");
        let n = nginx_config(pki, Path::new("/w"), 8443, "127.0.0.1:9000", 1, 9000, &storm);
        assert!(
            n.contains("rate=300r/s") && n.contains("limit_req zone=opens") && n.starts_with("worker_shutdown_timeout 30000ms;"),
            "{n}"
        );
    }

    #[test]
    fn peers_get_half_the_descriptors() {
        assert_eq!(peer_maxconn(20_000), 9_900);
        assert_eq!(proxy_names(), ["holdfast", "haproxy", "nginx"]);
    }

    fn proxy_names() -> Vec<&'static str> {
        ["holdfast", "haproxy", "nginx"].iter().map(|s| Proxy::parse(s).unwrap().name()).collect()
    }
}
