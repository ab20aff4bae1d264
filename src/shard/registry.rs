//! The shard's table of its connections, and what operators and reloads
//! ask of them.
//!
//! Owns: one [`Entry`] per connection the shard holds (set-up or
//! established), keyed by the slab key the connection was given when it
//! came; for an established tunnel, how to reach it (its stream's shared
//! state, its link) and its identity (the packed resume data, shared with
//! the tunnel, not copied); and the [`Order`] left for a tunnel to carry
//! out at its next burst (a revocation at a set moment, a kick). Also the
//! scan that re-checks every established identity after a policy change,
//! a slice at a time so the shard keeps serving meanwhile, and the
//! answers to `holdfast ctl connections`. Never closes a connection
//! itself: the tunnel does, as its core decides.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use super::ShardCtx;
use super::link::{Link, StreamShared};
use crate::identity::ConnectionId;
use crate::session::resume::PackedResume;
use crate::tls::handshake::Refusal;
use crate::tls::labels::Labels;

/// How an established tunnel is reached, and who it is.
pub struct Reach {
    pub stream: Weak<RefCell<StreamShared>>,
    pub link: Weak<Link>,
    pub resume: PackedResume,
}

/// What a tunnel is to do at its next burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Its identity is no longer allowed: close (1008) at `at`.
    Revoke { at: Instant, why: Refusal },
    /// An operator's `ctl kick`: close now with this code.
    Kick(u16),
}

/// One connection of the shard.
pub struct Entry {
    pub id: ConnectionId,
    /// Established tunnels only. Inline: 40 bytes, less than a box's
    /// pointer and its 48-byte allocation, and no allocation per tunnel.
    pub reach: Option<Reach>,
    /// Boxed: rare, and every connection keeps the field.
    pub order: Option<Box<Order>>,
}

impl Entry {
    pub fn new(id: ConnectionId) -> Entry {
        Entry { id, reach: None, order: None }
    }
}

/// The order a tunnel keeps when another comes: a kick stays a kick (the
/// first code), a kick replaces a revocation, and of two revocations the
/// earlier stays.
fn merge(old: Option<Order>, new: Order) -> Order {
    match (old, new) {
        (Some(Order::Kick(c)), _) => Order::Kick(c),
        (Some(Order::Revoke { at: a, why }), Order::Revoke { at: b, .. }) if a <= b => Order::Revoke { at: a, why },
        _ => new,
    }
}

impl ShardCtx {
    /// Records where an established tunnel is now (at its start, and each
    /// time its stream moves to another link).
    pub(super) fn reach(&self, key: usize, stream: &Rc<RefCell<StreamShared>>, link: &Rc<Link>, resume: &PackedResume) {
        if let Some(e) = self.conns.borrow_mut().get_mut(key) {
            e.reach = Some(Reach { stream: Rc::downgrade(stream), link: Rc::downgrade(link), resume: resume.clone() });
        }
    }

    /// Whether the registry reaches the tunnel with this key through `stream`.
    pub(super) fn reaches(&self, key: usize, stream: &Rc<RefCell<StreamShared>>) -> bool {
        self.conns.borrow().get(key).and_then(|e| e.reach.as_ref()).is_some_and(|r| std::ptr::eq(r.stream.as_ptr(), Rc::as_ptr(stream)))
    }

    /// The order left for the tunnel with this key, taken if it is due at `now`.
    pub(super) fn due_order(&self, key: usize, now: Instant) -> Option<Order> {
        let mut conns = self.conns.borrow_mut();
        let e = conns.get_mut(key)?;
        match e.order.as_deref() {
            Some(Order::Revoke { at, .. }) if *at > now => None,
            Some(Order::Revoke { .. }) => {
                crate::metrics::ShardMetrics::dec(&self.metrics.revocations_pending);
                e.order.take().map(|o| *o)
            }
            _ => e.order.take().map(|o| *o),
        }
    }

    /// When a revocation left for the tunnel with this key is due.
    pub(super) fn order_at(&self, key: usize) -> Option<Instant> {
        match self.conns.borrow().get(key)?.order.as_deref() {
            Some(Order::Revoke { at, .. }) => Some(*at),
            _ => None,
        }
    }

    /// The connection with this key ended: its entry goes.
    pub(super) fn forget(&self, key: usize) {
        let e = self.conns.borrow_mut().try_remove(key);
        if e.is_some_and(|e| matches!(e.order.as_deref(), Some(Order::Revoke { .. }))) {
            crate::metrics::ShardMetrics::dec(&self.metrics.revocations_pending);
        }
    }

