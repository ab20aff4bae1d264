//! The values the link protocol carries about a device connection.
//!
//! Owns: [`ConnectionId`] (made by holdfast at accept, stable across
//! re-attachments and live upgrades), [`DeviceIdentity`] (the validated
//! device certificate as WSMs and operators use it) and [`UpgradeRequest`]
//! (what the WSM sees of the device's HTTP upgrade). Plain data: never
//! parses certificates or HTTP (holdfast does, before it fills these in).
#![forbid(unsafe_code)]

use std::fmt;

use serde::{Deserialize, Serialize};

/// A unique 128-bit connection ID, made at accept. Serialized as its
/// 32-digit hex form in human-readable formats (JSON has no 128-bit
/// integers), as a plain u128 in binary ones.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId(pub u128);

impl Serialize for ConnectionId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() { s.serialize_str(&self.to_string()) } else { s.serialize_u128(self.0) }
    }
}

impl<'de> Deserialize<'de> for ConnectionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if !d.is_human_readable() {
            return u128::deserialize(d).map(ConnectionId);
        }
        let s = String::deserialize(d)?;
        u128::from_str_radix(&s, 16).map(ConnectionId).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnectionId({self})")
    }
}

/// The validated device certificate, reduced to what WSMs and operators use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceIdentity {
    pub subject: String,
    pub issuer: String,
    /// Serial number, lowercase hex without leading zero bytes.
    pub serial: String,
    pub sans: Vec<String>,
    pub fingerprint: [u8; 32],
    /// Certificate chain as presented, leaf first, DER.
    pub chain: Vec<Vec<u8>>,
    pub addr: String,
}

impl DeviceIdentity {
    pub fn fingerprint_hex(&self) -> String {
        hex(&self.fingerprint)
    }
}

/// What the WSM gets to see of the request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UpgradeRequest {
    pub path: String,
    pub query: String,
    /// Selected headers (lowercase names), in request order.
    pub headers: Vec<(String, String)>,
    pub subprotocols: Vec<String>,
    /// Sec-WebSocket-Key, needed for the 101 response.
    pub key: String,
}

/// Lowercase hex of bytes.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_id_is_32_hex_digits_in_json_and_a_u128_in_binary() {
        let id = ConnectionId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"0123456789abcdef0011223344556677\"");
        assert_eq!(serde_json::from_str::<ConnectionId>(&json).unwrap(), id);
        assert_eq!(format!("{id:?}"), "ConnectionId(0123456789abcdef0011223344556677)");
        assert_eq!(hex(&[0, 0xab]), "00ab");
    }
}
