//! Under steady load the transaction layer allocates nothing large: its tables and its timer heap
//! keep their room, so a server's memory does not rise and fall in megabyte bursts as they are
//! rebuilt and regrown. Counted by an allocator of this test binary's own.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use sautikit_sip::message;
use sautikit_sip::transaction::{Peer, Timers, TransactionLayer, Transport, TuEvent};

/// An allocation this large is a table or heap being built or regrown.
const LARGE: usize = 64 * 1024;

thread_local! {
    static LARGE_ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

struct Counting;

fn note(size: usize) {
    if size >= LARGE {
        let _ = LARGE_ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
    }
}

// SAFETY: every call is passed on to the system allocator unchanged; counting touches only a
// thread-local `Cell` that needs no allocation.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn large_allocations() -> u64 {
    LARGE_ALLOCATIONS.with(Cell::get)
}

fn request(call: u32, method: &str, branch: &str, to_tag: &str) -> String {
    format!(
        "{method} sip:254700000001@192.0.2.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 192.0.2.10:5060;branch={branch};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:caller@192.0.2.10:5060>;tag=c{call}\r\n\
To: <sip:254700000001@192.0.2.1:5060>{to_tag}\r\n\
Call-ID: call-{call}@192.0.2.10\r\n\
CSeq: 1 {method}\r\n\
Contact: <sip:caller@192.0.2.10:5060>\r\n\
Content-Length: 0\r\n\r\n"
    )
}

/// Calls answered and acknowledged at a steady 1,000 a second, in simulated time, for two
/// minutes: each ACK moves its transaction's deadline early and leaves a stale timer entry, so
/// the heap's stale entries are dropped every half a minute or so. Past the first 40 s (the
/// first transactions' 32 s linger), not one allocation of 64 KiB or more.
#[test]
fn steady_calls_make_no_large_allocations() {
    let mut layer = TransactionLayer::with_capacity(Timers::default(), 100_000);
    let peer = Peer {
        addr: "192.0.2.10:5060".parse().expect("addr"),
        transport: Transport::Udp,
    };
    let start = Instant::now();
    let mut at_steady = None;
    for call in 0..120_000u32 {
        if call == 40_000 {
            at_steady = Some(large_allocations());
        }
        let now = start + Duration::from_millis(u64::from(call));
        let invite = request(call, "INVITE", &format!("z9hG4bK-i{call}"), "");
        layer.handle_datagram(invite.as_bytes(), peer, now);
        while let Some(event) = layer.poll_event() {
            if let TuEvent::RequestReceived { key, request, .. } = event {
                let ok = message::response_to(&request, 200, None, Some("uas"));
                layer.respond(&key, ok, now).expect("respond");
            }
        }
        let ack = request(call, "ACK", &format!("z9hG4bK-a{call}"), ";tag=uas");
        layer.handle_datagram(ack.as_bytes(), peer, now + Duration::from_millis(5));
        layer.handle_timeout(now + Duration::from_millis(5));
        while layer.poll_transmit().is_some() {}
        while layer.poll_event().is_some() {}
    }
    // The load was steady: about 32,000 transactions lingering at any time.
    assert!((30_000..34_000).contains(&layer.len()), "{}", layer.len());
    let steady = large_allocations() - at_steady.unwrap_or_default();
    assert_eq!(steady, 0, "large allocations under steady load");
}
