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
use crate::session::end::Paced;
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
    /// holdfast's own paced close (a drain, the graceful stop, the
    /// connection's age, a migration): close with `code` at `at`.
    Close { at: Instant, code: u16, why: Paced },
}

impl Order {
    /// When a timed order is due (a kick is due at once).
    fn at(&self) -> Option<Instant> {
        match self {
            Order::Revoke { at, .. } | Order::Close { at, .. } => Some(*at),
            Order::Kick(_) => None,
        }
    }
}

/// One connection of the shard.
pub struct Entry {
    /// The connection ID's two halves (a `u128` would align the entry to
    /// 16 bytes and pad it by 8): see [`Entry::id`].
    id: [u64; 2],
    /// Established tunnels only. Inline: 40 bytes, less than a box's
    /// pointer and its 48-byte allocation, and no allocation per tunnel.
    pub reach: Option<Reach>,
    /// Boxed: rare, and every connection keeps the field.
    pub order: Option<Box<Order>>,
    /// The shard's server-certificate epoch when the connection came
    /// (`ShardCtx::cert_epoch`): which certificate its handshake used.
    pub cert_epoch: u32,
}

impl Entry {
    pub fn new(id: ConnectionId, cert_epoch: u32) -> Entry {
        Entry { id: [(id.0 >> 64) as u64, id.0 as u64], reach: None, order: None, cert_epoch }
    }

    pub fn id(&self) -> ConnectionId {
        ConnectionId(((self.id[0] as u128) << 64) | self.id[1] as u128)
    }
}

/// The order a tunnel keeps when another comes: a kick stays a kick (the
/// first code), a kick replaces a timed order, and of two timed orders
/// (revocations, paced closes) the earlier stays.
fn merge(old: Option<Order>, new: Order) -> Order {
    match (old, new) {
        (Some(Order::Kick(c)), _) => Order::Kick(c),
        (Some(o), n) => match (o.at(), n.at()) {
            (Some(a), Some(b)) if a <= b => o,
            _ => n,
        },
        (None, n) => n,
    }
}

impl ShardCtx {
    /// Records where an established tunnel is now (at its start, and each
    /// time its stream moves to another link).
    pub(super) fn reach(&self, key: usize, stream: &Rc<RefCell<StreamShared>>, link: &Rc<Link>, resume: &PackedResume) {
        let first = match self.conns.borrow_mut().get_mut(key) {
            Some(e) => {
                let first = e.reach.is_none();
                e.reach = Some(Reach { stream: Rc::downgrade(stream), link: Rc::downgrade(link), resume: resume.clone() });
                first
            }
            None => false,
        };
        if first {
            self.established(key);
        }
    }

    /// A tunnel has just started here: a drain under way gives it its
    /// moment in what is left of the window; else, with
    /// `websocket.max_age_secs`, it draws its age.
    fn established(&self, key: usize) {
        let now = Instant::now();
        let rand = monoio::utils::thread_rng_n(u32::MAX);
        if let Some(d) = self.drain.get() {
            let at = crate::admission::within(now, d.ends.saturating_duration_since(now), rand);
            self.give_order(key, Order::Close { at, code: d.code, why: d.why });
        } else if let Some(age) = self.current().cfg.ws.max_age {
            self.give_order(
                key,
                Order::Close { at: crate::admission::aged_at(now, age, rand), code: crate::ws::frame::close::GOING_AWAY, why: Paced::Age },
            );
        }
    }

    /// After a cancelled drain (or a reload that set an age): every
    /// established tunnel without an order draws its age from now.
    pub(super) fn age_all(&self) -> u64 {
        let Some(age) = self.current().cfg.ws.max_age else { return 0 };
        let now = Instant::now();
        let at = |r| crate::admission::aged_at(now, age, r);
        self.pace_where(crate::ws::frame::close::GOING_AWAY, Paced::Age, at, |e| e.order.is_none())
    }

    /// Whether the registry reaches the tunnel with this key through `stream`.
    pub(super) fn reaches(&self, key: usize, stream: &Rc<RefCell<StreamShared>>) -> bool {
        self.conns.borrow().get(key).and_then(|e| e.reach.as_ref()).is_some_and(|r| std::ptr::eq(r.stream.as_ptr(), Rc::as_ptr(stream)))
    }

    /// The order left for the tunnel with this key, taken if it is due at `now`.
    pub(super) fn due_order(&self, key: usize, now: Instant) -> Option<Order> {
        let mut conns = self.conns.borrow_mut();
        let e = conns.get_mut(key)?;
        if e.order.as_deref()?.at().is_some_and(|at| at > now) {
            return None;
        }
        let o = e.order.take().map(|o| *o);
        self.pending(o.as_ref(), -1);
        o
    }

