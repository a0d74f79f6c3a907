//! Failed-login throttling, per (user, source) and per source, by growing delays.
//!
//! Failures never lock a user out for everyone: they are counted per user *and*
//! source, so guessing alice's password from one address slows only that address's
//! attempts at alice, and per source across all users (password spraying). Past
//! the free attempts each further failure doubles the wait (5 s, 10 s, 20 s …,
//! at most the window); a count is forgotten a window after its last failure, and a
//! success clears its (user, source) pair. An IPv6 source counts per /64 (one
//! host's whole prefix); user names are counted only when valid, so the map holds
//! names of at most [`AccountName`]'s length. Both maps have a hard cap.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use berth_oci::AccountName;

/// The first wait past the free attempts.
const FIRST_DELAY: Duration = Duration::from_secs(5);

/// Entries each map holds at most (a flood of distinct sources cannot grow it).
const CAP: usize = 100_000;

/// Failures from one source, across users, before delays start: for every
/// `per_pair` failures a (user, source) pair may make freely.
const SOURCE_FACTOR: u32 = 10;

pub struct Limiter {
    per_pair: u32,
    per_source: u32,
    window: Duration,
    maps: Mutex<Maps>,
}

#[derive(Default)]
struct Maps {
    pairs: HashMap<(AccountName, Source), Count>,
    sources: HashMap<Source, Count>,
}

#[derive(Clone, Copy)]
struct Count {
    failures: u32,
    last: Instant,
}

/// A source address as throttling counts it: IPv4 as is, IPv6 by its /64.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    /// From the caller's address as the HTTP layer determined it (unparseable,
    /// e.g. no peer: all such callers share one source).
    pub fn parse(s: &str) -> Source {
        let ip = s.trim().parse::<IpAddr>().unwrap_or(IpAddr::from([0u8; 4]));
        Source(match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            },
            v4 => v4,
        })
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
            v4 => write!(f, "{v4}"),
        }
    }
}

impl Limiter {
    /// `per_pair` free failures per (user, source) within `window`; a source
    /// gets ten times as many across all users.
    pub fn new(per_pair: u32, window: Duration) -> Self {
        let per_pair = per_pair.max(1);
        Limiter { per_pair, per_source: per_pair.saturating_mul(SOURCE_FACTOR), window, maps: Mutex::new(Maps::default()) }
    }

    /// How long this count makes the next attempt wait, if at all.
    fn wait(&self, c: Count, free: u32, now: Instant) -> Option<Duration> {
        let since = now.saturating_duration_since(c.last);
        if since >= self.window || c.failures < free {
            return None;
        }
        let delay = FIRST_DELAY.saturating_mul(1u32 << (c.failures - free).min(20)).min(self.window);
        delay.checked_sub(since).filter(|d| !d.is_zero())
    }

    /// `Err(seconds to wait)` while this source, or this user from this source,
    /// must wait before trying again.
    pub fn check(&self, user: Option<&AccountName>, source: &Source) -> Result<(), u64> {
        let now = Instant::now();
        let m = self.maps.lock().unwrap();
        let pair = user.and_then(|u| m.pairs.get(&(u.clone(), source.clone()))).and_then(|c| self.wait(*c, self.per_pair, now));
        let src = m.sources.get(source).and_then(|c| self.wait(*c, self.per_source, now));
        match pair.max(src) {
            Some(d) => Err(d.as_secs_f64().ceil().max(1.0) as u64),
            None => Ok(()),
        }
    }

    /// Count a failure (against the pair only when the user name is valid).
    pub fn fail(&self, user: Option<&AccountName>, source: &Source) {
        let now = Instant::now();
        let window = self.window;
        let mut m = self.maps.lock().unwrap();
        let bump = |c: &mut Count| {
            if now.saturating_duration_since(c.last) >= window {
                c.failures = 0;
            }
            c.failures = c.failures.saturating_add(1);
            c.last = now;
        };
        if let Some(u) = user {
            let key = (u.clone(), source.clone());
            if let Some(c) = m.pairs.get_mut(&key) {
                bump(c);
            } else if make_room(&mut m.pairs, now, window) {
                m.pairs.insert(key, Count { failures: 1, last: now });
            }
        }
        if let Some(c) = m.sources.get_mut(source) {
            bump(c);
        } else if make_room(&mut m.sources, now, window) {
            m.sources.insert(source.clone(), Count { failures: 1, last: now });
        }
    }

