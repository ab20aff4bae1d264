//! A development PKI for the quickstart and the tests (rcgen, ECDSA P-256).
//!
//! Owns: making a server CA and a localhost server certificate, two device
//! CAs (one to be configured with `ignore_validity`), a CA holdfast does not
//! trust, device certificates for each case the quickstart demonstrates,
//! and on request a fleet of distinct device certificates for load tests.
//! Writes PEM files; never used by `holdfast run` on its own.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SerialNumber,
};

pub struct Ca {
    pub params: CertificateParams,
    pub key: KeyPair,
    pub pem: String,
}

#[derive(Clone, Copy)]
pub enum Validity {
    Current,
    /// Valid 2019-2021: expired now.
    Expired,
}

fn dn(cn: &str, org: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::OrganizationName, org);
    d.push(DnType::CommonName, cn);
    d
}

fn set_validity(p: &mut CertificateParams, v: Validity) {
    match v {
        Validity::Current => {
            p.not_before = rcgen::date_time_ymd(2024, 1, 1);
            p.not_after = rcgen::date_time_ymd(2099, 1, 1);
        }
        Validity::Expired => {
            p.not_before = rcgen::date_time_ymd(2019, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
    }
}

pub fn make_ca(cn: &str) -> Result<Ca, rcgen::Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = dn(cn, "holdfast dev PKI");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = rcgen::date_time_ymd(2015, 1, 1);
    p.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let key = KeyPair::generate()?;
    let pem = p.self_signed(&key)?.pem();
    Ok(Ca { params: p, key, pem })
}

/// A leaf certificate and its key, both PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

pub fn make_leaf(ca: &Ca, cn: &str, sans: Vec<String>, server: bool, validity: Validity, serial: u64) -> Result<Leaf, rcgen::Error> {
    let mut p = CertificateParams::new(sans)?;
    p.distinguished_name = dn(cn, if server { "holdfast" } else { "Acme Devices" });
    p.is_ca = IsCa::NoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![if server { ExtendedKeyUsagePurpose::ServerAuth } else { ExtendedKeyUsagePurpose::ClientAuth }];
    p.serial_number = Some(SerialNumber::from(serial.to_be_bytes().to_vec()));
    set_validity(&mut p, validity);
    let key = KeyPair::generate()?;
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().to_vec() })
}

/// The files a generated dev PKI consists of.
pub struct DevPki {
    pub dir: PathBuf,
}

impl DevPki {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn device(&self, name: &str) -> (PathBuf, PathBuf) {
        (self.dir.join(format!("devices/{name}.pem")), self.dir.join(format!("devices/{name}.key")))
    }
}

/// Devices the dev PKI makes: name, CA file, validity, whether blocklisted.
pub const DEVICES: [(&str, &str, Validity, bool); 5] = [
    ("oven-1", "fleet-2024", Validity::Current, false),
    ("thermostat-2019", "fleet-2019", Validity::Expired, false),
    ("hood-expired", "fleet-2024", Validity::Expired, false),
    ("fridge-blocked", "fleet-2024", Validity::Current, true),
    ("rogue-1", "rogue", Validity::Current, false),
];