    /// When a timed order left for the tunnel with this key is due.
    pub(super) fn order_at(&self, key: usize) -> Option<Instant> {
        self.conns.borrow().get(key)?.order.as_deref()?.at()
    }

    /// The connection with this key ended: its entry goes.
    pub(super) fn forget(&self, key: usize) {
        let e = self.conns.borrow_mut().try_remove(key);
        self.pending(e.and_then(|e| e.order).as_deref(), -1);
    }

    /// Keeps the gauges of waiting timed orders: `by` is +1 or -1.
    fn pending(&self, o: Option<&Order>, by: i8) {
        let g = match o {
            Some(Order::Revoke { .. }) => &self.metrics.revocations_pending,
            Some(Order::Close { .. }) => &self.metrics.paced_closes_pending,
            _ => return,
        };
        if by > 0 { crate::metrics::ShardMetrics::inc(g) } else { crate::metrics::ShardMetrics::dec(g) }
    }

    /// Leaves `order` for the connection with this key and wakes it (a
    /// revocation keeps an earlier one already left).
    pub(super) fn give_order(&self, key: usize, order: Order) -> bool {
        let stream = {
            let mut conns = self.conns.borrow_mut();
            let Some(e) = conns.get_mut(key) else { return false };
            let Some(reach) = &e.reach else { return false };
            let before = e.order.as_deref().copied();
            let after = merge(before, order);
            self.pending(before.as_ref(), -1);
            self.pending(Some(&after), 1);
            e.order = Some(Box::new(after));
            reach.stream.upgrade()
        };
        if let Some(s) = stream {
            match order.at() {
                None => s.borrow_mut().wake(),
                Some(at) => self.timers.arm(&s, at),
            }
        }
        true
    }

    /// Takes back the paced closes of these kinds not yet carried out
    /// (a cancelled drain). Returns how many.
    pub(super) fn cancel_paced(&self, whys: &[Paced]) -> u64 {
        let mut n = 0;
        let mut conns = self.conns.borrow_mut();
        for (_, e) in conns.iter_mut() {
            if let Some(Order::Close { why, .. }) = e.order.as_deref()
                && whys.contains(why)
            {
                let o = e.order.take();
                self.pending(o.as_deref(), -1);
                n += 1;
            }
        }
        n
    }

    /// Leaves every established tunnel a paced close with `code` at a
    /// moment drawn by `at` (given a uniform random `u32`). Returns how many.
    pub(super) fn pace_all(&self, code: u16, why: Paced, at: impl Fn(u32) -> Instant) -> u64 {
        self.pace_where(code, why, at, |_| true)
    }

    /// As [`ShardCtx::pace_all`], for the tunnels whose entry passes `which`.
    pub(super) fn pace_where(&self, code: u16, why: Paced, at: impl Fn(u32) -> Instant, which: impl Fn(&Entry) -> bool) -> u64 {
        let keys: Vec<usize> = self.conns.borrow().iter().filter(|(_, e)| e.reach.is_some() && which(e)).map(|(k, _)| k).collect();
        let mut n = 0;
        for k in keys {
            let when = at(monoio::utils::thread_rng_n(u32::MAX));
            n += self.give_order(k, Order::Close { at: when, code, why }) as u64;
        }
        n
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
                id: e.id().to_string(),
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
    ctx.conns.borrow().iter().find(|(_, e)| e.id() == id).map(|(k, _)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_stays_small() {
        // Every connection has one; the slab adds its own tag. 64 B, plus
        // the certificate epoch (padded to 8) that `--migrate-over` needs.
        assert!(std::mem::size_of::<Entry>() <= 72, "Entry is {} B", std::mem::size_of::<Entry>());
        let id = ConnectionId(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        assert_eq!(Entry::new(id, 1).id(), id);
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
        let drain = |at| Order::Close { at, code: 1001, why: Paced::Drain };
        assert_eq!(merge(Some(drain(late)), revoke(early)), revoke(early), "the earlier timed order stays");
        assert_eq!(merge(Some(revoke(early)), drain(late)), revoke(early));
        assert_eq!(merge(Some(drain(late)), Order::Kick(1000)), Order::Kick(1000));
        let age = Order::Close { at: late + Duration::from_secs(3600), code: 1001, why: Paced::Age };
        assert_eq!(merge(Some(age), drain(late)), drain(late), "a drain comes before a far-off age");
    }
}
