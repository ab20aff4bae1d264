//! Descriptor passing over the live upgrade's private channel (SCM_RIGHTS).
//!
//! Owns: framing one message as a 6-byte header (u32 payload length, u16
//! descriptor count, big-endian) followed by the payload, with up to
//! [`MAX_FDS`] descriptors attached to the header as SCM_RIGHTS ancillary
//! data; and checking on receipt that exactly the announced descriptors
//! arrived. Received descriptors are `OwnedFd` with close-on-exec, so an
//! error or a dropped message can never leak one. Never interprets the
//! payload (that is the handoff protocol's job) and never logs it: it
//! carries traffic secrets.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// The kernel's limit on descriptors in one SCM_RIGHTS message.
pub const MAX_FDS: usize = 253;
const HEADER: usize = 6;

#[derive(Debug, thiserror::Error)]
pub enum FdPassError {
    #[error("{0} descriptors in one message (at most {MAX_FDS})")]
    TooManyFds(usize),
    #[error("payload of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("announced {announced} descriptors, received {received}")]
    FdCount { announced: usize, received: usize },
    #[error("ancillary data was truncated (descriptors lost)")]
    Truncated,
    #[error("channel closed")]
    Closed,
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("socket: {0}")]
    Sys(#[from] nix::Error),
}

/// Sends one message with its descriptors (the caller keeps its copies of
/// the descriptors; the receiver gets duplicates).
pub fn send(sock: &UnixStream, payload: &[u8], fds: &[RawFd]) -> Result<(), FdPassError> {
    if fds.len() > MAX_FDS {
        return Err(FdPassError::TooManyFds(fds.len()));
    }
    if payload.len() > u32::MAX as usize {
        return Err(FdPassError::TooLarge(payload.len()));
    }
    let mut header = [0u8; HEADER];
    header[..4].copy_from_slice(&(payload.len() as u32).to_be_bytes());
    header[4..].copy_from_slice(&(fds.len() as u16).to_be_bytes());
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    // The descriptors ride on the header's first byte; keep sending the
    // header until all of it is out, then the payload as plain bytes.
    let mut sent = loop {
        match sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(&header), IoSlice::new(payload)], cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => break n,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut w = sock;
    if sent < HEADER {
        w.write_all(&header[sent..])?;
        sent = HEADER;
    }
    w.write_all(&payload[sent - HEADER..])?;
    Ok(())
}

/// Receives one message: its payload and exactly the descriptors it announced.
pub fn recv(sock: &UnixStream, max_payload: usize) -> Result<(Vec<u8>, Vec<OwnedFd>), FdPassError> {
    let mut payload = Vec::new();
    let fds = recv_into(sock, max_payload, &mut payload)?;
    Ok((payload, fds))
}

/// [`recv`] into a buffer the caller reuses (its contents are replaced), so
/// a stream of large messages does not map fresh memory for each one.
pub fn recv_into(sock: &UnixStream, max_payload: usize, payload: &mut Vec<u8>) -> Result<Vec<OwnedFd>, FdPassError> {
    let mut header = [0u8; HEADER];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (got, fds, truncated) = loop {
        let mut iov = [IoSliceMut::new(&mut header)];
        match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: the kernel just installed these descriptors
                        // in this process for us; nothing else owns them.
                        fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                    }
                }
                break (msg.bytes, fds, msg.flags.contains(MsgFlags::MSG_CTRUNC));
            }
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if got == 0 {
        return Err(FdPassError::Closed);
    }
    if truncated {
        return Err(FdPassError::Truncated);
    }
    let mut r = sock;
    if got < HEADER {
        r.read_exact(&mut header[got..]).map_err(|_| FdPassError::Closed)?;
    }
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let announced = u16::from_be_bytes([header[4], header[5]]) as usize;
    if fds.len() != announced {
        return Err(FdPassError::FdCount { announced, received: fds.len() });
    }
    if len > max_payload {
        return Err(FdPassError::TooLarge(len));
    }
    payload.clear();
    payload.resize(len, 0);
    r.read_exact(payload).map_err(|_| FdPassError::Closed)?;
    Ok(fds)
}

/// Whether the peer of a unix socket runs as this process's user
/// (SO_PEERCRED), for a control socket found by path rather than inherited.
pub fn peer_is_same_user(sock: &UnixStream) -> Result<bool, FdPassError> {
    let cred = nix::sys::socket::getsockopt(sock, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(cred.uid() == nix::unistd::getuid().as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// A connected TCP pair on loopback.
    fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    #[test]
    fn passed_sockets_work_on_the_other_side() {
        let (tx, rx) = UnixStream::pair().unwrap();
        let pairs: Vec<_> = (0..3).map(|_| tcp_pair()).collect();
        let fds: Vec<RawFd> = pairs.iter().map(|(_, server)| server.as_raw_fd()).collect();
        send(&tx, b"three connections", &fds).unwrap();
        let (payload, got) = recv(&rx, 1 << 20).unwrap();
        assert_eq!(payload, b"three connections");
        assert_eq!(got.len(), 3);
        for ((client, _), fd) in pairs.iter().zip(got) {
            // Write through the received descriptor; the device end sees it.
            let mut s = TcpStream::from(fd);
            s.write_all(b"moved").unwrap();
            let mut buf = [0u8; 5];
            (&*client).read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"moved");
        }
    }

    #[test]
    fn a_full_batch_and_a_big_payload_keep_message_boundaries() {
        let (tx, rx) = UnixStream::pair().unwrap();
        let pairs: Vec<_> = (0..MAX_FDS).map(|_| tcp_pair()).collect();
        let fds: Vec<RawFd> = pairs.iter().map(|(_, s)| s.as_raw_fd()).collect();
        let big = vec![0x5au8; 1 << 20];
        let t = std::thread::spawn(move || {
            send(&tx, &big, &fds).unwrap();
            send(&tx, b"second", &[]).unwrap();
            drop(pairs);
        });
        let (p1, f1) = recv(&rx, 2 << 20).unwrap();
        assert_eq!((p1.len(), f1.len()), (1 << 20, MAX_FDS));
        assert!(p1.iter().all(|&b| b == 0x5a));
        let (p2, f2) = recv(&rx, 1024).unwrap();
        assert_eq!((p2.as_slice(), f2.len()), (&b"second"[..], 0));
        t.join().unwrap();
        assert!(matches!(recv(&rx, 1024), Err(FdPassError::Closed)));
    }

    #[test]
    fn limits_are_enforced_on_both_sides() {
        let (tx, rx) = UnixStream::pair().unwrap();
        let fds = vec![tx.as_raw_fd(); MAX_FDS + 1];
        assert!(matches!(send(&tx, b"", &fds), Err(FdPassError::TooManyFds(254))));
        send(&tx, &[1u8; 100], &[]).unwrap();
        assert!(matches!(recv(&rx, 10), Err(FdPassError::TooLarge(100))));
    }

    #[test]
    fn announced_count_must_match() {
        let (tx, rx) = UnixStream::pair().unwrap();
        // A header announcing 2 descriptors, sent with 1: refused, and the one
        // that did arrive is closed with the error.
        let (_c, s) = tcp_pair();
        let header = [0, 0, 0, 0, 0, 2];
        let fds = [s.as_raw_fd()];
        sendmsg::<()>(tx.as_raw_fd(), &[IoSlice::new(&header)], &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None).unwrap();
        assert!(matches!(recv(&rx, 10), Err(FdPassError::FdCount { announced: 2, received: 1 })));
    }

    #[test]
    fn socketpair_peer_is_this_user() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(peer_is_same_user(&a).unwrap());
    }
}
