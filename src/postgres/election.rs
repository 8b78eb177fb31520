//! One leader among the processes on a database: whoever holds a session advisory lock. The leader keeps
//! the connection that holds it; if the process dies or its connection breaks, PostgreSQL ends the session,
//! frees the lock, and another process takes it at its next try.

use std::sync::Mutex;

use super::{Conn, Pool};

/// A leadership that processes on one database compete for.
pub struct Election {
    pool: Pool,
    key: i64,
    /// The connection that holds the lock while this process leads.
    held: Mutex<Option<Conn>>,
}

impl Election {
    /// Competes for the advisory lock `key` on the database behind `pool`.
    pub fn new(pool: Pool, key: i64) -> Self {
        Self {
            pool,
            key,
            held: Mutex::new(None),
        }
    }

    /// Whether this process leads now: it still holds the lock on a live connection, or has just taken it.
    /// Never waits for a connection: with none free, a follower stays one.
    pub fn lead(&self) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(conn) = held.as_mut() {
            if conn.is_valid(std::time::Duration::from_secs(2)).is_ok() {
                return true;
            }
            // The session is gone, and the lock with it, or too slow to trust: this process stops leading.
            // A slow but live session must not go back to the pool still holding the lock.
            let _ = conn.execute("SELECT pg_advisory_unlock($1)", &[&self.key]);
            *held = None;
        }
        let Some(mut conn) = self.pool.try_get() else {
            return false;
        };
        let taken = conn
            .query_one("SELECT pg_try_advisory_lock($1)", &[&self.key])
            .is_ok_and(|row| row.get::<_, bool>(0));
        if taken {
            *held = Some(conn);
        }
        taken
    }
}

impl Drop for Election {
    fn drop(&mut self) {
        let held = self.held.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(mut conn) = held.take() {
            // The connection goes back to the pool, and its session must not keep leading from there.
            let _ = conn.execute("SELECT pg_advisory_unlock($1)", &[&self.key]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_process_leads_and_another_takes_over_when_it_goes() {
        let Some(config) = crate::postgres::testing::scratch() else {
            return;
        };
        let (a, b) = (
            Election::new(crate::postgres::connect(&config).unwrap(), 7),
            Election::new(crate::postgres::connect(&config).unwrap(), 7),
        );
        assert!(a.lead());
        assert!(a.lead(), "and goes on leading");
        assert!(!b.lead(), "one leader at a time");
        assert!(
            Election::new(crate::postgres::connect(&config).unwrap(), 8).lead(),
            "another key, another election"
        );
        drop(a);
        assert!(b.lead(), "the lock is free once its holder is gone");
    }
}