    /// Leaves `order` for the connection with this key and wakes it (a
    /// revocation keeps an earlier one already left).
    pub(super) fn give_order(&self, key: usize, order: Order) -> bool {
        let stream = {
            let mut conns = self.conns.borrow_mut();
            let Some(e) = conns.get_mut(key) else { return false };
            let Some(reach) = &e.reach else { return false };
            let was_revoked = matches!(e.order.as_deref(), Some(Order::Revoke { .. }));
            e.order = Some(Box::new(merge(e.order.as_deref().copied(), order)));
            match (was_revoked, matches!(e.order.as_deref(), Some(Order::Revoke { .. }))) {
                (false, true) => crate::metrics::ShardMetrics::inc(&self.metrics.revocations_pending),
                (true, false) => crate::metrics::ShardMetrics::dec(&self.metrics.revocations_pending),
                _ => {}
            }
            reach.stream.upgrade()
        };
        if let Some(s) = stream {
            match order {
                Order::Kick(_) => s.borrow_mut().wake(),
                Order::Revoke { at, .. } => self.timers.arm(&s, at),
            }
        }
        true
    }

    /// Wakes every established tunnel (so each takes up a changed config
    /// at once rather than at its next event).
    pub(super) fn wake_all(&self) {
        let streams: Vec<_> = self.conns.borrow().iter().filter_map(|(_, e)| e.reach.as_ref()?.stream.upgrade()).collect();
        for s in streams {
            s.borrow_mut().wake();
        }
    }
}

/// Whether an identity (its chain) is still allowed, and if not, why.
pub type Judge = dyn Fn(&[Vec<u8>]) -> Result<(), Refusal>;

/// Connections re-checked between yields to the shard's other work.
const SLICE: usize = 256;

/// After a policy change: checks every established identity against
/// `judge` (`Err`: no longer allowed, and why) and leaves each refused one a
/// revocation at a random moment within `spread`. Yields every
/// [`SLICE`] connections. Returns how many were revoked.
pub(super) async fn recheck(ctx: Rc<ShardCtx>, judge: impl Fn(&[Vec<u8>]) -> Result<(), Refusal>, spread: Duration) -> u64 {
    let keys: Vec<usize> = ctx.conns.borrow().iter().filter(|(_, e)| e.reach.is_some()).map(|(k, _)| k).collect();
    let now = Instant::now();
    let mut revoked = 0;
    for slice in keys.chunks(SLICE) {
        for &k in slice {
            let resume = ctx.conns.borrow().get(k).and_then(|e| Some(e.reach.as_ref()?.resume.clone()));
            let Some(chain) = resume.and_then(|r| r.unpack()).map(|r| r.chain) else { continue };
            let verdict = judge(&chain);
            crate::metrics::ShardMetrics::inc(&ctx.metrics.identities_rechecked_total);
            if let Err(why) = verdict {
                let ms = spread.as_millis().min(u32::MAX as u128) as u32;
                let at = now + Duration::from_millis(monoio::utils::thread_rng_n(ms.max(1)) as u64);
                if ctx.give_order(k, Order::Revoke { at, why }) {
                    revoked += 1;
                }
            }
        }
        monoio::time::sleep(Duration::ZERO).await;
    }
    revoked
}

/// After the device labels changed: tells the WSM of each established
/// stream whose labels differ between `before` and `after` (LABELS), a
/// slice at a time. Held streams get theirs in the OPEN that resumes them.
/// Returns how many were told.
pub(super) async fn relabel(ctx: Rc<ShardCtx>, before: &Labels, after: &Labels) -> u64 {
    let keys: Vec<usize> = ctx.conns.borrow().iter().filter(|(_, e)| e.reach.is_some()).map(|(k, _)| k).collect();
    let mut told = 0;
    for slice in keys.chunks(SLICE) {
        for &k in slice {
            let found = ctx.conns.borrow().get(k).and_then(|e| {
                let r = e.reach.as_ref()?;
                Some((r.resume.clone(), r.link.upgrade()?, r.stream.upgrade()?))
            });
            let Some((resume, link, stream)) = found else { continue };
            let Some(chain) = resume.unpack().map(|r| r.chain) else { continue };
            let now = after.of(&chain);
            if now != before.of(&chain) {
                let sid = stream.borrow().stream_id;
                if link.send_labels(sid, &now) {
                    told += 1;
                }
            }
        }
        monoio::time::sleep(Duration::ZERO).await;
    }
    told
}

