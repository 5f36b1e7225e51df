//! Which bindings (or declared VMs) a listing or a watch of the BindingService selects, and how a
//! filtered listing pages. Pure: cache views in, no wire types, no IO.
//!
//! * [`BindingFilter`] — prefix, FE, frozen state and source, combined (all must match).
//! * [`range_after`] — the entries of an IP-ordered map inside a prefix after a page token: a
//!   prefix is read as a key range, never scanned.
//! * [`page`] — one page of a filtered listing, examining at most a budget of entries, so a
//!   listing that matches little never holds the cache's read lock for long; the page token is
//!   the last IP examined, so paging stays exact whatever the filter.
//! * [`FeScope`] — the set of bindings a watch filtered by FE has shown at that FE, so that a
//!   binding leaving the FE gets one last event (the cache's changes carry only the new value).

use std::collections::btree_map::Range;
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::ops::Bound;
use std::sync::Arc;

use ipnet::IpNet;
use victor_store::Revision;

use crate::cache::BindingView;

/// Entries a listing call examines at most (besides those of a prefix range it skips).
pub const SCAN_BUDGET: usize = 65_536;

/// What a listing selects; `None` = no restriction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BindingFilter {
    /// Only VM IPs inside this prefix.
    pub prefix: Option<IpNet>,
    /// Only bindings at this FE.
    pub fe_id: Option<String>,
    /// Only frozen (true) or only unfrozen (false) bindings.
    pub frozen: Option<bool>,
    /// Only bindings with this `BindingSource` number.
    pub source: Option<u8>,
}

impl BindingFilter {
    /// Whether the binding of `ip` is selected.
    pub fn matches(&self, ip: &IpAddr, b: &BindingView) -> bool {
        self.prefix.is_none_or(|p| p.contains(ip))
            && self.fe_id.as_deref().is_none_or(|fe| *b.fe_id == *fe)
            && self.frozen.is_none_or(|f| b.frozen == f)
            && self.source.is_none_or(|s| b.source == s)
    }

    /// The bindings inside the prefix after `after`, in IP order (the other filters still apply).
    pub fn range<'s>(
        &self,
        bindings: &'s BTreeMap<IpAddr, BindingView>,
        after: Option<IpAddr>,
    ) -> Range<'s, IpAddr, BindingView> {
        range_after(bindings, self.prefix, after)
    }
}

/// The entries of `map` inside `prefix` (all without one) with a key greater than `after`.
pub fn range_after<V>(map: &BTreeMap<IpAddr, V>, prefix: Option<IpNet>, after: Option<IpAddr>) -> Range<'_, IpAddr, V> {
    let Some(prefix) = prefix else {
        return match after {
            Some(ip) => map.range((Bound::Excluded(ip), Bound::Unbounded)),
            None => map.range(..),
        };
    };
    let (first, last) = (prefix.network(), prefix.broadcast());
    let low = match after {
        // Past the prefix's end the range is empty: (last, last].
        Some(ip) if ip >= first => Bound::Excluded(ip.min(last)),
        _ => Bound::Included(first),
    };
    map.range((low, Bound::Included(last)))
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The selected entries, in IP order.
    pub items: Vec<T>,
    /// Where the next page starts (the page token), or `None` on the last page.
    pub next: Option<IpAddr>,
}

/// Takes up to `size` entries that `select` keeps from `entries` (IP-ordered), examining at most
/// `budget` of them. The next page starts after the last entry returned when the page is full,
/// after the last entry examined when the budget ran out first (the page may then be short, even
/// empty), and there is none when `entries` ended.
pub fn page<'s, V: 's, T>(
    entries: impl Iterator<Item = (&'s IpAddr, &'s V)>,
    size: usize,
    budget: usize,
    mut select: impl FnMut(&IpAddr, &V) -> Option<T>,
) -> Page<(IpAddr, T)> {
    let mut items = Vec::new();
    let mut last_examined = None;
    for (examined, (ip, v)) in entries.enumerate() {
        if examined == budget.max(size + 1) {
            return Page { items, next: last_examined };
        }
        last_examined = Some(*ip);
        if let Some(t) = select(ip, v) {
            if items.len() == size {
                // One more match exists: the page is full and is not the last.
                return Page { next: items.last().map(|(ip, _)| *ip), items };
            }
            items.push((*ip, t));
        }
    }
    Page { items, next: None }
}

