//! Sample values for tests (of this crate and of code built on it).
#![forbid(unsafe_code)]

use crate::codec::Open;
use crate::types::{ConnectionId, DeviceIdentity, UpgradeRequest};

/// An OPEN for connection 1 from "oven-1" (`resumed` as asked).
pub fn sample_open(resumed: bool) -> Open {
    Open {
        resumed,
        connection_id: ConnectionId(1),
        device: DeviceIdentity {
            subject: "CN=oven-1".into(),
            issuer: "CN=Fleet CA".into(),
            serial: "2a".into(),
            sans: vec!["DNS:oven-1".into()],
            fingerprint: [0xab; 32],
            chain: vec![vec![0x30, 0x01, 0x00]],
            addr: "127.0.0.1:5000".into(),
        },
        request: UpgradeRequest {
            path: "/ws".into(),
            query: "".into(),
            headers: vec![("user-agent".into(), "oven/1".into())],
            subprotocols: vec!["v1".into()],
            key: String::new(),
        },
        labels: Vec::new(),
    }
}