/// What `holdfast ctl connections` asks for: connections whose identity
/// matches every given part (substring for subject, exact otherwise).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Filter {
    pub ca: Option<String>,
    /// Hex SHA-256 of the leaf (colons allowed).
    pub fingerprint: Option<String>,
    pub serial: Option<String>,
    pub subject: Option<String>,
    /// The WSM's host as configured, or its address.
    pub wsm: Option<String>,
}

/// One connection, as `ctl connections` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Seen {
    pub id: String,
    pub shard: u16,
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub fingerprint: String,
    pub ca: String,
    pub wsm: String,
}

/// Matches and a sample of them (at most `sample`).
pub fn query(ctx: &ShardCtx, f: &Filter, sample: usize) -> (u64, Vec<Seen>) {
    let fp = f.fingerprint.as_ref().map(|s| s.replace(':', "").to_ascii_lowercase());
    let serial = f.serial.as_ref().map(|s| s.replace(':', "").trim_start_matches('0').to_ascii_lowercase());
    let verifier = ctx.current().tls.verifier.clone();
    let mut n = 0;
    let mut out = Vec::new();
    let conns = ctx.conns.borrow();
    for (_, e) in conns.iter() {
        let Some(reach) = &e.reach else { continue };
        let Some(r) = reach.resume.unpack() else { continue };
        let ca = verifier.ca_name(&r.chain);
        let link = reach.link.upgrade();
        let wsm = link.as_ref().map(|l| format!("{} ({})", l.host, l.addr)).unwrap_or_default();
        // The address is not shown; only the certificate's facts are.
        let Some(id) = crate::identity::from_chain(r.chain, std::net::SocketAddr::from(([0, 0, 0, 0], 0))) else { continue };
        let hex: String = id.fingerprint.iter().map(|b| format!("{b:02x}")).collect();
        let ok = f.ca.as_ref().is_none_or(|c| *c == ca)
            && fp.as_ref().is_none_or(|p| *p == hex)
            && serial.as_ref().is_none_or(|s| *s == id.serial.trim_start_matches('0'))
            && f.subject.as_ref().is_none_or(|s| id.subject.contains(s.as_str()))
            && f.wsm.as_ref().is_none_or(|w| link.as_ref().is_some_and(|l| l.host == *w || l.addr.to_string() == *w));
        if !ok {
            continue;
        }
        n += 1;
        if out.len() < sample {
            out.push(Seen {
                id: e.id.to_string(),
                shard: ctx.index,
                subject: id.subject,
                issuer: id.issuer,
                serial: id.serial,
                fingerprint: hex,
                ca,
                wsm,
            });
        }
    }
    (n, out)
}

/// The slab key of the connection with this ID, if this shard holds it.
pub fn find(ctx: &ShardCtx, id: ConnectionId) -> Option<usize> {
    ctx.conns.borrow().iter().find(|(_, e)| e.id == id).map(|(k, _)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_stays_small() {
        // Every connection has one; the slab adds its own tag.
        assert!(std::mem::size_of::<Entry>() <= 64, "Entry is {} B", std::mem::size_of::<Entry>());
    }

    #[test]
    fn orders_merge_kick_first_then_the_earliest_revocation() {
        let t = Instant::now();
        let (early, late) = (t, t + Duration::from_secs(5));
        let revoke = |at| Order::Revoke { at, why: Refusal::Blocked };
        assert_eq!(merge(None, revoke(late)), revoke(late));
        assert_eq!(merge(Some(revoke(early)), revoke(late)), revoke(early), "a later revocation does not postpone one");
        assert_eq!(
            merge(Some(revoke(late)), Order::Revoke { at: early, why: Refusal::UnknownCa }),
            Order::Revoke { at: early, why: Refusal::UnknownCa }
        );
        assert_eq!(merge(Some(revoke(late)), Order::Kick(4000)), Order::Kick(4000), "a kick does not wait");
        assert_eq!(merge(Some(Order::Kick(4000)), revoke(early)), Order::Kick(4000));
        assert_eq!(merge(Some(Order::Kick(4000)), Order::Kick(1000)), Order::Kick(4000));
    }
}
