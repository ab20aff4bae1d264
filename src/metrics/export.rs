//! The OpenMetrics exposition of every shard's metrics, the node's and the
//! process's, through `prometheus-client`.
//!
//! Owns: naming, help text and labels of every family, and writing each
//! family once with all its samples together (shard after shard), which
//! Prometheus and OpenMetrics parsers require. Never counts anything
//! itself: it reads the atomics of [`super::ShardMetrics`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::{Histogram, Kind, NodeMetrics, ShardMetrics};
use crate::tls::handshake::Refusal;

/// What an exposition is made from.
#[derive(Debug, Clone)]
pub struct Sources {
    pub shards: Vec<Arc<ShardMetrics>>,
    pub node: Arc<NodeMetrics>,
}

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of [`render_prometheus_text`]'s.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Which format a scraper asked for with its `Accept` header: OpenMetrics
/// unless it names `text/plain` and not OpenMetrics (Prometheus itself asks
/// for OpenMetrics first; old clients and the classic text parsers ask for
/// `text/plain; version=0.0.4`; `*/*` and no header get OpenMetrics).
pub fn wants_prometheus_text(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        let a = a.to_ascii_lowercase();
        a.contains("text/plain") && !a.contains("application/openmetrics-text")
    })
}

/// The same exposition in the Prometheus text format 0.0.4, for clients
/// that do not read OpenMetrics: a counter family is named with its
/// `_total` suffix, the build info is a gauge, and there is no `# EOF`.
/// Samples are the same lines.
pub fn render_prometheus_text(src: &Sources) -> String {
    to_prometheus_text(&render(src))
}

