//! A WSM in a dozen lines: accepts every device except on the path
//! `/admin`, and answers each text message in upper case. Run: `cargo run -p holdfast-wsm --example uppercase -- 127.0.0.1:9000`.

use std::sync::Arc;

use holdfast_wsm::{App, Decision, Replies, Server, StreamInfo};

struct Upper;

impl App for Upper {
    fn open(&self, info: &StreamInfo) -> Decision {
        // `info.open.device` is the certificate holdfast validated;
        // `info.open.connection_id` stays the same across re-attachments.
        if info.open.request.path == "/admin" {
            Decision::Refuse { status: 403, reason: "not for devices".into() }
        } else {
            Decision::Accept { subprotocol: None }
        }
    }

    fn message(&self, _info: &StreamInfo, binary: bool, data: &[u8], out: &mut Replies) {
        if binary {
            out.binary(data.to_vec());
        } else {
            out.text(String::from_utf8_lossy(data).to_uppercase());
        }
    }
}

fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9000".into());
    let server = Server::bind(addr.parse().expect("address"), Arc::new(Upper), "upper-1".into())?;
    println!("listening on {}", server.local_addr()?);
    // server.drain_handle().start() from another thread sends GOAWAY on every link.
    server.serve()
}
