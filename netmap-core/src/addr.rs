//! Address helpers: the tailnet's own ranges, formatting as tailcfg prints addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// The tailnet IPv4 space as the hosted service prints it for `*` sources: the CGNAT range
/// minus 100.115.92.0/23, as two ranges.
pub const TAILNET_V4_RANGES: [&str; 2] =
    ["100.64.0.0-100.115.91.255", "100.115.94.0-100.127.255.255"];

/// `autogroup:internet` as the hosted service prints it: public IPv4 (everything but
/// 10/8, 100.64/10, 169.254/16, 172.16/12, 192.168/16) and global unicast IPv6 (2000::/3).
pub const INTERNET_RANGES: [&str; 7] = [
    "0.0.0.0-9.255.255.255",
    "11.0.0.0-100.63.255.255",
    "100.128.0.0-169.253.255.255",
    "169.255.0.0-172.15.255.255",
    "172.32.0.0-192.167.255.255",
    "192.169.0.0-255.255.255.255",
    "2000::-3fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
];

/// The tailnet IPv6 prefix.
pub const TAILNET_V6: &str = "fd7a:115c:a1e0::/48";

/// The CGNAT range that holds tailnet IPv4 addresses.
pub fn cgnat() -> IpNet {
    IpNet::V4(Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), 10).unwrap_or_default())
}

/// The tailnet ULA range.
pub fn tailnet_v6() -> IpNet {
    IpNet::V6(
        Ipv6Net::new(Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0), 48).unwrap_or_default(),
    )
}

/// Whether a prefix is an exit route (`0.0.0.0/0` or `::/0`).
pub fn is_exit_route(n: &IpNet) -> bool {
    n.prefix_len() == 0
}

/// Formats a prefix the way tailcfg prints filter addresses: a single address without a length.
pub fn fmt_net(n: &IpNet) -> String {
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.to_string()
    }
}

/// Formats an address as a full-length prefix (`/32`, `/128`).
pub fn host_prefix(ip: IpAddr) -> String {
    IpNet::from(ip).to_string()
}

/// Whether two prefixes overlap.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

/// Whether a prefix contains an address.
pub fn contains_ip(n: &IpNet, ip: &IpAddr) -> bool {
    n.contains(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting() {
        let n: IpNet = "100.64.0.1/32".parse().unwrap();
        assert_eq!(fmt_net(&n), "100.64.0.1");
        let n: IpNet = "10.0.0.0/8".parse().unwrap();
        assert_eq!(fmt_net(&n), "10.0.0.0/8");
        assert!(cgnat().contains(&"100.100.1.1".parse::<IpAddr>().unwrap()));
        assert!(tailnet_v6().contains(&"fd7a:115c:a1e0::1".parse::<IpAddr>().unwrap()));
    }
}