    /// A success clears the (user, source) pair (not the source's count).
    pub fn succeed(&self, user: &AccountName, source: &Source) {
        self.maps.lock().unwrap().pairs.remove(&(user.clone(), source.clone()));
    }

    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        let m = self.maps.lock().unwrap();
        (m.pairs.len(), m.sources.len())
    }
}

/// Room for one more entry: forget expired counts; if the map is still full,
/// drop the oldest count. Only on a failure at the cap (each failure already
/// cost a password hash), so the scan is cheap next to it.
fn make_room<K: Clone + Eq + std::hash::Hash>(map: &mut HashMap<K, Count>, now: Instant, window: Duration) -> bool {
    if map.len() < CAP {
        return true;
    }
    map.retain(|_, c| now.saturating_duration_since(c.last) < window);
    if map.len() >= CAP {
        if let Some(oldest) = map.iter().min_by_key(|(_, c)| c.last).map(|(k, _)| k.clone()) {
            map.remove(&oldest);
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> AccountName {
        s.parse().unwrap()
    }

    #[test]
    fn failures_slow_their_pair_and_source_only() {
        let l = Limiter::new(3, Duration::from_secs(60));
        let (alice, a, b) = (user("alice"), Source::parse("1.2.3.4"), Source::parse("9.9.9.9"));
        for _ in 0..3 {
            assert!(l.check(Some(&alice), &a).is_ok());
            l.fail(Some(&alice), &a);
        }
        assert_eq!(l.check(Some(&alice), &a), Err(5), "the pair waits, from 5 s");
        assert!(l.check(Some(&alice), &b).is_ok(), "alice from elsewhere is not locked out");
        assert!(l.check(Some(&user("bob")), &a).is_ok(), "another user from the same source is not");
        for _ in 0..3 {
            l.fail(Some(&alice), &a);
        }
        assert_eq!(l.check(Some(&alice), &a), Err(40), "each failure doubles the wait");
        l.succeed(&alice, &a);
        assert!(l.check(Some(&alice), &a).is_ok(), "a success clears the pair");
    }

    #[test]
    fn a_spraying_source_waits_for_every_user() {
        let l = Limiter::new(2, Duration::from_secs(60));
        let s = Source::parse("5.6.7.8");
        for i in 0..20 {
            l.fail(Some(&user(&format!("u{i}"))), &s);
        }
        assert!(l.check(Some(&user("admin")), &s).is_err(), "the source reached its own limit");
        assert!(l.check(Some(&user("admin")), &Source::parse("5.6.7.9")).is_ok());
    }

    #[test]
    fn ipv6_counts_per_64_and_invalid_names_only_per_source() {
        assert_eq!(Source::parse("2001:db8:1:2:aaaa::1"), Source::parse("2001:db8:1:2:ffff::9"));
        assert_ne!(Source::parse("2001:db8:1:2::1"), Source::parse("2001:db8:1:3::1"));
        assert_eq!(Source::parse("::ffff:10.0.0.1"), Source::parse("10.0.0.1"));
        assert_eq!(Source::parse("2001:db8:1:2:aaaa::1").to_string(), "2001:db8:1:2::/64");
        let l = Limiter::new(1, Duration::from_secs(60));
        l.fail(None, &Source::parse("2001:db8::1"));
        assert_eq!(l.len(), (0, 1));
    }

    #[test]
    fn counts_expire_and_the_maps_are_capped() {
        let l = Limiter::new(1, Duration::from_millis(1));
        let (a, s) = (user("a"), Source::parse("1.1.1.1"));
        l.fail(Some(&a), &s);
        l.fail(Some(&a), &s);
        std::thread::sleep(Duration::from_millis(5));
        assert!(l.check(Some(&a), &s).is_ok(), "the window passed");
        let l = Limiter::new(1, Duration::from_secs(60));
        for i in 0..(CAP as u32 + 50) {
            l.fail(None, &Source::parse(&std::net::Ipv4Addr::from(i).to_string()));
        }
        assert_eq!(l.len().1, CAP);
    }
}
