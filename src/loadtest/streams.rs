//! The caller's side of held calls' media, for the `hold` scenario and the calls bench: one UDP
//! socket per call receives the engine's RTP, and each packet is checked as a caller's jitter
//! buffer would see it — spacing of the kernel's arrival times (`SO_TIMESTAMPNS`) against the
//! 20 ms ptime, sequence (+1; gaps are losses), timestamp (+160 per packet), one SSRC, payload
//! type 0 (PCMU) and 160-byte payloads.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::socket::MsgFlags;
use sautikit_sip::rtp::RtpHeader;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::trunk::{recv_stamped, stamp_arrivals};

#[derive(Default)]
pub struct StreamStats {
    pub packets: u64,
    pub in_window: u64,
    /// |spacing − 20 ms| in µs of kernel arrival times, for packets inside the measuring window.
    pub deviations: Vec<u32>,
    /// The same from the times this harness's task read each packet.
    pub read_deviations: Vec<u32>,
    pub spacing_sum_us: u64,
    pub lost: u64,
    pub seq_errors: u64,
    pub ts_errors: u64,
    pub ssrc_changes: u64,
    pub pt_errors: u64,
    pub size_errors: u64,
    pub bad: u64,
}

pub fn deviation_us(spacing: Duration) -> u32 {
    let dev = (spacing.as_micros() as i64 - 20_000).unsigned_abs();
    dev.min(u64::from(u32::MAX)) as u32
}

pub async fn rtp_receiver(
    sock: UdpSocket,
    measuring: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) -> StreamStats {
    let mut st = StreamStats::default();
    let mut buf = [0u8; 2048];
    // (read at, kernel stamp, sequence, timestamp, SSRC)
    let mut last: Option<(Instant, Duration, u16, u32, u32)> = None;
    st.deviations.reserve(3100);
    st.read_deviations.reserve(3100);
    // Without the kernel's arrival times every packet counts as malformed.
    let _ = stamp_arrivals(&sock);
    let fd = sock.as_raw_fd();
    loop {
        tokio::select! {
            r = sock.readable() => if r.is_err() { break },
            _ = stop.changed() => break,
        }
        while let Ok((n, stamp)) = sock.try_io(Interest::READABLE, || {
            recv_stamped(fd, &mut buf, MsgFlags::MSG_DONTWAIT)
        }) {
            let now = Instant::now();
            let Some(stamp) = stamp else {
                st.bad += 1;
                continue;
            };
            let Ok((h, payload)) = RtpHeader::parse(&buf[..n]) else {
                st.bad += 1;
                continue;
            };
            st.packets += 1;
            if h.payload_type != 0 {
                st.pt_errors += 1;
            }
            if payload.len() != 160 {
                st.size_errors += 1;
            }
            let window = measuring.load(Ordering::Relaxed);
            if window {
                st.in_window += 1;
            }
            if let Some((t, k, seq, ts, ssrc)) = last {
                let dseq = h.sequence.wrapping_sub(seq);
                if dseq != 1 {
                    st.seq_errors += 1;
                    if dseq > 1 && dseq < 1000 {
                        st.lost += u64::from(dseq - 1);
                    }
                }
                if h.timestamp.wrapping_sub(ts) != 160 * u32::from(dseq) {
                    st.ts_errors += 1;
                }
                if h.ssrc != ssrc {
                    st.ssrc_changes += 1;
                }
                if window && dseq == 1 {
                    let spacing = stamp.saturating_sub(k);
                    st.spacing_sum_us += spacing.as_micros() as u64;
                    st.deviations.push(deviation_us(spacing));
                    st.read_deviations.push(deviation_us(now - t));
                }
            }
            last = Some((now, stamp, h.sequence, h.timestamp, h.ssrc));
        }
    }
    st
}

impl StreamStats {
    /// Adds another stream's figures to these.
    pub fn merge(&mut self, st: StreamStats) {
        self.packets += st.packets;
        self.in_window += st.in_window;
        self.spacing_sum_us += st.spacing_sum_us;
        self.lost += st.lost;
        self.seq_errors += st.seq_errors;
        self.ts_errors += st.ts_errors;
        self.ssrc_changes += st.ssrc_changes;
        self.pt_errors += st.pt_errors;
        self.size_errors += st.size_errors;
        self.bad += st.bad;
        self.deviations.extend(st.deviations);
        self.read_deviations.extend(st.read_deviations);
    }

    /// Header errors of any kind (losses apart).
    pub fn header_errors(&self) -> u64 {
        self.ts_errors + self.ssrc_changes + self.pt_errors + self.size_errors + self.bad
    }
}
