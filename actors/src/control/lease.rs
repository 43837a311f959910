//! Lease arithmetic: how many endpoints a control replica should own, and which leases it
//! takes or gives up this tick. Pure: the lease manager feeds it what it sees in the
//! `shoal-leases` bucket.
//!
//! Every replica aims at `ceil(endpoints / live replicas)`. Above that it releases its
//! excess (so a replica that joins gets a share); below it, it takes free leases — endpoints
//! nobody holds, or whose lease was not renewed within the TTL (a dead replica's). Replicas
//! try free endpoints in an order of their own (a hash of replica and endpoint), so they do
//! not all race for the same ones.

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeasePlan {
    pub acquire: Vec<String>,
    pub release: Vec<String>,
}

/// The fair share of one replica.
pub fn share(endpoints: usize, replicas: usize) -> usize {
    endpoints.div_ceil(replicas.max(1))
}

fn order_key(replica: &str, endpoint: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (replica, endpoint).hash(&mut h);
    h.finish()
}

/// `owned`: leases this replica holds; `free`: endpoints without a live lease.
pub fn plan(
    replica: &str,
    owned: &BTreeSet<String>,
    free: &BTreeSet<String>,
    endpoints: usize,
    replicas: usize,
) -> LeasePlan {
    let target = share(endpoints, replicas);
    let mut plan = LeasePlan::default();
    if owned.len() > target {
        let mut mine: Vec<&String> = owned.iter().collect();
        mine.sort_by_key(|e| std::cmp::Reverse(order_key(replica, e)));
        plan.release = mine.into_iter().take(owned.len() - target).cloned().collect();
    } else if owned.len() < target {
        let mut candidates: Vec<&String> = free.iter().filter(|e| !owned.contains(*e)).collect();
        candidates.sort_by_key(|e| order_key(replica, e));
        plan.acquire = candidates.into_iter().take(target - owned.len()).cloned().collect();
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_lone_replica_takes_everything() {
        let p = plan("r1", &set(&[]), &set(&["a", "b", "c"]), 3, 1);
        assert_eq!(p.acquire.len(), 3);
    }

    #[test]
    fn a_replica_above_its_share_releases_the_excess() {
        let p = plan("r1", &set(&["a", "b", "c", "d"]), &set(&[]), 4, 2);
        assert_eq!(p.release.len(), 2);
        assert!(p.acquire.is_empty());
    }

    proptest! {
        /// Replicas taking turns converge to a split where nobody holds more than its share and
        /// every endpoint is owned exactly once.
        #[test]
        fn replicas_converge_to_a_fair_exclusive_split(endpoints in 1usize..60, replicas in 1usize..6, rounds in 3usize..6) {
            let all: BTreeSet<String> = (0..endpoints).map(|i| format!("e{i}")).collect();
            let mut owned: Vec<BTreeSet<String>> = vec![BTreeSet::new(); replicas];
            for _ in 0..rounds {
                for r in 0..replicas {
                    let taken: BTreeSet<String> = owned.iter().flatten().cloned().collect();
                    let free: BTreeSet<String> = all.difference(&taken).cloned().collect();
                    let p = plan(&format!("r{r}"), &owned[r], &free, endpoints, replicas);
                    for e in p.release { owned[r].remove(&e); }
                    for e in p.acquire { owned[r].insert(e); }
                }
            }
            let total: usize = owned.iter().map(|o| o.len()).sum();
            prop_assert_eq!(total, endpoints, "every endpoint owned exactly once");
            for o in &owned {
                prop_assert!(o.len() <= share(endpoints, replicas));
            }
        }
    }
}
