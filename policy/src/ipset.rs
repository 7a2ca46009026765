//! IP address sets: unions and differences of ranges, as `ipsets` build them, turned back
//! into the fewest CIDR prefixes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// A set of addresses of both families, as sorted disjoint inclusive ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddrSet {
    v4: Vec<(u128, u128)>,
    v6: Vec<(u128, u128)>,
}

fn union_into(ranges: &mut Vec<(u128, u128)>, lo: u128, hi: u128) {
    ranges.push((lo, hi));
    ranges.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
    for &(a, b) in ranges.iter() {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    *ranges = out;
}

fn subtract_from(ranges: &mut Vec<(u128, u128)>, lo: u128, hi: u128) {
    let mut out = Vec::with_capacity(ranges.len() + 1);
    for &(a, b) in ranges.iter() {
        if b < lo || a > hi {
            out.push((a, b));
            continue;
        }
        if a < lo {
            out.push((a, lo - 1));
        }
        if b > hi {
            out.push((hi + 1, b));
        }
    }
    *ranges = out;
}

/// The fewest prefixes covering exactly `[lo, hi]` in a space of `bits` bits.
fn prefixes(lo: u128, hi: u128, bits: u32) -> Vec<(u128, u8)> {
    let mut out = Vec::new();
    let mut cur = lo;
    loop {
        // The largest aligned block starting at `cur` that stays within `hi`.
        let align = if cur == 0 {
            bits
        } else {
            cur.trailing_zeros().min(bits)
        };
        let mut size = align;
        while size > 0 {
            let span = if size >= 128 {
                u128::MAX
            } else {
                (1u128 << size) - 1
            };
            if cur.checked_add(span).is_some_and(|end| end <= hi) {
                break;
            }
            size -= 1;
        }
        // `size` fits in u8: it is at most 128.
        out.push((cur, (bits - size) as u8));
        let span = if size >= 128 {
            u128::MAX
        } else {
            (1u128 << size) - 1
        };
        match cur.checked_add(span).and_then(|e| e.checked_add(1)) {
            Some(next) if next <= hi => cur = next,
            _ => break,
        }
    }
    out
}

fn bounds(net: &IpNet) -> (bool, u128, u128) {
    match net {
        IpNet::V4(n) => (
            false,
            u128::from(u32::from(n.network())),
            u128::from(u32::from(n.broadcast())),
        ),
        IpNet::V6(n) => (true, u128::from(n.network()), u128::from(n.broadcast())),
    }
}

fn addr_bits(a: IpAddr) -> (bool, u128) {
    match a {
        IpAddr::V4(v) => (false, u128::from(u32::from(v))),
        IpAddr::V6(v) => (true, u128::from(v)),
    }
}

impl AddrSet {
    fn family(&mut self, v6: bool) -> &mut Vec<(u128, u128)> {
        if v6 {
            &mut self.v6
        } else {
            &mut self.v4
        }
    }

    /// Adds a prefix.
    pub fn add_net(&mut self, net: &IpNet) {
        let (v6, lo, hi) = bounds(net);
        union_into(self.family(v6), lo, hi);
    }

    /// Removes a prefix.
    pub fn remove_net(&mut self, net: &IpNet) {
        let (v6, lo, hi) = bounds(net);
        subtract_from(self.family(v6), lo, hi);
    }

    /// Adds an inclusive range (both ends of one family, `from <= to`).
    pub fn add_range(&mut self, from: IpAddr, to: IpAddr) {
        let ((v6, lo), (_, hi)) = (addr_bits(from), addr_bits(to));
        union_into(self.family(v6), lo, hi);
    }

    /// Adds every address of another set.
    pub fn add_set(&mut self, o: &AddrSet) {
        for &(a, b) in &o.v4 {
            union_into(&mut self.v4, a, b);
        }
        for &(a, b) in &o.v6 {
            union_into(&mut self.v6, a, b);
        }
    }

    /// Removes every address of another set.
    pub fn remove_set(&mut self, o: &AddrSet) {
        for &(a, b) in &o.v4 {
            subtract_from(&mut self.v4, a, b);
        }
        for &(a, b) in &o.v6 {
            subtract_from(&mut self.v6, a, b);
        }
    }

    /// Whether the set holds no address.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// The set as the fewest prefixes (IPv4 first, each family in address order).
    pub fn to_prefixes(&self) -> Vec<IpNet> {
        let mut out = Vec::new();
        for &(lo, hi) in &self.v4 {
            for (start, len) in prefixes(lo, hi, 32) {
                // `start` came from a u32 range.
                let a = Ipv4Addr::from(u32::try_from(start).unwrap_or(u32::MAX));
                if let Ok(n) = Ipv4Net::new(a, len) {
                    out.push(IpNet::V4(n));
                }
            }
        }
        for &(lo, hi) in &self.v6 {
            for (start, len) in prefixes(lo, hi, 128) {
                if let Ok(n) = Ipv6Net::new(Ipv6Addr::from(start), len) {
                    out.push(IpNet::V6(n));
                }
            }
        }
        out
    }
}

/// Parses an address range `a-b` (both of one family, `a <= b`).
pub fn parse_range(s: &str) -> Option<Result<(IpAddr, IpAddr), String>> {
    let (a, b) = s.split_once('-')?;
    let (Ok(a), Ok(b)) = (a.trim().parse::<IpAddr>(), b.trim().parse::<IpAddr>()) else {
        return None;
    };
    if a.is_ipv4() != b.is_ipv4() {
        return Some(Err(format!(
            "IP range {s:?}: both ends must be of the same family"
        )));
    }
    if addr_bits(a).1 > addr_bits(b).1 {
        return Some(Err(format!(
            "IP range {s:?}: the first address must not be above the last"
        )));
    }
    Some(Ok((a, b)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn nets(s: &AddrSet) -> Vec<String> {
        s.to_prefixes().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn add_remove_and_decompose() {
        let mut s = AddrSet::default();
        s.add_net(&"10.0.0.0/8".parse().unwrap());
        s.remove_net(&"10.128.0.0/9".parse().unwrap());
        assert_eq!(nets(&s), ["10.0.0.0/9"]);
        s.remove_net(&"10.0.0.0/32".parse().unwrap());
        assert_eq!(nets(&s).len(), 23);
        let (a, b) = parse_range("192.0.2.50-192.0.2.100").unwrap().unwrap();
        let mut r = AddrSet::default();
        r.add_range(a, b);
        assert_eq!(
            nets(&r),
            [
                "192.0.2.50/31",
                "192.0.2.52/30",
                "192.0.2.56/29",
                "192.0.2.64/27",
                "192.0.2.96/30",
                "192.0.2.100/32"
            ]
        );
        let mut all = AddrSet::default();
        all.add_net(&"0.0.0.0/0".parse().unwrap());
        all.add_net(&"::/0".parse().unwrap());
        assert_eq!(nets(&all), ["0.0.0.0/0", "::/0"]);
        all.remove_set(&all.clone());
        assert!(all.is_empty());
    }

    #[test]
    fn ranges() {
        assert!(parse_range("10.0.0.1").is_none());
        assert!(parse_range("10.0.0.9-10.0.0.1").unwrap().is_err());
        assert!(parse_range("10.0.0.1-::1").unwrap().is_err());
        assert!(parse_range("2001:db8::5-2001:db8::9").unwrap().is_ok());
    }
}
