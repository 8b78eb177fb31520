//! Feedback in PostgreSQL, shared by every replica that points at the same database. `append` commits with
//! `synchronous_commit = on` before it returns, so an acknowledged row survives the server's crash as well
//! as the replica's.
//!
//! Appends to one task are serialised (a transaction-scoped advisory lock per task): the cost is one commit
//! at a time per task, the gain that ids commit in order, as they do in SQLite, so `list`'s cursor is exact.

use postgres::types::ToSql;
use postgres::GenericClient;
use sha2::{Digest, Sha256};

use std::collections::HashMap;

use super::{
    follow_moves, placement, Appended, Feedback, FeedbackError, FeedbackStore, NewFeedback,
    Placement,
};
use crate::postgres::{checkout, describe, Conn, Pool};

fn storage(e: postgres::Error) -> FeedbackError {
    FeedbackError::Storage(describe(&e))
}

/// The key of a text in the unique index (task, text_hash, label).
fn text_hash(text: &str) -> Vec<u8> {
    Sha256::digest(text.as_bytes()).to_vec()
}

/// Stores `rows` as they are, their ids, counts and first-posting times kept, within the caller's
/// transaction: for moving a single process's store into PostgreSQL (`flywheel migrate`), whose
/// generations name the feedback they trained on by id. Call [`continue_ids`] after the last rows.
pub fn import(client: &mut impl GenericClient, rows: &[Feedback]) -> Result<(), FeedbackError> {
    let column = |f: fn(&Feedback) -> Option<String>| rows.iter().map(f).collect::<Vec<_>>();
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let tasks = column(|r| Some(r.task.clone()));
    let texts = column(|r| Some(r.text.clone()));
    let hashes: Vec<Vec<u8>> = rows.iter().map(|r| text_hash(&r.text)).collect();
    let labels = column(|r| Some(r.label.clone()));
    let request_ids = column(|r| r.request_id.clone());
    let adapters = column(|r| r.adapter.clone());
    let arms = column(|r| r.arm.clone());
    let counts: Vec<i64> = rows.iter().map(|r| r.count).collect();
    let created: Vec<i64> = rows.iter().map(|r| r.created_at).collect();
    client
        .execute(
            "INSERT INTO feedback (id, task, text, text_hash, label, request_id, adapter, arm, count, created_at)
             OVERRIDING SYSTEM VALUE
             SELECT * FROM unnest($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::BYTEA[], $5::TEXT[],
                                  $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::BIGINT[], $10::BIGINT[])",
            &[
                &ids,
                &tasks,
                &texts,
                &hashes,
                &labels,
                &request_ids,
                &adapters,
                &arms,
                &counts,
                &created,
            ],
        )
        .map_err(storage)?;
    Ok(())
}

/// Makes the next appended row's id follow the largest stored one, after [`import`] chose ids itself.
pub fn continue_ids(client: &mut impl GenericClient) -> Result<(), FeedbackError> {
    client
        .execute(
            "SELECT setval(pg_get_serial_sequence('feedback', 'id'), MAX(id)) FROM feedback
             HAVING MAX(id) IS NOT NULL",
            &[],
        )
        .map_err(storage)?;
    Ok(())
}

/// A text of a task, as the unique index keys it: (task, text hash).
type TextKey = (String, Vec<u8>);

/// PostgreSQL-backed [`FeedbackStore`].
pub struct PostgresStore {
    pool: Pool,
}

const COLUMNS: &str = "id, task, text, label, request_id, adapter, arm, count, created_at";

impl PostgresStore {
    /// A store over `pool`, whose database [`crate::postgres::connect`] has migrated.
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    fn conn(&self) -> Result<Conn, FeedbackError> {
        checkout(&self.pool).map_err(|e| FeedbackError::Storage(e.to_string()))
    }