fn to_prometheus_text(openmetrics: &str) -> String {
    let lines: Vec<&str> = openmetrics.lines().collect();
    // The family name and type each TYPE line declares.
    let types: std::collections::HashMap<&str, &str> =
        lines.iter().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|rest| rest.split_once(' ')).collect();
    let rename = |name: &str| -> (String, Option<&'static str>) {
        match types.get(name).copied() {
            Some("counter") => (format!("{name}_total"), None),
            Some("info") => (format!("{name}_info"), Some("gauge")),
            _ => (name.to_string(), None),
        }
    };
    let mut out = String::with_capacity(openmetrics.len());
    for l in lines {
        if l == "# EOF" {
            continue;
        }
        let header = l.strip_prefix("# HELP ").map(|r| ("HELP", r)).or_else(|| l.strip_prefix("# TYPE ").map(|r| ("TYPE", r)));
        match header {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let (new, as_type) = rename(name);
                let tail = if kind == "TYPE" { as_type.unwrap_or(tail) } else { tail };
                out.push_str(&format!("# {kind} {new} {tail}\n"));
            }
            None => {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

/// The whole exposition, ending in `# EOF`.
pub fn render(src: &Sources) -> String {
    let mut reg = Registry::default();
    reg.register_collector(Box::new(src.clone()));
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &reg).is_err() {
        return "# EOF\n".into();
    }
    out
}

type Labels = Vec<(&'static str, String)>;
/// A per-WSM family: name, type, help, and the field it reads.
type LinkFamily = (&'static str, MetricType, &'static str, fn(&super::WsmMetrics) -> &AtomicU64);
type Res = Result<(), std::fmt::Error>;

/// A family's samples: each label set with the value to write.
fn family(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, kind: MetricType, samples: Vec<(Labels, Sample)>) -> Res {
    // prometheus-client adds `_total` to counter names itself.
    let base = if matches!(kind, MetricType::Counter) { name.strip_suffix("_total").unwrap_or(name) } else { name };
    let mut m = enc.encode_descriptor(base, help, None, kind)?;
    for (labels, v) in samples {
        if labels.is_empty() {
            // A lone sample without labels, written without `{}`.
            return v.encode(m);
        }
        let f = m.encode_family(&labels)?;
        v.encode(f)?;
    }
    Ok(())
}

/// One sample's value.
enum Sample {
    Count(u64),
    Seconds(f64),
    Gauge(i64),
    GaugeF(f64),
    Hist(f64, u64, Vec<(f64, u64)>),
}

impl Sample {
    fn encode(self, mut e: MetricEncoder<'_>) -> Res {
        let none: Option<&prometheus_client::metrics::exemplar::Exemplar<NoLabelSet, f64>> = None;
        match self {
            Sample::Count(v) => e.encode_counter::<NoLabelSet, _, f64>(&v, none),
            Sample::Seconds(v) => e.encode_counter::<NoLabelSet, _, f64>(&v, none),
            Sample::Gauge(v) => e.encode_gauge(&v),
            Sample::GaugeF(v) => e.encode_gauge(&v),
            Sample::Hist(sum, count, buckets) => e.encode_histogram::<NoLabelSet>(sum, count, &buckets, None),
        }
    }
}

fn shard(i: usize) -> Labels {
    vec![("shard", i.to_string())]
}

fn value(kind: Kind, c: &AtomicU64) -> Sample {
    match kind {
        Kind::Counter => Sample::Count(c.load(Relaxed)),
        Kind::Gauge => Sample::Gauge(c.load(Relaxed) as i64),
    }
}

fn hist(h: &Histogram) -> Sample {
    let (sum, count, buckets) = h.snapshot();
    Sample::Hist(sum, count, buckets)
}

impl Collector for Sources {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Res {
        let e = &mut enc;
        {
            let mut m =
                e.encode_descriptor("holdfast_build", "holdfast's version, git commit and TLS library versions", None, MetricType::Info)?;
            let labels: Labels = vec![
                ("version", crate::build::VERSION.into()),
                ("commit", crate::build::COMMIT.into()),
                ("rustls", crate::build::RUSTLS.into()),
                ("ring", crate::build::RING.into()),
            ];
            m.encode_info(&labels)?;
        }
        let shards = &self.shards;
        // The plain series, in declaration order; each family holds every shard.
        let Some(first) = shards.first() else {
            return Ok(());
        };
        for (k, (name, kind, help, _)) in first.s.each().into_iter().enumerate() {
            let samples = shards.iter().enumerate().map(|(i, m)| (shard(i), value(kind, m.s.each()[k].3))).collect();
            let t = if kind == Kind::Counter { MetricType::Counter } else { MetricType::Gauge };
            family(e, name, help, t, samples)?;
        }
        let mut refused = Vec::new();
        for (i, m) in shards.iter().enumerate() {
            for (j, r) in Refusal::ALL.iter().enumerate() {
                refused.push((vec![("shard", i.to_string()), ("reason", r.label().into())], Sample::Count(m.refused[j].load(Relaxed))));
            }
        }
        family(e, "holdfast_handshake_refused_total", "TLS handshakes refused, by reason", MetricType::Counter, refused)?;
        let mut revoked = Vec::new();
        for (i, m) in shards.iter().enumerate() {
            for (j, r) in Refusal::ALL.iter().enumerate() {
                if matches!(r, Refusal::Blocked | Refusal::UnknownCa | Refusal::Expired) {
                    revoked.push((vec![("shard", i.to_string()), ("reason", r.label().into())], Sample::Count(m.revoked[j].load(Relaxed))));
                }
            }
        }
        family(
            e,
            "holdfast_connections_revoked_total",
            "established connections closed with 1008 because a policy change (reload, ctl block) no longer allows them, by reason",
            MetricType::Counter,
            revoked,
        )?;
        let mut shed = Vec::new();
        let mut paced = Vec::new();
        for (i, m) in shards.iter().enumerate() {
            for (j, r) in crate::admission::Shed::ALL.iter().enumerate() {
                shed.push((vec![("shard", i.to_string()), ("limit", r.label().into())], Sample::Count(m.shed[j].load(Relaxed))));
            }
            for (j, r) in crate::session::end::Paced::ALL.iter().enumerate() {
                paced.push((vec![("shard", i.to_string()), ("reason", r.label().into())], Sample::Count(m.paced[j].load(Relaxed))));
            }
        }
        family(
            e,
            "holdfast_admission_shed_total",
            "devices answered 503 with a jittered Retry-After by admission control, by the limit that shed them",
            MetricType::Counter,
            shed,
        )?;
        family(
            e,
            "holdfast_connections_paced_close_total",
            "established connections holdfast closed at a random moment of a window (close frame and close_notify), by why",
            MetricType::Counter,
            paced,
        )?;
        let mut record = Vec::new();
        for (i, m) in shards.iter().enumerate() {
            for (j, r) in crate::tls::record::RecordError::LABELS.iter().enumerate() {
                record
                    .push((vec![("shard", i.to_string()), ("reason", r.to_string())], Sample::Count(m.tls_record_errors[j].load(Relaxed))));
            }
        }
        family(e, "holdfast_tls_record_errors_total", "connections closed for a bad TLS record, by reason", MetricType::Counter, record)?;
        let mut closes = Vec::new();
        for (i, m) in shards.iter().enumerate() {
            for (code, c) in [(1002, &m.ws_closed_1002), (1007, &m.ws_closed_1007), (1009, &m.ws_closed_1009)] {
                closes.push((vec![("shard", i.to_string()), ("code", code.to_string())], Sample::Count(c.load(Relaxed))));
            }
        }
        family(
            e,
            "holdfast_ws_error_closes_total",
            "WebSocket connections closed for bad device input, by close code",
            MetricType::Counter,
            closes,
        )?;
        let mut accepted = Vec::new();
        for (i, m) in shards.iter().enumerate() {
            for c in &m.ca_accepted() {
                for (validity, n) in [("current", &c.current), ("ignored", &c.validity_ignored)] {
                    accepted.push((
                        vec![("shard", i.to_string()), ("ca", c.ca.clone()), ("validity", validity.into())],
                        Sample::Count(n.load(Relaxed)),
                    ));
                }
            }
        }
        family(
            e,
            "holdfast_devices_accepted_total",
            "devices accepted at the handshake, by client CA; validity=\"ignored\": outside its validity period, let in only by the CA's ignore_validity",
            MetricType::Counter,
            accepted,
        )?;
        family(
            e,
            "holdfast_handshake_duration_seconds",
            "time from accept to a finished mutual TLS handshake",
            MetricType::Histogram,
            shards.iter().enumerate().map(|(i, m)| (shard(i), hist(&m.handshake_seconds))).collect(),
        )?;
        // Per WSM address: links and stream opens.
        let per_wsm: Vec<(usize, Arc<super::WsmMetrics>)> =
            shards.iter().enumerate().flat_map(|(i, m)| m.wsms().into_iter().map(move |w| (i, w))).collect();
        let wl = |i: usize, w: &super::WsmMetrics| vec![("shard", i.to_string()), ("wsm", w.wsm.clone())];
        let link_families: [LinkFamily; 3] = [
            ("holdfast_links_up", MetricType::Gauge, "WSM links currently up", |w| &w.links_up),
            ("holdfast_link_connects_total", MetricType::Counter, "WSM link connections established", |w| &w.link_connects_total),
            (
                "holdfast_link_liveness_failures_total",
                MetricType::Counter,
                "WSM links failed because nothing arrived within the liveness timeout",
                |w| &w.link_liveness_failures_total,
            ),
        ];
        for (name, t, help, get) in link_families {
            let kind = if matches!(t, MetricType::Counter) { Kind::Counter } else { Kind::Gauge };
            family(e, name, help, t, per_wsm.iter().map(|(i, w)| (wl(*i, w), value(kind, get(w)))).collect())?;
        }
        let mut failures = Vec::new();
        for (i, w) in &per_wsm {
            for (j, reason) in crate::link::session::FAILURE_LABELS.iter().enumerate() {
                let mut l = wl(*i, w);
                l.push(("reason", reason.to_string()));
                failures.push((l, Sample::Count(w.link_failures[j].load(Relaxed))));
            }
        }
        family(
            e,
            "holdfast_link_failures_total",
            "WSM link connection attempts or links that failed, by reason (connect, connect_timeout, read, peer_closed, liveness, protocol, version, retired)",
            MetricType::Counter,
            failures,
        )?;
        family(
            e,
            "holdfast_link_peer_credit_bytes",
            "credit the WSM has for sending on this shard's links to it: 16 MiB per link up, less what holdfast has not yet returned",
            MetricType::Gauge,
            per_wsm.iter().map(|(i, w)| (wl(*i, w), Sample::Gauge(w.peer_credit.load(Relaxed)))).collect(),
        )?;
        family(
            e,
            "holdfast_wsm_open_duration_seconds",
            "time from sending a stream's OPEN to the WSM's ACCEPT or REFUSE",
            MetricType::Histogram,
            per_wsm.iter().map(|(i, w)| (wl(*i, w), hist(&w.open_seconds))).collect(),
        )?;
        // Node and process figures: one sample each, no labels.
        let p = super::process::read();
        let alive = shards.iter().filter(|m| m.alive.load(Relaxed)).count() as i64;
        let n = &self.node;
        let singles: [(&str, MetricType, &str, Sample); 15] = [
            (
                "holdfast_draining",
                MetricType::Gauge,
                "1 while a drain (holdfast ctl drain, or the graceful stop on SIGTERM) is under way: not accepting, closing spread out",
                Sample::Gauge(n.draining.load(Relaxed) as i64),
            ),
            (
                "holdfast_drain_deadline_timestamp_seconds",
                MetricType::Gauge,
                "when the running drain's window ends (Unix seconds; 0: no drain)",
                Sample::Gauge(n.drain_deadline.load(Relaxed)),
            ),
            (
                "holdfast_config_generation",
                MetricType::Gauge,
                "config generation serving (1 at start, +1 per applied reload or block/unblock)",
                Sample::Gauge(n.config_generation.load(Relaxed) as i64),
            ),
            (
                "holdfast_config_last_reload_success",
                MetricType::Gauge,
                "1 if the last reload was applied, 0 if it was refused",
                Sample::Gauge(n.last_reload_success.load(Relaxed) as i64),
            ),
            (
                "holdfast_config_last_reload_timestamp_seconds",
                MetricType::Gauge,
                "when the last reload was tried (Unix seconds; 0: none yet)",
                Sample::Gauge(n.last_reload_timestamp.load(Relaxed)),
            ),
            (
                "holdfast_blocklist_entries",
                MetricType::Gauge,
                "entries in the blocklist serving now",
                Sample::Gauge(n.blocklist_entries.load(Relaxed) as i64),
            ),
            (
                "holdfast_server_certificate_expiry_timestamp_seconds",
                MetricType::Gauge,
                "end of the server certificate's validity (Unix seconds)",
                Sample::Gauge(self.node.server_cert_not_after.load(Relaxed)),
            ),
            (
                "holdfast_shards_alive",
                MetricType::Gauge,
                "shard threads running (a shard that ended is a bug: see the log)",
                Sample::Gauge(alive),
            ),
            ("process_cpu_seconds_total", MetricType::Counter, "user and system CPU time of the process", Sample::Seconds(p.cpu_seconds)),
            ("process_open_fds", MetricType::Gauge, "open file descriptors", Sample::Gauge(p.open_fds as i64)),
            (
                "process_max_fds",
                MetricType::Gauge,
                "the process's limit on open file descriptors (soft RLIMIT_NOFILE)",
                Sample::Gauge(p.max_fds as i64),
            ),
            ("process_resident_memory_bytes", MetricType::Gauge, "resident memory", Sample::Gauge(p.rss_bytes as i64)),
            ("process_virtual_memory_bytes", MetricType::Gauge, "virtual memory", Sample::Gauge(p.vsize_bytes as i64)),
            ("process_start_time_seconds", MetricType::Gauge, "start of the process (Unix seconds)", Sample::GaugeF(p.start_time_seconds)),
            ("process_threads", MetricType::Gauge, "threads of the process", Sample::Gauge(p.threads as i64)),
        ];
        for (name, t, help, v) in singles {
            family(e, name, help, t, vec![(Labels::new(), v)])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sources, and a link's hold on its WSM entry (which keeps it).
    fn sources() -> (Sources, Arc<crate::metrics::WsmMetrics>) {
        let a = Arc::new(ShardMetrics::new(&["fleet-2019.pem".into()]));
        let b = Arc::new(ShardMetrics::new(&["fleet-2019.pem".into()]));
        ShardMetrics::inc(&a.connections_accepted_total);
        b.refusal(Refusal::Blocked);
        a.accepted_under("fleet-2019.pem", true);
        let link = b.wsm("127.0.0.1:9000");
        ShardMetrics::inc(&link.links_up);
        a.handshake_seconds.observe(std::time::Duration::from_millis(3));
        let node = Arc::new(NodeMetrics::default());
        node.server_cert_not_after.store(4_070_908_800, Relaxed);
        (Sources { shards: vec![a, b], node }, link)
    }

    /// Every family's samples directly follow its own TYPE line.
    #[test]
    fn every_family_is_contiguous_and_typed_once() {
        let (src, _link) = sources();
        let text = render(&src);
        let mut seen = std::collections::HashSet::new();
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().unwrap().to_string();
                assert!(seen.insert(current.clone()), "{current} typed twice:\n{text}");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(name.starts_with(&current), "{name} outside its family {current}:\n{text}");
            }
        }
        assert!(text.ends_with("# EOF\n"));
        assert!(seen.len() > 40, "{}", seen.len());
    }

    #[test]
    fn prometheus_text_names_counters_with_total_and_has_no_eof() {
        let (src, _link) = sources();
        let text = render_prometheus_text(&src);
        assert!(text.contains("# TYPE holdfast_connections_accepted_total counter\n"), "{text}");
        assert!(text.contains("# HELP holdfast_connections_accepted_total TCP connections accepted\n"), "{text}");
        assert!(text.contains("# TYPE holdfast_build_info gauge\n"), "{text}");
        assert!(text.contains("# TYPE holdfast_connections_active gauge\n"), "{text}");
        assert!(text.contains("# TYPE holdfast_handshake_duration_seconds histogram\n"), "{text}");
        assert!(!text.contains("# EOF"));
        assert!(text.contains("holdfast_connections_accepted_total{shard=\"0\"} 1\n"));
    }

    #[test]
    fn the_accept_header_picks_the_format() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(!wants_prometheus_text(Some(prometheus)));
        assert!(wants_prometheus_text(Some("text/plain; version=0.0.4")));
        assert!(wants_prometheus_text(Some("text/plain;version=0.0.4;q=0.3,*/*;q=0.1")));
        assert!(!wants_prometheus_text(Some("*/*")));
        assert!(!wants_prometheus_text(None));
    }

    #[test]
    fn series_carry_their_labels() {
        let (src, _link) = sources();
        let text = render(&src);
        for want in [
            "holdfast_connections_accepted_total{shard=\"0\"} 1",
            "holdfast_handshake_refused_total{shard=\"1\",reason=\"blocked\"} 1",
            "holdfast_devices_accepted_total{shard=\"0\",ca=\"fleet-2019.pem\",validity=\"ignored\"} 1",
            "holdfast_links_up{shard=\"1\",wsm=\"127.0.0.1:9000\"} 1",
            "holdfast_handshake_duration_seconds_bucket{le=\"0.005\",shard=\"0\"} 1",
            "holdfast_server_certificate_expiry_timestamp_seconds 4070908800",
            "# TYPE holdfast_ws_upgrades_completed counter",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
        assert!(text.contains("holdfast_build_info{version=\""), "{text}");
        assert!(!text.contains("holdfast_upgrades_completed"), "the old, misleading name");
    }
}
