//! Maglev consistent hashing (Eisenbud et al., NSDI 2016).
//!
//! Each node fills a prime-sized lookup table following its own permutation;
//! removing a node only remaps the slots it owned (plus a few others), so most
//! keys stay on their endpoint when the endpoint set changes.

use crate::util::hash64;

/// Table size: a prime well above 100 x the expected endpoint count.
const SIZE: usize = 65_537;

pub struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    /// `nodes`: stable names (addresses) and weights, in endpoint index order.
    pub fn new(nodes: &[(String, u32)]) -> Self {
        if nodes.is_empty() {
            return Maglev { table: Vec::new() };
        }
        let m = SIZE as u64;
        let perms: Vec<(u64, u64)> = nodes
            .iter()
            .map(|(name, _)| {
                let offset = hash64(name.as_bytes()) % m;
                let skip = hash64(format!("skip:{name}").as_bytes()) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; nodes.len()];
        let mut table = vec![u32::MAX; SIZE];
        let mut filled = 0;
        'fill: loop {
            for (i, (_, weight)) in nodes.iter().enumerate() {
                // A heavier node takes proportionally more turns per round.
                for _ in 0..(*weight).max(1) {
                    let (offset, skip) = perms[i];
                    let mut slot = ((offset + next[i] * skip) % m) as usize;
                    while table[slot] != u32::MAX {
                        next[i] += 1;
                        slot = ((offset + next[i] * skip) % m) as usize;
                    }
                    table[slot] = i as u32;
                    next[i] += 1;
                    filled += 1;
                    if filled == SIZE {
                        break 'fill;
                    }
                }
            }
        }
        Maglev { table }
    }

    /// The node for `key`, or the next slot's node that `usable` accepts.
    pub fn lookup(&self, key: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let start = (key % SIZE as u64) as usize;
        (0..SIZE).map(|k| self.table[(start + k) % SIZE] as usize).find(|&i| usable(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::mix64;

    fn nodes(n: usize) -> Vec<(String, u32)> {
        (0..n).map(|i| (format!("10.0.0.{i}:80"), 1)).collect()
    }

    #[test]
    fn spreads_evenly() {
        let m = Maglev::new(&nodes(5));
        let mut counts = [0usize; 5];
        for t in &m.table {
            counts[*t as usize] += 1;
        }
        for c in counts {
            assert!((12_000..14_300).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn removing_a_node_moves_few_keys() {
        let all = nodes(5);
        let before = Maglev::new(&all);
        let after = Maglev::new(&all[..4]);
        let keys = 20_000u64;
        let moved = (0..keys)
            .filter(|k| {
                let key = mix64(*k);
                let a = before.lookup(key, |_| true).unwrap();
                let b = after.lookup(key, |_| true).unwrap();
                a != 4 && a != b
            })
            .count();
        // Keys on surviving nodes should almost all stay put.
        assert!(moved < keys as usize / 50, "{moved} of {keys} keys moved");
    }
}