    fn select(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Feedback>, FeedbackError> {
        let rows = self.conn()?.query(sql, params).map_err(storage)?;
        Ok(rows
            .iter()
            .map(|row| Feedback {
                id: row.get(0),
                task: row.get(1),
                text: row.get(2),
                label: row.get(3),
                request_id: row.get(4),
                adapter: row.get(5),
                arm: row.get(6),
                count: row.get(7),
                created_at: row.get(8),
            })
            .collect())
    }
}

impl FeedbackStore for PostgresStore {
    fn append(&self, rows: &[NewFeedback]) -> Result<Vec<Appended>, FeedbackError> {
        let now = i64::try_from(crate::clock::unix_seconds()).unwrap_or(i64::MAX);
        let hashes: Vec<Vec<u8>> = rows.iter().map(|r| text_hash(&r.text)).collect();
        // Each task the batch writes to is locked for the transaction, the tasks in one order. Within a task
        // appends then take their ids and commit one at a time, so ids commit in increasing order and a
        // reader paging by `after_id` never passes a row that commits later; and two replicas appending
        // overlapping batches wait for each other instead of deadlocking on the unique index.
        let mut keys: Vec<i64> = rows
            .iter()
            .map(|r| {
                let key = Sha256::new()
                    .chain_update(b"flywheel feedback task\0")
                    .chain_update(r.task.as_bytes())
                    .finalize();
                i64::from_le_bytes(key[..8].try_into().expect("8 bytes"))
            })
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let mut conn = self.conn()?;
        let mut tx = conn.transaction().map_err(storage)?;
        tx.batch_execute("SET LOCAL synchronous_commit = on")
            .map_err(storage)?;
        // unnest yields the sorted keys in order, so the locks are taken in that order.
        tx.execute(
            "SELECT pg_advisory_xact_lock(key) FROM unnest($1::BIGINT[]) AS key",
            &[&keys],
        )
        .map_err(storage)?;
        // The labels stored for every text of the batch, read once: where each row goes depends on them.
        let mut keys: Vec<(&str, &[u8])> = rows
            .iter()
            .zip(&hashes)
            .map(|(r, h)| (r.task.as_str(), h.as_slice()))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let (key_tasks, key_hashes): (Vec<&str>, Vec<&[u8]>) = keys.into_iter().unzip();
        let mut stored: HashMap<TextKey, Vec<(i64, String)>> = HashMap::new();
        let mut moved = HashMap::new();
        for row in tx
            .query(
                "SELECT f.task, f.text_hash, f.id, f.label
                 FROM feedback f JOIN unnest($1::TEXT[], $2::BYTEA[]) AS k(task, hash)
                   ON f.task = k.task AND f.text_hash = k.hash",
                &[&key_tasks, &key_hashes],
            )
            .map_err(storage)?
        {
            stored
                .entry((row.get(0), row.get(1)))
                .or_default()
                .push((row.get(2), row.get(3)));
        }
        let upsert = tx
            .prepare(
                "INSERT INTO feedback (task, text, text_hash, label, request_id, adapter, arm, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (task, text_hash, label) DO UPDATE SET count = feedback.count + 1
                 RETURNING id, xmax = 0",
            )
            .map_err(storage)?;
        // An identity column takes its next value on `SET id = DEFAULT`.
        let relocate = tx
            .prepare(
                "UPDATE feedback SET id = DEFAULT, count = count + 1 WHERE id = $1 RETURNING id",
            )
            .map_err(storage)?;
        let mut out = vec![
            Appended {
                id: 0,
                duplicate: false
            };
            rows.len()
        ];
        for (i, r) in rows.iter().enumerate() {
            let labels = stored
                .entry((r.task.clone(), hashes[i].clone()))
                .or_default();
            if let Placement::Move(id) = placement(labels, &r.label) {
                let to: i64 = tx.query_one(&relocate, &[&id]).map_err(storage)?.get(0);
                labels.retain(|(old, _)| *old != id);
                labels.push((to, r.label.clone()));
                moved.insert(id, to);
                out[i] = Appended {
                    id: to,
                    duplicate: true,
                };
                continue;
            }
            let row = tx
                .query_one(
                    &upsert,
                    &[
                        &r.task,
                        &r.text,
                        &hashes[i],
                        &r.label,
                        &r.request_id,
                        &r.adapter,
                        &r.arm,
                        &now,
                    ],
                )
                .map_err(storage)?;
            // xmax is 0 on a row this statement inserted, and set on one it updated.
            let inserted: bool = row.get(1);
            let id: i64 = row.get(0);
            if inserted {
                labels.push((id, r.label.clone()));
            }
            out[i] = Appended {
                id,
                duplicate: !inserted,
            };
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
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.select(
            &format!(
                "SELECT {COLUMNS} FROM feedback WHERE task = $1 AND id > $2 ORDER BY id LIMIT $3"
            ),
            &[&task, &after_id, &limit],
        )
    }

    fn latest(
        &self,
        task: &str,
        limit: usize,
        max_chars: usize,
    ) -> Result<Vec<Feedback>, FeedbackError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let max_chars = i32::try_from(max_chars).unwrap_or(i32::MAX);
        // left() counts characters. The client holds a whole result at once, so the cut is made here.
        self.select(
            "SELECT * FROM (
               SELECT id, task, left(text, $3), label, request_id, adapter, arm, count, created_at
               FROM feedback WHERE task = $1 ORDER BY id DESC LIMIT $2
             ) newest ORDER BY id",
            &[&task, &limit, &max_chars],
        )
    }

    fn count(&self, task: &str) -> Result<u64, FeedbackError> {
        let n: i64 = self
            .conn()?
            .query_one("SELECT COUNT(*) FROM feedback WHERE task = $1", &[&task])
            .map_err(storage)?
            .get(0);
        Ok(u64::try_from(n).unwrap_or(0))
    }
}
