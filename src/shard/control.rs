//! The control channel into a shard, with a doorbell.
//!
//! Owns: [`Control`], the messages other threads send a shard (shutdown,
//! stop or resume accepting, hand over or adopt connections), and how they
//! get there: a crossbeam channel for the message, plus one byte on a
//! socketpair so the shard's io_uring loop, which sleeps in the kernel, wakes
//! at once instead of polling the channel on a timer. Never acts on a
//! message itself: the shard's loop does.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use super::Handed;

/// Messages from the control thread to a shard.
#[derive(Debug)]
pub enum Control {
    /// Stop accepting and end the shard's event loop.
    Shutdown,
    /// Stop accepting (the listeners now belong to a new process); keep
    /// serving the connections already held.
    StopAccepting,
    /// Accept again on these sockets (the new process went away).
    Accept(Vec<std::net::TcpListener>),
    /// Live upgrade: move every tunnel to the new process, a paced number at
    /// a time, each at its next safe point, sending its snapshot and a
    /// duplicate of its socket here.
    HandOff(Sender<Handed>, std::sync::Arc<super::pace::Flight>),
    /// Live upgrade, new side: adopt these connections.
    Adopt(Vec<Handed>),
    /// The WSM pool is now these addresses (DNS changed).
    WsmSet(Vec<crate::resolve::Wsm>),
    /// Switch to this config generation; answer with the shard's index.
    Reload(Arc<crate::reload::Generation>, Sender<u16>),
    /// `ctl connections`: how many match, and a sample of at most this many.
    Query(Box<super::registry::Filter>, usize, Sender<(u64, Vec<super::registry::Seen>)>),
    /// Drain: stop accepting and close every connection with `code` at a
    /// random moment within `over` (the node keeps the earliest end of
    /// every drain asked for; closes already drawn earlier stay earlier).
    Drain { over: std::time::Duration, code: u16, why: crate::session::end::Paced },
    /// `ctl drain --cancel`: keep the connections not yet closed (answers
    /// with the shard's index; accepting again is `Accept`'s).
    DrainCancel(Sender<u16>),
    /// `ctl kick`: close this connection with this code (answers whether it is here).
    Kick(crate::identity::ConnectionId, u16, Sender<bool>),
}

/// The sending half; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct ControlTx {
    tx: Sender<Control>,
    bell: Arc<UnixStream>,
}

/// The shard's half.
pub struct ControlRx {
    rx: Receiver<Control>,
    bell: UnixStream,
}

pub fn channel() -> std::io::Result<(ControlTx, ControlRx)> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let (ring, hear) = UnixStream::pair()?;
    // Ringing never blocks: a full socket already means "wake up".
    ring.set_nonblocking(true)?;
    hear.set_nonblocking(true)?;
    Ok((ControlTx { tx, bell: Arc::new(ring) }, ControlRx { rx, bell: hear }))
}

impl ControlTx {
    /// Queues `c` and wakes the shard. Fails only if the shard has ended.
    pub fn send(&self, c: Control) -> Result<(), Control> {
        self.tx.send(c).map_err(|e| e.into_inner())?;
        let _ = (&*self.bell).write(&[1]);
        Ok(())
    }
}

impl ControlRx {
    /// Moves the doorbell into the shard's runtime (call on the shard thread).
    pub fn into_waiter(self) -> std::io::Result<ControlWaiter> {
        let fd = self.bell.as_raw_fd();
        Ok(ControlWaiter { rx: self.rx, bell: monoio::net::UnixStream::from_std(self.bell)?, fd })
    }
}

/// The shard thread's end, registered with its io_uring runtime.
pub struct ControlWaiter {
    rx: Receiver<Control>,
    bell: monoio::net::UnixStream,
    fd: std::os::fd::RawFd,
}

impl ControlWaiter {
    /// The next message; `None` once every sender is gone.
    pub async fn recv(&self) -> Option<Control> {
        loop {
            match self.rx.try_recv() {
                Ok(c) => return Some(c),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => {}
            }
            // Clear the rings heard so far, then sleep until the next one.
            // The channel is checked after clearing, so a message sent in
            // between is never missed; the timeout is only a safety net.
            self.drain_bell();
            if !self.rx.is_empty() {
                continue;
            }
            let _ = monoio::time::timeout(Duration::from_secs(1), self.bell.readable(false)).await;
        }
    }

    fn drain_bell(&self) {
        let mut buf = [0u8; 64];
        // SAFETY: `fd` belongs to `self.bell`, open for as long as `self`.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd) };
        while let Ok(n) = nix::unistd::read(fd, &mut buf) {
            if n < buf.len() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_wakes_a_sleeping_shard_at_once() {
        let (tx, rx) = channel().unwrap();
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let t = std::thread::spawn(move || {
            let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().enable_timer().build().unwrap();
            rt.block_on(async move {
                let w = rx.into_waiter().unwrap();
                let mut n = 0;
                while let Some(c) = w.recv().await {
                    assert!(matches!(c, Control::StopAccepting));
                    n += 1;
                    done_tx.send(std::time::Instant::now()).unwrap();
                }
                n
            })
        });
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(50));
            let sent = std::time::Instant::now();
            tx.send(Control::StopAccepting).unwrap();
            let woke = done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
            // Far below the 1 s safety timeout: the bell woke it.
            assert!(woke.duration_since(sent) < Duration::from_millis(500));
        }
        drop(tx);
        assert_eq!(t.join().unwrap(), 3);
    }
}
