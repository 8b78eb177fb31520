//! The PostgreSQL connection pool and the schema's embedded migrations, for the stores that several replicas
//! share (`[store] backend = "postgres"`).
//!
//! Migrations are numbered and applied in order at start, each once, inside one transaction that holds an
//! advisory lock: replicas starting together neither race on `CREATE TABLE` nor apply a step twice.

pub mod document;
pub mod election;

use std::time::Duration;

use postgres::NoTls;
use r2d2_postgres::PostgresConnectionManager;

use crate::config::StoreConfig;

/// A pool of connections; each store holds a clone.
pub type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

/// A connection taken from a [`Pool`].
pub type Conn = r2d2::PooledConnection<PostgresConnectionManager<NoTls>>;

/// A connection from `pool`, or why none could be had within the pool's timeout.
pub fn checkout(pool: &Pool) -> Result<Conn, PgError> {
    pool.get()
        .map_err(|e| PgError::Connect(format!("no connection free: {e}")))
}

/// Returns when a notification arrives on `channel`, or after `timeout` at the latest. `listener` keeps the
/// connection that `LISTEN`s between calls (taken from `pool` at the first call, replaced when it breaks);
/// while PostgreSQL is unreachable this just sleeps `timeout`, so callers poll.
pub fn wait_for_notification(
    pool: &Pool,
    listener: &std::sync::Mutex<Option<Conn>>,
    channel: &str,
    timeout: Duration,
) {
    use postgres::fallible_iterator::FallibleIterator;
    let mut listener = listener.lock().unwrap_or_else(|e| e.into_inner());
    if listener.is_none() {
        let listening = pool.get().ok().and_then(|mut conn| {
            conn.batch_execute(&format!("LISTEN {channel}"))
                .ok()
                .map(|()| conn)
        });
        match listening {
            Some(conn) => *listener = Some(conn),
            None => {
                drop(listener);
                std::thread::sleep(timeout);
                return;
            }
        }
    }
    let broken = {
        let conn = listener.as_mut().expect("set above");
        let mut notifications = conn.notifications();
        let first = notifications.timeout_iter(timeout).next().map(drop);
        // Several may have come; one wake-up answers them all.
        let rest = notifications.iter().count().map(drop);
        first.and(rest).is_err()
    };
    if broken {
        *listener = None;
    }
}

/// Why PostgreSQL could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// `store.url` is not a PostgreSQL connection URL.
    #[error("store.url is not a valid PostgreSQL URL: {0}")]
    Url(String),
    /// No connection could be made or taken from the pool.
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(String),
    /// A statement failed.
    #[error("PostgreSQL: {0}")]
    Query(String),
}

/// The schema, one step per entry; a step is never edited once released, only followed by another.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE feedback (
             id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             task        TEXT   NOT NULL,
             text        TEXT   NOT NULL,
             text_hash   BYTEA  NOT NULL,
             label       TEXT   NOT NULL,
             request_id  TEXT,
             adapter     TEXT,
             arm         TEXT,
             count       BIGINT NOT NULL DEFAULT 1,
             created_at  BIGINT NOT NULL,
             UNIQUE (task, text_hash, label)
         );
         CREATE INDEX feedback_task_id ON feedback (task, id);",
    ),
    (
        2,
        "CREATE TABLE registry_index (
             id       INTEGER PRIMARY KEY CHECK (id = 1),
             version  BIGINT  NOT NULL,
             body     TEXT    NOT NULL
         );
         INSERT INTO registry_index (id, version, body) VALUES (1, 0, '');",
    ),
    (
        3,
        "CREATE TABLE jobs (
             id          TEXT    PRIMARY KEY,
             seq         BIGINT  GENERATED ALWAYS AS IDENTITY UNIQUE,
             task        TEXT    NOT NULL,
             state       TEXT    NOT NULL,
             record      TEXT    NOT NULL,
             worker      TEXT,
             lease_until BIGINT,
             attempts    INTEGER NOT NULL DEFAULT 0,
             cancel      BOOLEAN NOT NULL DEFAULT false,
             created_at  BIGINT  NOT NULL
         );
         CREATE INDEX jobs_waiting ON jobs (state, seq);
         CREATE INDEX jobs_task ON jobs (task, seq);",
    ),
    (
        4,
        "CREATE TABLE rollout_state (
             id       INTEGER PRIMARY KEY CHECK (id = 1),
             version  BIGINT  NOT NULL,
             body     TEXT    NOT NULL
         );
         INSERT INTO rollout_state (id, version, body) VALUES (1, 0, '');
         CREATE TABLE rollout_evidence (
             rollout     TEXT   NOT NULL,
             replica     TEXT   NOT NULL,
             body        TEXT   NOT NULL,
             updated_at  BIGINT NOT NULL,
             PRIMARY KEY (rollout, replica)
         );",
    ),
];

/// Key of the advisory lock that serialises migrations across replicas ("flywheel" in ASCII).
const MIGRATION_LOCK: i64 = 0x666c_7977_6865_656c;