/// The bindings a watch filtered by FE has shown at its FE. The cache's changes carry only a
/// binding's new value, so whether a change takes a binding *away* from the FE is known only
/// from what the watch sent before.
#[derive(Debug)]
pub struct FeScope {
    fe_id: Arc<str>,
    held: HashSet<IpAddr>,
    /// Changes at or before this revision are sent whatever the binding's FE: the watch resumed
    /// after them without knowing what its client held then.
    uncertain_upto: Revision,
}

impl FeScope {
    /// A scope that has shown nothing yet.
    pub fn new(fe_id: &str) -> Self {
        FeScope { fe_id: Arc::from(fe_id), held: HashSet::new(), uncertain_upto: 0 }
    }

    /// The FE.
    pub fn fe_id(&self) -> &str {
        &self.fe_id
    }

    /// Whether a binding is at the scope's FE.
    pub fn is_here(&self, b: &BindingView) -> bool {
        *b.fe_id == *self.fe_id
    }

    /// Starts a watch without snapshot: the client holds (at most) `held`, the bindings at the FE
    /// in the state read at `revision`, and every change up to `revision` is sent.
    pub fn resume(&mut self, held: impl IntoIterator<Item = IpAddr>, revision: Revision) {
        self.held.extend(held);
        self.uncertain_upto = revision;
    }

    /// Records that a snapshot showed the binding of `ip` at the FE.
    pub fn shown(&mut self, ip: IpAddr) {
        self.held.insert(ip);
    }

    /// Whether to send the change of `ip` at `revision` to `view` (`None`: removed): a change
    /// that leaves the binding at the FE, or the first one that takes it away. Updates the set.
    pub fn admit(&mut self, ip: IpAddr, revision: Revision, view: Option<&BindingView>) -> bool {
        if view.is_some_and(|b| self.is_here(b)) {
            self.held.insert(ip);
            return true;
        }
        self.held.remove(&ip) || revision <= self.uncertain_upto
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use victor_proto::Mac;

    fn view(fe: &str, frozen: bool, source: u8) -> BindingView {
        BindingView {
            fe_id: Arc::from(fe),
            mac: Mac([2, 0, 0, 0, 0, 1]),
            frozen,
            source,
            move_seq: 0,
            revision: 1,
            observed_at: 1,
            committed_at: 1,
            observed_revision: 0,
            removed: false,
            extra: None,
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 10, 0, last])
    }

    #[test]
    fn filters_combine() {
        let f = BindingFilter {
            prefix: Some("10.10.0.0/28".parse().unwrap()),
            fe_id: Some("fe2".into()),
            frozen: Some(true),
            source: Some(1),
        };
        assert!(f.matches(&ip(3), &view("fe2", true, 1)));
        assert!(!f.matches(&ip(30), &view("fe2", true, 1)), "outside the prefix");
        assert!(!f.matches(&ip(3), &view("fe3", true, 1)), "another FE");
        assert!(!f.matches(&ip(3), &view("fe2", false, 1)), "not frozen");
        assert!(!f.matches(&ip(3), &view("fe2", true, 2)), "another source");
        assert!(BindingFilter::default().matches(&ip(30), &view("fe9", false, 2)));
    }

    #[test]
    fn prefix_ranges_start_after_the_token_and_end_at_the_prefix() {
        let map: BTreeMap<IpAddr, u8> = (1..=40).map(|i| (ip(i), i)).collect();
        let keys = |r: Range<'_, IpAddr, u8>| r.map(|(_, v)| *v).collect::<Vec<_>>();
        let p = Some("10.10.0.16/29".parse().unwrap());
        assert_eq!(keys(range_after(&map, p, None)), (16..=23).collect::<Vec<_>>());
        assert_eq!(keys(range_after(&map, p, Some(ip(3)))), (16..=23).collect::<Vec<_>>());
        assert_eq!(keys(range_after(&map, p, Some(ip(20)))), vec![21, 22, 23]);
        assert!(keys(range_after(&map, p, Some(ip(23)))).is_empty());
        assert!(keys(range_after(&map, p, Some(ip(200)))).is_empty());
        assert!(keys(range_after(&map, p, Some("2001:db8::1".parse().unwrap()))).is_empty());
        assert_eq!(keys(range_after(&map, None, Some(ip(38)))), vec![39, 40]);
    }

