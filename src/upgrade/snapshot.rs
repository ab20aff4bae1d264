//! The state of one established connection, as it travels to a new process.
//!
//! Owns: [`ConnSnapshot`], plain serializable data taken at a safe point
//! (between bursts): the record layer (traffic secrets, sequence numbers),
//! ciphertext received but not yet a whole record, the frame decoder
//! (partial frame and message), what a resumed OPEN needs, and timers as
//! ages. It holds secrets: it is only ever sent over the private upgrade
//! channel, never logged, and the buffers it was encoded into are zeroed.
#![forbid(unsafe_code)]
#![deny(clippy::disallowed_methods)]

use serde::{Deserialize, Serialize};

use crate::identity::ConnectionId;
use crate::tls::record::RecordState;
use crate::ws::frame::Decoder;
use crate::ws::upgrade::UpgradeRequest;

/// What the new process needs to re-open the device's stream on a WSM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// Device certificate chain as presented (leaf first), DER.
    pub chain: Vec<Vec<u8>>,
    pub request: UpgradeRequest,
    pub subprotocol: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnSnapshot {
    pub id: ConnectionId,
    pub addr: String,
    pub record: RecordState,
    /// Present when a frame or message was partly received.
    pub decoder: Option<Decoder>,
    pub max_message: u32,
    /// Ciphertext received from the device but not yet a whole record.
    pub rx: Vec<u8>,
    pub resume: Resume,
    /// Milliseconds since the device last sent anything.
    pub idle_ms: u64,
    /// Device messages held while the stream had no WSM, oldest first: the
    /// new process sends them before anything else.
    pub held: Vec<(bool, Vec<u8>)>,
}

impl Drop for ConnSnapshot {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.rx.zeroize();
        self.record.handshake_buf.zeroize();
    }
}
