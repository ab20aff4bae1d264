//! A plain (no TLS) WebSocket echo server: the upstream HAProxy and nginx
//! proxy to, doing the job the reference WSM does behind holdfast. One
//! monoio thread, one task per connection, reusing holdfast's upgrade parser
//! and frame codec.

use std::net::SocketAddr;

use holdfast::ws::frame::{self, Decoder, Event, op};
use holdfast::ws::upgrade;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream};

/// Where each upgrade's time is written (`--open-log`): `<unix ms> new -`.
type OpenLog = Option<std::rc::Rc<std::cell::RefCell<std::fs::File>>>;

async fn serve(mut s: TcpStream, log: OpenLog) {
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut req = Vec::new();
    let rest = loop {
        buf.clear();
        let (r, b) = s.read(buf).await;
        buf = b;
        match r {
            Ok(n) if n > 0 => req.extend_from_slice(&buf[..n]),
            _ => return,
        }
        match upgrade::parse(&req, 16 * 1024, &[]) {
            Ok(Some((r, used))) => {
                if let Some(l) = &log {
                    use std::io::Write;
                    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
                    let _ = writeln!(l.borrow_mut(), "{ms} new -");
                }
                let (w, _) = s.write_all(upgrade::response_101(&r.key, None)).await;
                if w.is_err() {
                    return;
                }
                break req.split_off(used);
            }
            Ok(None) => continue,
            Err(e) => {
                let _ = s.write_all(upgrade::response_error(e.status, e.reason)).await;
                return;
            }
        }
    };
    let mut dec = Decoder::new(64 << 20, true);
    let mut events = Vec::new();
    let mut pending = rest;
    loop {
        if dec.feed(&pending, &mut events).is_err() {
            return;
        }
        let mut out = Vec::new();
        for ev in events.drain(..) {
            match ev {
                Event::Message { text, data } => frame::encode(&mut out, if text { op::TEXT } else { op::BINARY }, &data, None),
                Event::Ping(p) => frame::encode(&mut out, op::PONG, &p, None),
                Event::Pong(_) => {}
                Event::Close { code, .. } => {
                    frame::encode_close(&mut out, code.unwrap_or(1000), "", None);
                    let _ = s.write_all(out).await;
                    return;
                }
            }
        }
        if !out.is_empty() && s.write_all(out).await.0.is_err() {
            return;
        }
        buf.clear();
        let (r, b) = s.read(buf).await;
        buf = b;
        match r {
            Ok(n) if n > 0 => pending = buf[..n].to_vec(),
            _ => return,
        }
    }
}

pub fn run(listen: SocketAddr, open_log: Option<std::path::PathBuf>) -> Result<(), String> {
    let log: OpenLog = match open_log {
        Some(p) => Some(std::rc::Rc::new(std::cell::RefCell::new(std::fs::File::create(&p).map_err(|e| format!("{}: {e}", p.display()))?))),
        None => None,
    };
    let mut rt =
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().with_entries(8192).enable_timer().build().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let l = TcpListener::bind(listen).map_err(|e| format!("echo: bind {listen}: {e}"))?;
        println!("echo listening on {}", l.local_addr().map_err(|e| e.to_string())?);
        loop {
            match l.accept().await {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    monoio::spawn(serve(s, log.clone()));
                }
                Err(e) => {
                    eprintln!("echo: accept: {e}");
                    monoio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    })
}