    /// Pages a listing of 1..=n through [`page`] with `select`, returning every page's items.
    fn all_pages(n: u8, size: usize, budget: usize, select: impl Fn(u8) -> bool) -> Vec<Vec<u8>> {
        let map: BTreeMap<IpAddr, u8> = (1..=n).map(|i| (ip(i), i)).collect();
        let mut pages = Vec::new();
        let mut after = None;
        loop {
            let p = page(range_after(&map, None, after), size, budget, |_, v| select(*v).then_some(*v));
            pages.push(p.items.iter().map(|(_, v)| *v).collect());
            match p.next {
                Some(next) => after = Some(next),
                None => return pages,
            }
        }
    }

    #[test]
    fn pages_list_every_match_once_whatever_the_budget() {
        let even = |v: u8| v.is_multiple_of(2);
        let expected: Vec<u8> = (1..=50).filter(|v| even(*v)).collect();
        for (size, budget) in [(5, 1000), (5, 7), (1, 1), (3, 2), (25, 1000), (100, 3)] {
            let pages = all_pages(50, size, budget, even);
            assert_eq!(pages.concat(), expected, "size {size}, budget {budget}: {pages:?}");
            assert!(pages.iter().all(|p| p.len() <= size));
        }
        // A full page followed by nothing more ends the listing without an empty page.
        assert_eq!(all_pages(10, 5, 1000, even), vec![vec![2, 4, 6, 8, 10]]);
        assert_eq!(all_pages(10, 3, 1000, even), vec![vec![2, 4, 6], vec![8, 10]]);
        // A budget smaller than the gap between matches gives short (even empty) pages with a token.
        let sparse = all_pages(40, 10, 10, |v| v == 35);
        assert_eq!(sparse, vec![vec![], vec![], vec![], vec![35]]);
        assert!(all_pages(40, 10, 1000, |_| false) == vec![Vec::<u8>::new()]);
    }

    #[test]
    fn an_fe_scope_sends_what_stays_and_the_first_change_that_leaves() {
        let mut scope = FeScope::new("fe2");
        assert!(scope.admit(ip(1), 10, Some(&view("fe2", false, 1))), "bound at fe2");
        assert!(scope.admit(ip(1), 11, Some(&view("fe2", true, 1))), "changed at fe2");
        assert!(scope.admit(ip(1), 12, Some(&view("fe3", false, 1))), "moved away: sent once");
        assert!(!scope.admit(ip(1), 13, Some(&view("fe3", false, 1))), "then no longer");
        assert!(!scope.admit(ip(1), 14, None), "nor its removal");
        assert!(!scope.admit(ip(2), 15, Some(&view("fe3", false, 1))), "never here");
        assert!(scope.admit(ip(2), 16, Some(&view("fe2", false, 1))), "comes here");
        assert!(scope.admit(ip(2), 17, None), "its removal is sent");
        assert!(!scope.admit(ip(2), 18, None));

        // Resumed at revision 20 holding ip 5: changes up to 20 are all sent, later ones as above.
        let mut scope = FeScope::new("fe2");
        scope.resume([ip(5)], 20);
        assert!(scope.admit(ip(6), 19, Some(&view("fe3", false, 1))), "uncertain: sent");
        assert!(scope.admit(ip(6), 20, None), "uncertain: sent");
        assert!(!scope.admit(ip(6), 21, Some(&view("fe3", false, 1))));
        assert!(scope.admit(ip(5), 22, Some(&view("fe3", false, 1))), "held since the resume");
        scope.shown(ip(7));
        assert!(scope.admit(ip(7), 23, None));
    }
}
