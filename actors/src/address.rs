//! Which addresses customer-given destinations may reach: webhooks, voice callbacks, `play`
//! URLs and `dial`'s SIP targets. In production, loopback, private, link-local and unspecified
//! addresses are refused unless an operator allowed them (on-premise receivers and PBXs).

use std::net::IpAddr;

use ipnet::IpNet;

/// Which destination addresses customer-given URLs and SIP targets may reach.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    /// Refuse internal addresses (production mode).
    pub refuse_internal: bool,
    /// Internal ranges allowed anyway.
    pub allow: Vec<IpNet>,
}

impl AddressPolicy {
    pub fn permits(&self, ip: IpAddr) -> bool {
        !self.refuse_internal || !is_internal(ip) || self.allow.iter().any(|n| n.contains(&ip))
    }
}

/// Loopback, private, link-local, unspecified, shared (CGNAT), multicast and broadcast.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || o[0] == 0
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00
                || (seg[0] & 0xffc0) == 0xfe80
        }
    }
}
