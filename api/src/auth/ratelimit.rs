//! Failed-login rate limiting, per user name, in this node's memory.
//!
//! Why per node and in memory: a guesser spreading attempts over all nodes gets at most
//! `nodes × allowed` tries per window, still a few per minute; replicating failures
//! through Raft would turn every failed login into a log entry and let an attacker load the
//! log. A successful login clears the name's failures.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Names tracked at most; beyond that, names without a recent failure are forgotten first.
const MAX_NAMES: usize = 10_000;

#[derive(Debug)]
pub struct LoginLimiter {
    allowed: u32,
    window: Duration,
    failures: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl LoginLimiter {
    pub fn new(allowed: u32, window: Duration) -> Self {
        LoginLimiter {
            allowed: allowed.max(1),
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn key(name: &str) -> String {
        name.trim().to_lowercase()
    }

    /// `Err(seconds)` while `name` has used up its failures in the window: the caller
    /// answers 429 with that `Retry-After`.
    pub fn check(&self, name: &str) -> Result<(), u64> {
        let now = Instant::now();
        let mut map = match self.failures.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let Some(times) = map.get_mut(&Self::key(name)) else {
            return Ok(());
        };
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            times.pop_front();
        }
        if times.len() < self.allowed as usize {
            return Ok(());
        }
        let oldest = times.front().copied().unwrap_or(now);
        let wait = self.window.saturating_sub(now.duration_since(oldest));
        Err(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
    }

    pub fn record_failure(&self, name: &str) {
        let now = Instant::now();
        let mut map = match self.failures.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if map.len() >= MAX_NAMES {
            let window = self.window;
            map.retain(|_, times| {
                times
                    .back()
                    .is_some_and(|t| now.duration_since(*t) < window)
            });
            if map.len() >= MAX_NAMES {
                // Still full of fresh failures: forget one arbitrary name to stay bounded.
                if let Some(k) = map.keys().next().cloned() {
                    map.remove(&k);
                }
            }
        }
        let times = map.entry(Self::key(name)).or_default();
        times.push_back(now);
        while times.len() > self.allowed as usize {
            times.pop_front();
        }
    }

    pub fn record_success(&self, name: &str) {
        let mut map = match self.failures.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.remove(&Self::key(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_allowed_failures_and_success_clears() {
        let l = LoginLimiter::new(3, Duration::from_secs(60));
        for _ in 0..3 {
            assert!(l.check("Alice").is_ok());
            l.record_failure("alice");
        }
        let wait = l.check("ALICE").expect_err("blocked");
        assert!((1..=60).contains(&wait), "{wait}");
        assert!(l.check("bob").is_ok());
        l.record_success("alice");
        assert!(l.check("alice").is_ok());
    }

    #[test]
    fn failures_age_out() {
        let l = LoginLimiter::new(1, Duration::from_millis(30));
        l.record_failure("a");
        assert!(l.check("a").is_err());
        std::thread::sleep(Duration::from_millis(40));
        assert!(l.check("a").is_ok());
    }
}
