//! The embedded feedback store: SQLite in WAL mode with `synchronous = FULL`, so a committed transaction has
//! been fsynced before `append` returns.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection};
use sha2::{Digest, Sha256};

use super::{
    follow_moves, placement, Appended, Feedback, FeedbackError, FeedbackStore, NewFeedback,
    Placement,
};

fn storage(e: impl std::fmt::Display) -> FeedbackError {
    FeedbackError::Storage(e.to_string())
}

/// SQLite-backed [`FeedbackStore`].
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS feedback (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    task        TEXT    NOT NULL,
    text        TEXT    NOT NULL,
    text_hash   BLOB    NOT NULL,
    label       TEXT    NOT NULL,
    request_id  TEXT,
    adapter     TEXT,
    arm         TEXT,
    count       INTEGER NOT NULL DEFAULT 1,
    created_at  INTEGER NOT NULL,
    UNIQUE (task, text_hash, label)
);
CREATE INDEX IF NOT EXISTS feedback_task_id ON feedback (task, id);
";

impl SqliteStore {
    /// Opens (creating) `path`.
    pub fn open(path: &Path) -> Result<Self, FeedbackError> {
        let conn = Connection::open(path).map_err(storage)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(storage)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(storage)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(storage)?;
        conn.execute_batch(SCHEMA).map_err(storage)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }
}

impl FeedbackStore for SqliteStore {
    fn append(&self, rows: &[NewFeedback]) -> Result<Vec<Appended>, FeedbackError> {
        let now = i64::try_from(crate::clock::unix_seconds()).unwrap_or(i64::MAX);
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| storage("store lock poisoned"))?;
        // Immediate: the write lock is taken at the start, so another process writing the same file makes
        // this wait (busy_timeout) rather than fail when a read inside the transaction turns into a write.
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(storage)?;
        let mut out = Vec::with_capacity(rows.len());
        let mut moved = std::collections::HashMap::new();
        {
            let mut stored = tx
                .prepare_cached("SELECT id, label FROM feedback WHERE task = ?1 AND text_hash = ?2")
                .map_err(storage)?;
            let mut bump = tx
                .prepare_cached("UPDATE feedback SET count = count + 1 WHERE id = ?1")
                .map_err(storage)?;
            let mut take = tx
                .prepare_cached(
                    "DELETE FROM feedback WHERE id = ?1
                     RETURNING request_id, adapter, arm, count, created_at",
                )
                .map_err(storage)?;
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO feedback
                       (task, text, text_hash, label, request_id, adapter, arm, count, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(storage)?;
            for r in rows {
                let hash = Sha256::digest(r.text.as_bytes()).to_vec();
                let labels = stored
                    .query_map(params![r.task, hash], |row| Ok((row.get(0)?, row.get(1)?)))
                    .map_err(storage)?
                    .collect::<Result<Vec<(i64, String)>, _>>()
                    .map_err(storage)?;
                let place = placement(&labels, &r.label);
                let appended = match place {
                    Placement::Count(id) => {
                        bump.execute(params![id]).map_err(storage)?;
                        Appended {
                            id,
                            duplicate: true,
                        }
                    }
                    Placement::Insert | Placement::Move(_) => {
                        let (request_id, adapter, arm, count, created_at) = match place {
                            // AUTOINCREMENT never reuses an id, so the row comes back after every
                            // other, with what it held and one more posting.
                            Placement::Move(id) => take
                                .query_row(params![id], |row| {
                                    Ok((
                                        row.get(0)?,
                                        row.get(1)?,
                                        row.get(2)?,
                                        row.get::<_, i64>(3)? + 1,
                                        row.get(4)?,
                                    ))
                                })
                                .map_err(storage)?,
                            _ => (
                                r.request_id.clone(),
                                r.adapter.clone(),
                                r.arm.clone(),
                                1,
                                now,
                            ),
                        };
                        insert
                            .execute(params![
                                r.task, r.text, hash, r.label, request_id, adapter, arm, count,
                                created_at
                            ])
                            .map_err(storage)?;
                        let id = tx.last_insert_rowid();
                        if let Placement::Move(old) = place {
                            moved.insert(old, id);
                        }
                        Appended {
                            id,
                            duplicate: matches!(place, Placement::Move(_)),
                        }
                    }
                };
                out.push(appended);
            }
        }
        tx.commit().map_err(storage)?;
        follow_moves(&mut out, &moved);
        Ok(out)
    }

    fn list(
        &self,
        task: &str,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<Feedback>, FeedbackError> {
        self.select(
            "SELECT id, task, text, label, request_id, adapter, arm, count, created_at FROM feedback
             WHERE task = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            params![task, after_id, limit as i64],
        )
    }

    fn latest(
        &self,
        task: &str,
        limit: usize,
        max_chars: usize,
    ) -> Result<Vec<Feedback>, FeedbackError> {
        // substr counts characters in a TEXT value.
        self.select(
            "SELECT * FROM (
               SELECT id, task, substr(text, 1, ?3), label, request_id, adapter, arm, count, created_at
               FROM feedback WHERE task = ?1 ORDER BY id DESC LIMIT ?2
             ) ORDER BY id",
            params![
                task,
                i64::try_from(limit).unwrap_or(i64::MAX),
                i64::try_from(max_chars).unwrap_or(i64::MAX)
            ],
        )
    }

    fn count(&self, task: &str) -> Result<u64, FeedbackError> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| storage("store lock poisoned"))?;
        let n: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM feedback WHERE task = ?1",
                params![task],
                |row| row.get(0),
            )
            .map_err(storage)?;
        Ok(n as u64)
    }
}

impl SqliteStore {
    /// Calls `each` with every row of every task in id order, `page` rows at a time, all read in one
    /// transaction, so from one snapshot of the file: for copying the whole store (`flywheel migrate`).
    pub fn export<E: From<FeedbackError>>(
        &self,
        page: usize,
        mut each: impl FnMut(&[Feedback]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| storage("store lock poisoned"))?;
        let tx = conn.transaction().map_err(storage)?;
        let mut after = 0i64;
        loop {
            let rows = {
                let mut stmt = tx
                    .prepare_cached(
                        "SELECT id, task, text, label, request_id, adapter, arm, count, created_at
                         FROM feedback WHERE id > ?1 ORDER BY id LIMIT ?2",
                    )
                    .map_err(storage)?;
                let rows = stmt
                    .query_map(params![after, page as i64], read_row)
                    .map_err(storage)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(storage)?
            };
            let Some(last) = rows.last() else {
                break;
            };
            after = last.id;
            each(&rows)?;
        }
        tx.commit().map_err(storage)?;
        Ok(())
    }

    /// Runs a query selecting `id, task, text, label, request_id, adapter, arm, count, created_at`.
    fn select(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<Feedback>, FeedbackError> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| storage("store lock poisoned"))?;
        let mut stmt = conn.prepare_cached(sql).map_err(storage)?;
        let rows = stmt.query_map(params, read_row).map_err(storage)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(storage)
    }
}

/// A row selected as `id, task, text, label, request_id, adapter, arm, count, created_at`.
fn read_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Feedback> {
    Ok(Feedback {
        id: row.get(0)?,
        task: row.get(1)?,
        text: row.get(2)?,
        label: row.get(3)?,
        request_id: row.get(4)?,
        adapter: row.get(5)?,
        arm: row.get(6)?,
        count: row.get(7)?,
        created_at: row.get(8)?,
    })
}
