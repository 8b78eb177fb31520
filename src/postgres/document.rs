//! A JSON document that several replicas share, kept as the one row (`id = 1`) of its table with a version
//! that every change increases. A change is read-modify-write under the row's lock (`SELECT … FOR UPDATE`),
//! so replicas changing the document at once apply their changes one after the other, each to the newest
//! document, and none is lost. Each change is announced on [`CHANNEL`] as it commits.

use super::{checkout, describe, Conn, PgError, Pool};

/// The `LISTEN`/`NOTIFY` channel on which every change of a shared document (the registry's index, the
/// rollouts) is announced: one listening connection per replica follows them all.
pub const CHANNEL: &str = "flywheel_registry";

/// A document as stored: its version (0 while nothing was ever stored) and body.
pub type Versioned = (i64, String);

/// The shared document in `table`, a table that a migration created with columns `id`, `version` and
/// `body` and the row `(1, 0, '')`.
#[derive(Clone)]
pub struct Document {
    pool: Pool,
    table: &'static str,
}

fn query(e: postgres::Error) -> PgError {
    PgError::Query(describe(&e))
}

impl Document {
    /// The document in `table` of the database behind `pool`.
    pub fn new(pool: Pool, table: &'static str) -> Self {
        Self { pool, table }
    }

    /// The stored document, or `None` when its version is not above `seen` (pass -1 for any).
    pub fn newer_than(&self, seen: i64) -> Result<Option<Versioned>, PgError> {
        let row = checkout(&self.pool)?
            .query_opt(
                &format!(
                    "SELECT version, body FROM {} WHERE id = 1 AND version > $1",
                    self.table
                ),
                &[&seen],
            )
            .map_err(query)?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// Starts a change: locks the row until [`Change::commit`], or until the change is dropped, which
    /// abandons it.
    pub fn begin(&self) -> Result<Change, PgError> {
        let mut conn = checkout(&self.pool)?;
        conn.batch_execute("BEGIN; SET LOCAL synchronous_commit = on")
            .map_err(query)?;
        let mut change = Change {
            conn,
            table: self.table,
            open: true,
            current: (0, String::new()),
        };
        let row = change
            .conn
            .query_one(
                &format!(
                    "SELECT version, body FROM {} WHERE id = 1 FOR UPDATE",
                    self.table
                ),
                &[],
            )
            .map_err(query)?;
        change.current = (row.get(0), row.get(1));
        Ok(change)
    }
}

/// Stores `body` as the next version of the document in `table` within the caller's transaction on
/// `client`, and returns that version; the change is announced when the transaction commits.
pub fn put(
    client: &mut impl postgres::GenericClient,
    table: &str,
    body: &str,
) -> Result<i64, PgError> {
    let version: i64 = client
        .query_one(
            &format!("UPDATE {table} SET version = version + 1, body = $1 WHERE id = 1 RETURNING version"),
            &[&body],
        )
        .map_err(query)?
        .get(0);
    // The notification is delivered when (and only if) the transaction commits.
    client
        .batch_execute(&format!("NOTIFY {CHANNEL}"))
        .map_err(query)?;
    Ok(version)
}

/// A change in progress, holding the document's row lock.
pub struct Change {
    conn: Conn,
    table: &'static str,
    /// A transaction is open on `conn`; dropping the change rolls it back.
    open: bool,
    current: Versioned,
}

impl Change {
    /// The document as stored when the lock was taken: the newest, since no one can change it now.
    pub fn current(&self) -> &Versioned {
        &self.current
    }

    /// The transaction, for statements that must commit with the document (or not at all).
    pub fn conn(&mut self) -> &mut Conn {
        &mut self.conn
    }

    /// Stores `body` as the next version, announces it and commits; returns that version.
    pub fn commit(mut self, body: &str) -> Result<i64, PgError> {
        let version = put(&mut *self.conn, self.table, body)?;
        self.conn.batch_execute("COMMIT").map_err(query)?;
        self.open = false;
        Ok(version)
    }
}

impl Drop for Change {
    fn drop(&mut self) {
        if self.open {
            // A failed rollback leaves a broken connection, which the pool tests and replaces.
            let _ = self.conn.batch_execute("ROLLBACK");
        }
    }
}
