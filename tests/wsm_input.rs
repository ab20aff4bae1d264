//! What a WSM sends cannot hurt a device or holdfast: a subprotocol the
//! device did not offer (or one that would inject a header) never reaches
//! the 101.
#![allow(clippy::disallowed_methods)] // tests read the clock

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use holdfast::device::{Device, DeviceError};
use holdfast::wsm::{App, Decision, Replies, Server, StreamInfo};

/// Accepts every stream with the subprotocol named by the request path.
struct Chooses;

impl App for Chooses {
    fn open(&self, info: &StreamInfo) -> Decision {
        let choice = match info.open.request.path.as_str() {
            "/inject" => Some("v1\r\nSet-Cookie: stolen=1".to_string()),
            "/unoffered" => Some("v9".to_string()),
            "/offered" => Some("v2".to_string()),
            _ => None,
        };
        Decision::Accept { subprotocol: choice }
    }
    fn message(&self, _: &StreamInfo, _binary: bool, data: &[u8], out: &mut Replies) {
        out.text(String::from_utf8_lossy(data).into_owned());
    }
}

fn wsm() -> SocketAddr {
    let server = Server::bind("127.0.0.1:0".parse().unwrap(), Arc::new(Chooses), "chooser".into()).unwrap();
    let addr = server.local_addr().unwrap();
    std::thread::spawn(move || server.serve());
    addr
}

#[test]
fn a_subprotocol_the_device_did_not_offer_never_reaches_it() {
    let pki = Pki::new();
    let proxy = start_proxy(&pki, &[wsm()], 1, "", "");
    let device = |path: &str| {
        let mut o = opts(&pki, &proxy, "oven-1");
        o.path = path.into();
        o.subprotocols = vec!["v1".into(), "v2".into()];
        Device::connect(&o)
    };
    let mut ok = device("/offered").unwrap();
    assert_eq!(ok.subprotocol.as_deref(), Some("v2"));
    ok.send_text("hi").unwrap();
    assert_eq!(ok.recv_text().unwrap(), "hi");
    for path in ["/inject", "/unoffered"] {
        match device(path) {
            Err(DeviceError::Http(502)) => {}
            Err(e) => panic!("{path}: {e}"),
            Ok(d) => panic!("{path}: upgraded with {:?}", d.subprotocol),
        }
    }
    assert_eq!(metric(&proxy, "holdfast_wsm_bad_accepts_total", ""), 2);
    // The link is fine, and so is the next device.
    assert_eq!(metric(&proxy, "holdfast_link_connects_total", ""), 1);
    let mut next = device("/").unwrap();
    assert_eq!(next.subprotocol, None);
    next.send_text("still").unwrap();
    assert_eq!(next.recv_text().unwrap(), "still");
}
