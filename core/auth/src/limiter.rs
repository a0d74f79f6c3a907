//! Failed-login throttling per user and per source address.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Limiter {
    max_failures: u32,
    window: Duration,
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

impl Limiter {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        Limiter { max_failures: max_failures.max(1), window, failures: Mutex::new(HashMap::new()) }
    }

    fn keys(user: &str, source: &str) -> [String; 2] {
        [format!("u:{user}"), format!("s:{source}")]
    }

    /// `Err(seconds to wait)` while either the user or the source is locked out.
    pub fn check(&self, user: &str, source: &str) -> Result<(), u64> {
        let now = Instant::now();
        let mut f = self.failures.lock().unwrap();
        let mut wait = 0;
        for k in Self::keys(user, source) {
            if let Some((n, since)) = f.get(&k).copied() {
                if now.duration_since(since) >= self.window {
                    f.remove(&k);
                } else if n >= self.max_failures {
                    wait = wait.max((self.window - now.duration_since(since)).as_secs().max(1));
                }
            }
        }
        if wait > 0 {
            Err(wait)
        } else {
            Ok(())
        }
    }

    pub fn fail(&self, user: &str, source: &str) {
        let now = Instant::now();
        let mut f = self.failures.lock().unwrap();
        if f.len() > 100_000 {
            let window = self.window;
            f.retain(|_, (_, since)| now.duration_since(*since) < window);
        }
        for k in Self::keys(user, source) {
            let e = f.entry(k).or_insert((0, now));
            if now.duration_since(e.1) >= self.window {
                *e = (0, now);
            }
            e.0 += 1;
        }
    }

    /// A successful login clears the user's count (not the source's).
    pub fn succeed(&self, user: &str) {
        self.failures.lock().unwrap().remove(&format!("u:{user}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_out_user_and_source() {
        let l = Limiter::new(3, Duration::from_secs(60));
        for _ in 0..3 {
            assert!(l.check("alice", "1.2.3.4").is_ok());
            l.fail("alice", "1.2.3.4");
        }
        assert!(l.check("alice", "9.9.9.9").is_err(), "user locked from any source");
        assert!(l.check("bob", "1.2.3.4").is_err(), "source locked for any user");
        assert!(l.check("bob", "9.9.9.9").is_ok());
        let l = Limiter::new(3, Duration::from_millis(1));
        for _ in 0..3 {
            l.fail("a", "s");
        }
        std::thread::sleep(Duration::from_millis(5));
        assert!(l.check("a", "s").is_ok(), "window expires");
    }
}