/// The message of a PostgreSQL error, with the server's own text when it sent one (the driver's `Display`
/// alone says only "db error").
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// Connects to `config.url` and brings the schema up to date.
pub fn connect(config: &StoreConfig) -> Result<Pool, PgError> {
    let mut pg: postgres::Config = config
        .url
        .parse()
        .map_err(|e: postgres::Error| PgError::Url(e.to_string()))?;
    let timeout = Duration::from_millis(config.connect_timeout_ms);
    pg.connect_timeout(timeout);
    pg.application_name("flywheel");
    // A half-open connection (a failover, a partition) is found by keepalives, and no statement waits
    // forever: a heartbeat or an append stuck on one would otherwise stall training or a shutdown.
    pg.keepalives(true);
    pg.keepalives_idle(Duration::from_secs(30));
    // The server's side too: a session whose process vanished (a partition, a lost node) ends within about
    // a minute, and with it the advisory lock of the autopilot's leader, instead of the OS's two hours.
    pg.options(
        "-c statement_timeout=30000 -c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 \
         -c tcp_keepalives_count=3",
    );
    let pool = r2d2::Pool::builder()
        .max_size(config.pool_size)
        .min_idle(Some(1))
        .connection_timeout(timeout)
        // r2d2 logs failed connection attempts through its own handler; they surface as errors here.
        .error_handler(Box::new(r2d2::NopErrorHandler))
        .build(PostgresConnectionManager::new(pg, NoTls))
        .map_err(|e| PgError::Connect(e.to_string()))?;
    let mut conn = pool.get().map_err(|e| PgError::Connect(e.to_string()))?;
    migrate(&mut conn)?;
    Ok(pool)
}

/// Applies the steps of [`MIGRATIONS`] this database has not seen; returns how many it applied.
fn migrate(client: &mut postgres::Client) -> Result<usize, PgError> {
    let query = |e: postgres::Error| PgError::Query(describe(&e));
    let mut tx = client.transaction().map_err(query)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(query)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS flywheel_migrations (
             version    INTEGER PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .map_err(query)?;
    let done: i32 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM flywheel_migrations",
            &[],
        )
        .map_err(query)?
        .get(0);
    if let Some(&(newest, _)) = MIGRATIONS.last() {
        if done > newest {
            return Err(PgError::Query(format!(
                "the database's schema is at version {done}, newer than this build's {newest}: \
                 run the newer build or a fresh database"
            )));
        }
    }
    let mut applied = 0;
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > done) {
        tx.batch_execute(sql).map_err(query)?;
        tx.execute(
            "INSERT INTO flywheel_migrations (version) VALUES ($1)",
            &[version],
        )
        .map_err(query)?;
        applied += 1;
    }
    tx.commit().map_err(query)?;
    if applied > 0 {
        tracing::info!(applied, "PostgreSQL schema migrated");
    }
    Ok(applied)
}

/// For the test suites: a new empty database on the PostgreSQL at `FLYWHEEL_TEST_POSTGRES_URL` (which
/// `scripts/test.sh` starts and sets), as its URL, so each test works in a database of its own. `None`, with
/// a note on stderr, when the variable is unset, unless `FLYWHEEL_TEST_POSTGRES_REQUIRED` is set, when it
/// panics.
pub fn test_database() -> Option<String> {
    let admin = crate::testenv::service(
        "FLYWHEEL_TEST_POSTGRES_URL",
        "FLYWHEEL_TEST_POSTGRES_REQUIRED",
    )?;
    let name = format!("flywheel_test_{}", uuid::Uuid::new_v4().simple());
    let mut client = postgres::Client::connect(&admin, NoTls).expect("the test PostgreSQL");
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .expect("a scratch database");
    let (server, _) = admin.rsplit_once('/').expect("a URL with a database");
    Some(format!("{server}/{name}"))
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// [`test_database`] as a [`StoreConfig`].
    pub fn scratch() -> Option<StoreConfig> {
        Some(StoreConfig {
            backend: crate::config::StoreBackend::Postgres,
            url: test_database()?,
            ..StoreConfig::default()
        })
    }

    #[test]
    fn migrations_apply_once_however_many_replicas_start_together() {
        let Some(config) = scratch() else { return };
        let starts: Vec<_> = (0..4)
            .map(|_| {
                let config = config.clone();
                std::thread::spawn(move || connect(&config).map(drop))
            })
            .collect();
        for start in starts {
            start.join().unwrap().expect("every replica starts");
        }
        let pool = connect(&config).unwrap();
        let mut conn = pool.get().unwrap();
        let versions: Vec<i32> = conn
            .query(
                "SELECT version FROM flywheel_migrations ORDER BY version",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let expected: Vec<i32> = MIGRATIONS.iter().map(|(v, _)| *v).collect();
        assert_eq!(versions, expected);
        assert_eq!(migrate(&mut conn).unwrap(), 0, "nothing left to apply");
    }

    #[test]
    fn a_schema_newer_than_the_build_is_refused() {
        let Some(config) = scratch() else { return };
        let pool = connect(&config).unwrap();
        pool.get()
            .unwrap()
            .execute(
                "INSERT INTO flywheel_migrations (version) VALUES (1000)",
                &[],
            )
            .unwrap();
        let e = connect(&config).unwrap_err().to_string();
        assert!(e.contains("newer than this build"), "{e}");
    }

    #[test]
    fn a_bad_url_or_an_unreachable_server_is_a_clear_error() {
        let bad = StoreConfig {
            url: "not a url".into(),
            ..StoreConfig::default()
        };
        assert!(matches!(connect(&bad), Err(PgError::Url(_))));
        // A port nothing listens on: refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let unreachable = StoreConfig {
            url: format!("postgres://flywheel@127.0.0.1:{port}/flywheel"),
            connect_timeout_ms: 500,
            ..StoreConfig::default()
        };
        assert!(matches!(connect(&unreachable), Err(PgError::Connect(_))));
    }
}