/// Writes the dev PKI into `dir`: `server-ca.pem`, `server-chain.pem`,
/// `server.key`, `fleet-2019.pem`, `fleet-2024.pem`, `rogue.pem` (a CA
/// holdfast is not told about), `blocklist.txt` and `devices/NAME.{pem,key}`.
/// The device CAs the dev PKI made, by file name.
type DeviceCas = [(&'static str, Ca); 3];

fn generate_cas_and_devices(dir: &Path) -> Result<(DevPki, DeviceCas), String> {
    let e = |x: rcgen::Error| x.to_string();
    let io = |x: std::io::Error| x.to_string();
    std::fs::create_dir_all(dir.join("devices")).map_err(io)?;
    let server_ca = make_ca("holdfast dev server CA").map_err(e)?;
    let server = make_leaf(&server_ca, "localhost", vec!["localhost".into(), "127.0.0.1".into()], true, Validity::Current, 1).map_err(e)?;
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).map_err(io);
    write("server-ca.pem", &server_ca.pem)?;
    write("server-chain.pem", &format!("{}{}", server.cert_pem, server_ca.pem))?;
    write("server.key", &server.key_pem)?;
    let cas = [
        ("fleet-2019", make_ca("Fleet 2019 CA").map_err(e)?),
        ("fleet-2024", make_ca("Fleet 2024 CA").map_err(e)?),
        ("rogue", make_ca("Rogue CA").map_err(e)?),
    ];
    for (name, ca) in &cas {
        write(&format!("{name}.pem"), &ca.pem)?;
    }
    let mut blocklist =
        String::from("# Device certificates refused at the handshake.\n# One SHA-256 fingerprint (hex) or serial:<hex> per line.\n");
    for (i, (name, ca_name, validity, blocked)) in DEVICES.iter().enumerate() {
        let ca = &cas.iter().find(|(n, _)| n == ca_name).ok_or("unknown CA")?.1;
        let leaf = make_leaf(ca, name, vec![format!("{name}.devices.local")], false, *validity, 0x1000 + i as u64).map_err(e)?;
        write(&format!("devices/{name}.pem"), &leaf.cert_pem)?;
        write(&format!("devices/{name}.key"), &leaf.key_pem)?;
        if *blocked {
            blocklist.push_str(&format!("{}  # {name}\n", crate::identity::hex(&crate::identity::sha256(&leaf.der))));
        }
    }
    write("blocklist.txt", &blocklist)?;
    let pki = DevPki { dir: dir.to_path_buf() };
    Ok((pki, cas))
}

/// Writes the dev PKI into `dir` (see [`generate_with_fleet`]).
pub fn generate(dir: &Path) -> Result<DevPki, String> {
    generate_with_fleet(dir, 0)
}

/// The dev PKI, and `fleet` distinct device certificates besides, for load
/// tests whose devices should not all present the same certificate:
/// `devices/fleet/NNNNN.{pem,key}` (from 00000), issued in turn by the 2024
/// and the 2019 fleet CA, all currently valid.
pub fn generate_with_fleet(dir: &Path, fleet: usize) -> Result<DevPki, String> {
    let (pki, cas) = generate_cas_and_devices(dir)?;
    if fleet > 0 {
        let e = |x: rcgen::Error| x.to_string();
        let io = |x: std::io::Error| x.to_string();
        std::fs::create_dir_all(dir.join("devices/fleet")).map_err(io)?;
        for i in 0..fleet {
            let ca = &cas[if i % 2 == 0 { 1 } else { 0 }].1;
            let name = format!("device-{i:05}");
            let leaf =
                make_leaf(ca, &name, vec![format!("{name}.devices.local")], false, Validity::Current, 0x10_0000 + i as u64).map_err(e)?;
            std::fs::write(dir.join(format!("devices/fleet/{i:05}.pem")), &leaf.cert_pem).map_err(io)?;
            std::fs::write(dir.join(format!("devices/fleet/{i:05}.key")), &leaf.key_pem).map_err(io)?;
        }
    }
    Ok(pki)
}

/// A commented example config for the dev PKI.
pub fn example_config(listen: &str, wsm: &str, shards: &str, metrics: &str) -> String {
    format!(
        r#"# holdfast example configuration (written by `holdfast quickstart`).
# Every key is documented in README.md. Relative paths are relative to this file.

[listen]
addr = "{listen}"          # where devices connect; every shard binds it with SO_REUSEPORT
shards = {shards}            # "auto" = one per CPU, or a number; cpus = "0-7" pins them

[tls]
cert_chain = "server-chain.pem" # server certificate, then intermediates
key = "server.key"
blocklist = "blocklist.txt"     # SHA-256 fingerprints or serial:<hex>, one a line

# Devices of 2019 carry certificates that have expired and can only be renewed
# over this connection: accept them regardless of dates (signatures still checked).
[[tls.client_ca]]
file = "fleet-2019.pem"
ignore_validity = true

[[tls.client_ca]]
file = "fleet-2024.pem"

[websocket]
max_message_bytes = 1048576
idle_timeout_secs = 600

[upstream]
wsm = ["{wsm}"]
links_per_shard = 1

[metrics]
addr = "{metrics}"

[control]
socket = "control.sock"         # `holdfast ctl --config holdfast.toml status`
"#
    )
}

#[cfg(test)]
mod tests {
    /// A fleet is that many distinct device certificates, issued in turn by
    /// the two fleet CAs, each with its key.
    #[test]
    fn a_fleet_is_distinct_certificates_from_both_fleet_cas() {
        let dir = tempfile::tempdir().unwrap();
        super::generate_with_fleet(dir.path(), 4).unwrap();
        let mut issuers = Vec::new();
        let mut ders = Vec::new();
        for i in 0..4 {
            let pem = std::fs::read(dir.path().join(format!("devices/fleet/{i:05}.pem"))).unwrap();
            assert!(dir.path().join(format!("devices/fleet/{i:05}.key")).exists());
            let der =
                rustls::pki_types::pem::PemObject::from_pem_slice(&pem).map(|c: rustls::pki_types::CertificateDer| c.to_vec()).unwrap();
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            issuers.push(cert.issuer().to_string());
            ders.push(der.clone());
        }
        assert!(issuers[0].contains("Fleet 2024 CA") && issuers[1].contains("Fleet 2019 CA"), "{issuers:?}");
        assert_eq!(issuers[0], issuers[2]);
        ders.sort();
        ders.dedup();
        assert_eq!(ders.len(), 4, "all distinct");
        assert!(!dir.path().join("devices/fleet/00004.pem").exists());
    }
}
