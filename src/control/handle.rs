//! What each control request does to the running proxy (run by the serve
//! loop, which owns it).

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::{Connections, Request, Response, ShardStatus, Status, WsmStatus};
use crate::proxy::{BlockChange, Running};
use crate::shard::Control;

/// How long shards may take to answer a query.
const QUERY_WAIT: Duration = Duration::from_secs(5);

/// Handshakes per second over the last few seconds, from samples the
/// serve loop takes as it goes.
#[derive(Default)]
pub struct Rate {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl Rate {
    /// Notes the handshake total now (at most one sample a second kept, ten seconds' worth).
    pub fn sample(&mut self, running: &Running) {
        let now = Instant::now();
        if self.samples.back().is_some_and(|(t, _)| now.duration_since(*t) < Duration::from_secs(1)) {
            return;
        }
        self.samples.push_back((now, handshakes(running)));
        while self.samples.len() > 11 {
            self.samples.pop_front();
        }
    }

    fn per_sec(&self, running: &Running) -> f64 {
        let Some((t0, n0)) = self.samples.front() else { return 0.0 };
        let dt = t0.elapsed().as_secs_f64();
        if dt < 0.5 {
            return 0.0;
        }
        (handshakes(running).saturating_sub(*n0)) as f64 / dt
    }
}

fn handshakes(r: &Running) -> u64 {
    r.shards.iter().map(|s| s.metrics.handshakes_completed_total.load(Relaxed)).sum()
}

/// Answers one request.
pub fn handle(req: Request, running: &mut Running, rate: &Rate, upgrading: bool) -> Response {
    match req {
        Request::Status => Response { status: Some(status(running, rate, upgrading)), ..Response::done() },
        Request::Reload { .. } if upgrading => Response::failed("a live upgrade is under way: reload when it is done"),
        Request::Reload { migrate_over_ms } => {
            let o = running.reload_with(migrate_over_ms.map(Duration::from_millis));
            Response { ok: o.ok, error: (!o.ok).then(|| o.errors.join("; ")), outcome: Some(o), ..Response::done() }
        }
        Request::Block { entry } | Request::Unblock { entry } if upgrading => {
            let _ = entry;
            Response::failed("a live upgrade is under way: try again when it is done")
        }
        Request::SharedBlocklist { .. } if upgrading => Response::failed("a live upgrade is under way: try again when it is done"),
        Request::SharedBlocklist { version, base, entries, add, remove } => {
            match running.shared_blocklist(version, base, entries, add, remove) {
                Ok(o) => Response { outcome: Some(o), ..Response::done() },
                Err(e) => Response::failed(e),
            }
        }
        Request::Drain { .. } if upgrading => Response::failed("a live upgrade is under way: drain when it is done"),
        Request::Drain { cancel: true, .. } => match running.cancel_drain() {
            Ok(()) => Response::done(),
            Err(e) => Response::failed(e),
        },
        Request::Drain { over_ms, code, .. } => {
            if !crate::ws::frame::valid_close_code(code) {
                return Response::failed(format!("{code} is not a close code a server may send (1000-1003, 1007-1014, 3000-4999)"));
            }
            if over_ms > 7 * 86_400_000 {
                return Response::failed("a drain window of at most a week");
            }
            let d = running.drain(Duration::from_millis(over_ms), code, crate::session::end::Paced::Drain);
            Response { drain: Some(d), ..Response::done() }
        }
        Request::Block { entry } => change(running, &entry, BlockChange::Block),
        Request::Unblock { entry } => change(running, &entry, BlockChange::Unblock),
        Request::Connections { filter, sample } => {
            let (tx, rx) = crossbeam_channel::unbounded();
            let n =
                running.shards.iter().filter(|s| s.ctl.send(Control::Query(Box::new(filter.clone()), sample, tx.clone())).is_ok()).count();
            let mut out = Connections { count: 0, sample: Vec::new() };
            let deadline = Instant::now() + QUERY_WAIT;
            for _ in 0..n {
                match rx.recv_deadline(deadline) {
                    Ok((count, seen)) => {
                        out.count += count;
                        out.sample.extend(seen);
                    }
                    Err(_) => return Response::failed("a shard did not answer in time"),
                }
            }
            out.sample.truncate(sample);
            Response { connections: Some(out), ..Response::done() }
        }
        Request::Kick { id, code } => {
            let parsed = (id.len() == 32).then(|| u128::from_str_radix(&id, 16).ok()).flatten().map(crate::identity::ConnectionId);
            let Some(id) = parsed else {
                return Response::failed(format!("'{id}' is not a connection ID (32 hex digits, as `ctl connections` shows)"));
            };
            let (tx, rx) = crossbeam_channel::unbounded();
            let n = running.shards.iter().filter(|s| s.ctl.send(Control::Kick(id, code, tx.clone())).is_ok()).count();
            let deadline = Instant::now() + QUERY_WAIT;
            let found = (0..n).filter_map(|_| rx.recv_deadline(deadline).ok()).any(|f| f);
            if found { Response { kicked: Some(true), ..Response::done() } } else { Response::failed(format!("no connection {id} here")) }
        }
    }
}

fn change(running: &mut Running, entry: &str, c: BlockChange) -> Response {
    match running.block(entry, c) {
        Ok(o) => Response { outcome: Some(o), ..Response::done() },
        Err(e) => Response::failed(e),
    }
}

fn status(r: &Running, rate: &Rate, upgrading: bool) -> Status {
    let g = &r.generation;
    let shards: Vec<ShardStatus> = r
        .shards
        .iter()
        .enumerate()
        .map(|(i, s)| ShardStatus {
            index: i,
            alive: s.metrics.alive.load(Relaxed),
            connections: s.metrics.connections_active.load(Relaxed),
            held_streams: s.metrics.streams_held.load(Relaxed),
        })
        .collect();
    let per = g.cfg.upstream.links_per_shard as u64 * r.shards.len() as u64;
    let mut wsms: Vec<WsmStatus> =
        g.wsms.iter().map(|(_, a)| WsmStatus { wsm: a.to_string(), links_up: 0, links_expected: per, state: String::new() }).collect();
    for s in &r.shards {
        for w in s.metrics.wsms() {
            let up = w.links_up.load(Relaxed);
            match wsms.iter_mut().find(|x| x.wsm == w.wsm) {
                Some(x) => x.links_up += up,
                // An address that left the pool, still being emptied.
                None => wsms.push(WsmStatus { wsm: w.wsm.clone(), links_up: up, links_expected: 0, state: String::new() }),
            }
        }
    }
    for w in &mut wsms {
        w.state = match (w.links_up, w.links_expected) {
            (_, 0) => "leaving",
            (0, _) => "down",
            (u, e) if u >= e => "up",
            _ => "degraded",
        }
        .into();
    }
    let sum = |f: fn(&crate::metrics::ShardMetrics) -> u64| r.shards.iter().map(|s| f(&s.metrics)).sum::<u64>();
    Status {
        version: crate::build::LONG_VERSION.into(),
        pid: std::process::id(),
        uptime_secs: r.started.elapsed().as_secs(),
        generation: g.number,
        config_hash: g.hash.clone(),
        config_path: g.cfg.path.display().to_string(),
        last_reload: r.last_reload.clone(),
        connections: shards.iter().map(|s| s.connections).sum(),
        handshakes_per_sec: (rate.per_sec(r) * 10.0).round() / 10.0,
        held_streams: shards.iter().map(|s| s.held_streams).sum(),
        blocklist_entries: g.tls.verifier.blocklist().len() as u64,
        revocations_pending: sum(|m| m.revocations_pending.load(Relaxed)),
        shared_blocklist: r.shared.as_ref().map(|(v, k)| super::SharedStatus { version: *v, entries: k.len() as u64 }),
        upgrade_in_progress: upgrading,
        admission: admission(r),
        drain: r.drain_status(),
        shards,
        wsms,
    }
}

fn admission(r: &Running) -> super::AdmissionStatus {
    let a = &r.generation.cfg.admission;
    let sum = |f: &dyn Fn(&crate::metrics::ShardMetrics) -> u64| r.shards.iter().map(|s| f(&s.metrics)).sum::<u64>();
    let shed_total =
        crate::admission::Shed::ALL.iter().map(|w| (w.label().to_string(), sum(&|m| m.shed[w.index()].load(Relaxed)))).collect();
    super::AdmissionStatus {
        handshakes_per_sec: a.handshakes_per_sec,
        max_handshaking: a.max_handshaking,
        max_connections: a.max_connections,
        max_memory_mb: a.max_memory_bytes.map(|b| b >> 20),
        wsm_opens_per_sec: a.wsm_opens_per_sec,
        wsm_open_queue: a.wsm_open_queue,
        wsm_open_wait_ms: a.wsm_open_wait.as_millis() as u64,
        connections: r.node.connections.load(Relaxed),
        handshaking: sum(&|m| m.handshaking.load(Relaxed)),
        waiting_for_open: sum(&|m| m.wsm_open_queue.load(Relaxed)),
        accepts_deferred_total: sum(&|m| m.accepts_deferred_total.load(Relaxed)),
        wsm_opens_total: sum(&|m| m.wsm_opens_total.load(Relaxed)),
        wsm_open_waited_total: sum(&|m| m.wsm_open_waited_total.load(Relaxed)),
        shed_total,
    }
}
