//! Devices that send part of a TLS record and stop pin no shared buffer: over
//! a thousand of them on one shard (the pool has 64 buffers here) leave every
//! other device reading and writing, and when their shard's budget for such
//! bytes runs out the oldest holders are closed, counted, not everyone
//! stalled.
#![allow(clippy::disallowed_methods)] // tests read the clock

mod common;

use std::time::Duration;

use common::*;
use holdfast::device::Device;

fn exchange(d: &mut Device, tag: &str, n: usize) {
    for i in 0..n {
        let m = format!("{tag}-{i}");
        d.send_text(&m).unwrap();
        assert_eq!(d.recv_text().unwrap(), m, "lost or reordered");
    }
}

/// A device that sends the first `cut` bytes of a record and nothing more.
fn holder(pki: &Pki, proxy: &Proc, cut: usize) -> Device {
    hold(&opts(pki, proxy, "oven-1"), cut)
}

fn hold(o: &holdfast::device::DeviceOptions, cut: usize) -> Device {
    let mut d = Device::connect(o).unwrap();
    let frame = d.masked_frame(holdfast::ws::frame::op::TEXT, &vec![b'x'; 12000]);
    d.send_partial_record(&frame, cut).unwrap();
    d
}

#[test]
fn a_thousand_devices_holding_partial_records_stall_no_one() {
    const HOLDERS: usize = 1100; // per shard, against 64 pool buffers
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    let proxy = start_proxy(&pki, &[wsm.addr], 1, "", "");
    let mut healthy: Vec<Device> = (0..5).map(|_| Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap()).collect();
    let o = opts(&pki, &proxy, "oven-1");
    let holders: Vec<Device> = std::thread::scope(|s| {
        let o = &o;
        let parts: Vec<_> = (0..4).map(|_| s.spawn(move || (0..HOLDERS / 4).map(|_| hold(o, 100)).collect::<Vec<_>>())).collect();
        parts.into_iter().flat_map(|p| p.join().unwrap()).collect()
    });
    assert_eq!(holders.len(), HOLDERS);
    eventually(20, "every partial record parked", || metric(&proxy, "holdfast_partial_bytes", "") >= (HOLDERS * 100) as u64);
    assert_eq!(metric(&proxy, "holdfast_buffers_in_use", ""), 0, "a partial record pins a pool buffer");
    for (i, d) in healthy.iter_mut().enumerate() {
        exchange(d, &format!("healthy-{i}"), 10);
    }
    // New devices get in and talk too.
    let mut fresh = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    exchange(&mut fresh, "fresh", 5);
    assert_eq!(metric(&proxy, "holdfast_partial_record_evictions_total", ""), 0, "within the budget");
    drop(holders);
    eventually(20, "the holders gone and their bytes with them", || metric(&proxy, "holdfast_partial_bytes", "") == 0);
}

#[test]
fn past_the_partial_record_budget_the_oldest_holders_are_closed() {
    let pki = Pki::new();
    let wsm = start_wsm(pki.path(), "wsm-a");
    // The smallest budget: one whole record.
    let extra = Extra { buffers: "partial_bytes_per_shard = 18437", ..Extra::default() };
    let proxy = start_proxy_extra(&pki, &[wsm.addr], 1, &extra, &[]);
    let mut healthy = Device::connect(&opts(&pki, &proxy, "oven-1")).unwrap();
    let mut oldest = holder(&pki, &proxy, 5000);
    eventually(10, "the first parked", || metric(&proxy, "holdfast_partial_bytes", "") == 5000);
    std::thread::sleep(Duration::from_millis(50));
    let others: Vec<Device> = (0..3).map(|_| holder(&pki, &proxy, 5000)).collect();
    // 20,000 > 18,437: the oldest goes, with 1008.
    eventually(10, "one eviction", || metric(&proxy, "holdfast_partial_record_evictions_total", "") == 1);
    assert_eq!(oldest.recv_close().unwrap(), Some(1008));
    eventually(10, "its bytes given back", || metric(&proxy, "holdfast_partial_bytes", "") == 15_000);
    exchange(&mut healthy, "untouched", 5);
    assert_eq!(metric(&proxy, "holdfast_connections_active", ""), 4, "only the oldest went");
    assert_eq!(metric(&proxy, "holdfast_partial_record_evictions_total", ""), 1);
    drop(others);
}
