//! The tamper-evident ledger (issue 26) on a real PostgreSQL: every ledger row is a
//! leaf of the Merkle log, checkpoints are signed, and `verify-range` names every
//! edit made behind the log's back (the tamper tests); the sequencer SIGKILLed
//! mid-batch during a 100,000-event ingest through the real ledger-writer and tansu
//! loses no leaf, repeats none, and a second replica takes over.

use std::time::{Duration, Instant};

use caracal_consumers::{
    ledger::{self, LedgerRow},
    runner::RawMessage,
};
use caracal_domain::merkle::{
    keys::{Signer, Verifier},
    proof_file::verify_consistency_notes,
    tree,
};
use caracal_merkle_log::{
    checkpoints, keys, metric, proofs,
    sequencer::{self, Limits, Sequencer},
    verify::{self, FailureKind, Report, Scope},
};
use caracal_proto::v1::ChargeEvent;
use caracal_tests::{
    charges::{
        burst_charge_producer, charged, ledger_totals, numbered_charge, produce_charges,
        wait_for_ledger_rows, ChargeMessage, METERING,
    },
    consumer_process::{random_ms, terminate, ConsumerProcess},
    kafka::{create_topics, Tansu},
    probe::{http_get, metric_value},
    TestDb,
};
use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Text};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use prost::Message as _;

const ORIGIN: &str = "caracal.test/ledger";
const DLQ: &str = "caracal.dlq";

// ------------------------------------------------------------------ fixtures

/// `n` ledger rows as the ledger-writer decodes them from the events.
fn rows(n: u64) -> Vec<LedgerRow> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let root = uuid::Uuid::new_v4();
    (0..n)
        .map(|i| {
            let ev: ChargeEvent = numbered_charge(&run, i, &root, &root);
            ledger::decode(&RawMessage {
                topic: METERING.into(),
                partition: 0,
                offset: i as i64,
                key: None,
                payload: Some(ev.encode_to_vec()),
                headers: vec![],
                timestamp_ms: None,
            })
            .unwrap()
        })
        .collect()
}

struct Log {
    db: TestDb,
    conn: AsyncPgConnection,
    rows: Vec<LedgerRow>,
    verifiers: Vec<Verifier>,
}

/// A fresh database whose ledger holds `n` rows written by the ledger-writer's own
/// statement (rows + queue), sequenced by the real sequencer: a checkpoint every
/// 16 leaves and one at the end of each 50-leaf transaction.
async fn sequenced(n: u64) -> Log {
    let db = TestDb::create("merkle").await.unwrap();
    caracal_service_kit::db::run_migrations(&db.url)
        .await
        .unwrap();
    let mut conn = AsyncPgConnection::establish(&db.url).await.unwrap();
    let rows = rows(n);
    // Statements of 10 rows: a queue entry each, so a 50-leaf transaction takes 5.
    let mut written = 0;
    for chunk in rows.chunks(10) {
        written += ledger::insert_rows(&mut conn, chunk).await.unwrap();
    }
    assert_eq!(written, n as usize);
    let mut seq = small_sequencer(&mut conn).await;
    for _ in 0..100 {
        let out = seq.step(&mut conn).await.unwrap();
        if !out.more && out.leaves == 0 {
            break;
        }
    }
    assert_eq!(sequencer::state(&mut conn).await.unwrap(), (n, n));
    let verifiers = keys::verifiers(&mut conn).await.unwrap();
    Log {
        db,
        conn,
        rows,
        verifiers,
    }
}

/// A sequencer with a registered key of its own: a checkpoint every 16 leaves and
/// one at the end of each transaction of at most 50.
async fn small_sequencer(conn: &mut AsyncPgConnection) -> Sequencer {
    let signer = Signer::generate(ORIGIN).unwrap();
    keys::register(conn, &signer.verifier()).await.unwrap();
    Sequencer::new(
        signer,
        ORIGIN,
        Limits {
            batch_size_limit: 16,
            batch_timeout: chrono::Duration::zero(),
            max_leaves_per_transaction: 50,
        },
    )
}

fn everything() -> Scope {
    Scope::Time {
        start: DateTime::from_timestamp(0, 0).unwrap(),
        end: Utc::now() + chrono::Duration::days(1),
    }
}

fn failures_metric() -> f64 {
    metric_value(
        &caracal_service_kit::metrics::render(),
        metric::VERIFICATION_FAILURES,
        &[],
    )
    .unwrap_or(0.0)
}

/// Runs `sql` as the superuser with every trigger off (what an attacker with the
/// database's superuser can do).
async fn tamper(conn: &mut AsyncPgConnection, sql: &str) {
    diesel::sql_query("SET session_replication_role = replica")
        .execute(conn)
        .await
        .unwrap();
    diesel::sql_query(sql).execute(conn).await.unwrap();
    diesel::sql_query("SET session_replication_role = DEFAULT")
        .execute(conn)
        .await
        .unwrap();
}

/// Verifies everything; asserts it fails, with a failure of `kind` naming
/// `event` (when given) and `checkpoint` (when given), and that the metric rose.
async fn assert_detected(
    log: &mut Log,
    kind: FailureKind,
    event: Option<&str>,
    checkpoint: Option<u64>,
) -> Report {
    caracal_service_kit::metrics::init();
    let before = failures_metric();
    let report = verify::verify(&mut log.conn, everything(), &log.verifiers)
        .await
        .unwrap();
    assert!(!report.ok(), "the edit went unnoticed");
    let named = report.failures.iter().any(|f| {
        f.kind == kind
            && event.is_none_or(|e| f.event_id.as_deref() == Some(e) && f.detail.contains(e))
            && checkpoint.is_none_or(|c| f.checkpoint == Some(c))
    });
    assert!(
        named,
        "no {kind:?} failure naming {event:?} / checkpoint {checkpoint:?}: {:#?}",
        report.failures
    );
    assert!(
        failures_metric() >= before + report.failures.len() as f64,
        "caracal_merkle_verification_failures_total did not rise"
    );
    report
}

async fn untouched(log: &mut Log) {
    let report = verify::verify(&mut log.conn, everything(), &log.verifiers)
        .await
        .unwrap();
    assert!(report.ok(), "{:#?}", report.failures);
    assert_eq!(report.events_checked, log.rows.len() as u64);
    assert_eq!((report.pending, report.unsigned), (0, 0));
}

async fn leaf_of(conn: &mut AsyncPgConnection, event_id: &str) -> u64 {
    #[derive(diesel::QueryableByName)]
    struct L {
        #[diesel(sql_type = BigInt)]
        leaf_index: i64,
    }
    let l: L = diesel::sql_query("SELECT leaf_index FROM merkle_leaves WHERE event_id = $1")
        .bind::<Text, _>(event_id)
        .get_result(conn)
        .await
        .unwrap();
    l.leaf_index as u64
}

// ------------------------------------------------------------------ the log itself

/// The stored tree is the tree of the rows' leaves: its root at each checkpoint is
/// the in-memory root of the leaves rebuilt from the rows, every checkpoint is
/// consistent with the next, and every event has a proof that verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stored_tree_is_the_tree_of_the_rows() {
    let mut log = sequenced(100).await;
    untouched(&mut log).await;
    let exported = proofs::export_leaves(&mut log.conn, 0, 99).await.unwrap();
    assert_eq!(exported.len(), 100);
    let hashes: Vec<tree::Hash> = exported
        .iter()
        .map(|l| tree::leaf_hash(l.leaf.as_ref().unwrap()))
        .collect();
    // Each exported leaf is its row's leaf, as the writer hashed it.
    for (l, h) in exported.iter().zip(&hashes) {
        let row = log.rows.iter().find(|r| r.event_id == l.event_id).unwrap();
        assert_eq!(row.leaf().hash(), *h);
    }
    let cps = checkpoints::list(&mut log.conn, 0, 1000, 1000)
        .await
        .unwrap();
    let sizes: Vec<i64> = cps.iter().map(|c| c.tree_size).collect();
    assert_eq!(sizes, vec![16, 32, 48, 50, 64, 80, 96, 100]);
    for cp in &cps {
        let size = cp.tree_size as usize;
        assert_eq!(
            cp.root,
            tree::root(&hashes[..size]).to_vec(),
            "checkpoint {size}"
        );
    }
    for pair in cps.windows(2) {
        let (older, newer, path) = proofs::prove_consistency(
            &mut log.conn,
            pair[0].tree_size as u64,
            pair[1].tree_size as u64,
        )
        .await
        .unwrap();
        verify_consistency_notes(&older.note, &newer.note, &path, &log.verifiers).unwrap();
    }
    for row in log.rows.iter().step_by(7) {
        let file = proofs::prove_event(&mut log.conn, &row.event_id, None, &log.verifiers)
            .await
            .unwrap();
        let ok = file.verify(&log.verifiers).unwrap();
        assert_eq!(ok.leaf.event_id, row.event_id);
        assert_eq!(ok.leaf.charged_micros, row.charged_micros);
        assert_eq!(ok.checkpoint.size, 100);
    }
    // Redelivered rows queue nothing and change nothing.
    assert_eq!(
        ledger::insert_rows(&mut log.conn, &log.rows).await.unwrap(),
        0
    );
    assert_eq!(
        sequencer::queue_depth(&mut log.conn).await.unwrap(),
        0,
        "a redelivery was queued again"
    );
    // A statement mixing redelivered and new rows queues the new ones only, in
    // their order, as one entry.
    let fresh = rows(4);
    let mixed: Vec<&LedgerRow> = vec![&log.rows[3], &fresh[0], &log.rows[50], &fresh[1], &fresh[2]];
    assert_eq!(ledger::insert_rows(&mut log.conn, &mixed).await.unwrap(), 3);
    #[derive(diesel::QueryableByName)]
    struct Entry {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        leaves: i32,
        #[diesel(sql_type = diesel::sql_types::Array<Text>)]
        event_ids: Vec<String>,
        #[diesel(sql_type = diesel::sql_types::Array<diesel::sql_types::Bytea>)]
        leaf_hashes: Vec<Vec<u8>>,
    }
    let entries: Vec<Entry> =
        diesel::sql_query("SELECT leaves, event_ids, leaf_hashes FROM merkle_queue ORDER BY id")
            .load(&mut log.conn)
            .await
            .unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].leaves, 3);
    assert_eq!(
        entries[0].event_ids,
        [&fresh[0], &fresh[1], &fresh[2]].map(|r| r.event_id.clone())
    );
    assert_eq!(
        entries[0].leaf_hashes,
        [&fresh[0], &fresh[1], &fresh[2]].map(|r| r.leaf().hash().to_vec())
    );
    assert_eq!(sequencer::queue_depth(&mut log.conn).await.unwrap(), 3);
    log.db.drop().await.unwrap();
}

/// Rows written before the log existed (the migration queued them without a hash)
/// are sequenced from the stored rows, with the same leaves the writer would make.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_from_before_the_log_are_backfilled() {
    let db = TestDb::create("merkle").await.unwrap();
    caracal_service_kit::db::run_migrations(&db.url)
        .await
        .unwrap();
    let mut conn = AsyncPgConnection::establish(&db.url).await.unwrap();
    let rows = rows(40);
    ledger::insert_rows(&mut conn, &rows).await.unwrap();
    // As the migration leaves an older ledger: queued, no hash.
    diesel::sql_query(
        "UPDATE merkle_queue SET leaf_hashes = array_fill(NULL::bytea, ARRAY[leaves])",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let signer = Signer::generate(ORIGIN).unwrap();
    keys::register(&mut conn, &signer.verifier()).await.unwrap();
    let mut seq = Sequencer::new(
        signer,
        ORIGIN,
        Limits {
            batch_size_limit: 1000,
            batch_timeout: chrono::Duration::zero(),
            max_leaves_per_transaction: 1000,
        },
    );
    let out = seq.step(&mut conn).await.unwrap();
    assert_eq!((out.leaves, out.checkpoints.clone()), (40, vec![40]));
    let exported = proofs::export_leaves(&mut conn, 0, 39).await.unwrap();
    let mut by_writer: Vec<tree::Hash> = rows.iter().map(|r| r.leaf().hash()).collect();
    let mut by_backfill: Vec<tree::Hash> = exported
        .iter()
        .map(|l| tree::leaf_hash(l.leaf.as_ref().unwrap()))
        .collect();
    by_writer.sort();
    by_backfill.sort();
    assert_eq!(by_writer, by_backfill);
    let verifiers = keys::verifiers(&mut conn).await.unwrap();
    let report = verify::verify(&mut conn, everything(), &verifiers)
        .await
        .unwrap();
    assert!(report.ok(), "{:#?}", report.failures);
    assert_eq!(report.events_checked, 40);
    db.drop().await.unwrap();
}

// ------------------------------------------------------------------ tamper tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_amount_is_named() {
    let mut log = sequenced(60).await;
    untouched(&mut log).await;
    let victim = log.rows[17].event_id.clone();
    tamper(
        &mut log.conn,
        &format!("UPDATE ledger_events SET charged_micros = charged_micros + 1 WHERE event_id = '{victim}'"),
    )
    .await;
    let report = assert_detected(&mut log, FailureKind::RowChanged, Some(&victim), Some(60)).await;
    assert_eq!(report.failures.len(), 1, "{:#?}", report.failures);
    log.db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_row_is_named() {
    let mut log = sequenced(60).await;
    let victim = log.rows[3].event_id.clone();
    tamper(
        &mut log.conn,
        &format!("DELETE FROM ledger_events WHERE event_id = '{victim}'"),
    )
    .await;
    let report = assert_detected(&mut log, FailureKind::RowDeleted, Some(&victim), None).await;
    assert_eq!(report.failures.len(), 1, "{:#?}", report.failures);
    log.db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inserted_row_is_named() {
    let mut log = sequenced(60).await;
    let model = log.rows[5].event_id.clone();
    // A plausible charge written straight into the table, past the ledger-writer.
    tamper(
        &mut log.conn,
        &format!(
            "INSERT INTO ledger_events SELECT 'forged/settle', kind, 'forged', request_id, agent_id, \
             root_agent_id, policy_ids, currency, reserved_micros, charged_micros, overshoot_micros, \
             input_tokens, output_tokens, cached_input_tokens, provider, model, price_version, \
             schema_version, occurred_at, kafka_topic, kafka_partition, kafka_offset + 1000, \
             ingested_at, reserved_at FROM ledger_events WHERE event_id = '{model}'"
        ),
    )
    .await;
    let report = assert_detected(
        &mut log,
        FailureKind::RowInserted,
        Some("forged/settle"),
        None,
    )
    .await;
    assert_eq!(report.failures.len(), 1, "{:#?}", report.failures);
    log.db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rows_with_swapped_contents_are_both_named() {
    let mut log = sequenced(60).await;
    let (a, b) = (log.rows[10].clone(), log.rows[40].clone());
    assert_ne!(a.charged_micros, b.charged_micros);
    tamper(
        &mut log.conn,
        &format!(
            "UPDATE ledger_events SET charged_micros = CASE event_id WHEN '{ea}' THEN {cb} ELSE {ca} END \
             WHERE event_id IN ('{ea}', '{eb}')",
            ea = a.event_id,
            eb = b.event_id,
            ca = a.charged_micros,
            cb = b.charged_micros
        ),
    )
    .await;
    // The ledger's total is unchanged: only the log notices.
    let report = assert_detected(&mut log, FailureKind::RowChanged, Some(&a.event_id), None).await;
    assert!(report
        .failures
        .iter()
        .any(|f| f.event_id.as_deref() == Some(b.event_id.as_str())));
    assert_eq!(report.failures.len(), 2, "{:#?}", report.failures);
    log.db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_stored_node_is_named() {
    let mut log = sequenced(60).await;
    // Leaf 5's stored hash: tile (0, 0), bytes 160..192 (overlay counts from 1).
    let victim = {
        #[derive(diesel::QueryableByName)]
        struct E {
            #[diesel(sql_type = Text)]
            event_id: String,
        }
        let e: E = diesel::sql_query("SELECT event_id FROM merkle_leaves WHERE leaf_index = 5")
            .get_result(&mut log.conn)
            .await
            .unwrap();
        e.event_id
    };
    tamper(
        &mut log.conn,
        "UPDATE merkle_tiles SET hashes = overlay(hashes PLACING '\\xffff'::bytea FROM 161 FOR 2) \
         WHERE level = 0 AND idx = 0",
    )
    .await;
    let report = assert_detected(
        &mut log,
        FailureKind::StoredLeafAltered,
        Some(&victim),
        Some(60),
    )
    .await;
    // Every checkpoint above leaf 5 names the stored tree as changed.
    let trees: Vec<u64> = report
        .failures
        .iter()
        .filter(|f| f.kind == FailureKind::StoredTreeMismatch)
        .filter_map(|f| f.checkpoint)
        .collect();
    assert_eq!(trees, vec![16, 32, 48, 50, 60], "{:#?}", report.failures);
    log.db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_altered_checkpoint_is_named() {
    let mut log = sequenced(60).await;
    // The signature of checkpoint 32: one character of its base64 changed.
    tamper(
        &mut log.conn,
        "UPDATE merkle_checkpoints SET note = \
           regexp_replace(note, '(\u{2014} \\S+ \\S{10})(.)', '\\1' || CASE WHEN substr(note, \
           strpos(note, '\u{2014}') + length('\u{2014} caracal.test/ledger ') + 10, 1) = 'A' THEN 'B' ELSE 'A' END) \
         WHERE tree_size = 32",
    )
    .await;
    assert_detected(&mut log, FailureKind::CheckpointSignature, None, Some(32)).await;
    // The root column of checkpoint 48, and the root inside the note of 16.
    tamper(
        &mut log.conn,
        "UPDATE merkle_checkpoints SET root = '\\x00'::bytea || substr(root, 2) WHERE tree_size = 48",
    )
    .await;
    tamper(
        &mut log.conn,
        "UPDATE merkle_checkpoints SET note = regexp_replace(note, '^([^\\n]*\\n[^\\n]*\\n)(.)', \
           '\\1' || CASE WHEN substr(split_part(note, E'\\n', 3), 1, 1) = 'A' THEN 'B' ELSE 'A' END) \
         WHERE tree_size = 16",
    )
    .await;
    let report = assert_detected(&mut log, FailureKind::CheckpointMismatch, None, Some(48)).await;
    assert!(
        report
            .failures
            .iter()
            .any(|f| f.kind == FailureKind::CheckpointSignature && f.checkpoint == Some(16)),
        "{:#?}",
        report.failures
    );
    log.db.drop().await.unwrap();
}

/// The run of leaves holding leaf `index`: its first index.
async fn run_of(conn: &mut AsyncPgConnection, index: u64) -> u64 {
    #[derive(diesel::QueryableByName)]
    struct R {
        #[diesel(sql_type = BigInt)]
        first_index: i64,
    }
    let r: R = diesel::sql_query(
        "SELECT first_index FROM merkle_leaf_runs WHERE first_index <= $1 \
         ORDER BY first_index DESC LIMIT 1",
    )
    .bind::<BigInt, _>(index as i64)
    .get_result(conn)
    .await
    .unwrap();
    r.first_index as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_leaf_index_is_named() {
    let mut log = sequenced(60).await;
    // One leaf taken out of its run and given index 1000: the run is one short
    // (the leaves after it move down one) and 1000 is beyond the tree.
    let moved = log.rows[20].event_id.clone();
    let index = leaf_of(&mut log.conn, &moved).await;
    let first = run_of(&mut log.conn, index).await;
    let k = index - first + 1; // its place in the run's arrays
    tamper(
        &mut log.conn,
        &format!(
            "UPDATE merkle_leaf_runs SET leaves = leaves - 1, \
               occurred_ats = occurred_ats[1:{b}] || occurred_ats[{a}:], \
               event_ids = event_ids[1:{b}] || event_ids[{a}:] \
             WHERE first_index = {first}",
            b = k - 1,
            a = k + 1
        ),
    )
    .await;
    tamper(
        &mut log.conn,
        &format!(
            "INSERT INTO merkle_leaf_runs VALUES (1000, 1, \
               ARRAY[(SELECT occurred_at FROM ledger_events WHERE event_id = '{moved}')], \
               ARRAY['{moved}'])"
        ),
    )
    .await;
    let report = assert_detected(&mut log, FailureKind::IndexBeyondTree, Some(&moved), None).await;
    assert!(
        report
            .failures
            .iter()
            .any(|f| f.kind == FailureKind::IndexGap),
        "{:#?}",
        report.failures
    );
    // The leaf after it now sits at its index: that row no longer matches.
    let next = log.rows[21].event_id.clone();
    assert!(
        report
            .failures
            .iter()
            .any(|f| f.kind == FailureKind::RowChanged
                && f.event_id.as_deref() == Some(next.as_str())
                && f.leaf_index == Some(index)),
        "{:#?}",
        report.failures
    );

    // Two events trading indices inside one run: both named.
    let (a, b) = (log.rows[52].event_id.clone(), log.rows[55].event_id.clone());
    let (ia, ib) = (
        leaf_of(&mut log.conn, &a).await,
        leaf_of(&mut log.conn, &b).await,
    );
    let first = run_of(&mut log.conn, ia).await;
    assert_eq!(first, run_of(&mut log.conn, ib).await);
    let (pa, pb) = (ia - first + 1, ib - first + 1);
    tamper(
        &mut log.conn,
        &format!(
            "UPDATE merkle_leaf_runs SET event_ids[{pa}] = event_ids[{pb}], \
               event_ids[{pb}] = event_ids[{pa}], occurred_ats[{pa}] = occurred_ats[{pb}], \
               occurred_ats[{pb}] = occurred_ats[{pa}] WHERE first_index = {first}"
        ),
    )
    .await;
    let report = assert_detected(&mut log, FailureKind::RowChanged, Some(&a), None).await;
    assert!(report
        .failures
        .iter()
        .any(|f| f.kind == FailureKind::RowChanged && f.event_id.as_deref() == Some(b.as_str())));
    // A run copied over another's indices: the indices held twice are named.
    tamper(
        &mut log.conn,
        "INSERT INTO merkle_leaf_runs SELECT first_index + 5, leaves, occurred_ats, event_ids \
         FROM merkle_leaf_runs WHERE first_index = 0",
    )
    .await;
    let report = assert_detected(&mut log, FailureKind::IndexRepeated, None, None).await;
    assert!(
        report
            .failures
            .iter()
            .any(|f| f.kind == FailureKind::IndexRepeated && f.leaf_index == Some(5)),
        "{:#?}",
        report.failures
    );
    log.db.drop().await.unwrap();
}

/// A row deleted and written again (a replay restoring lost rows: the writer's
/// statement re-inserts it) is queued again and becomes a second leaf. The log
/// keeps that trace; verify-range checks both copies against the row, counts the
/// event as rewritten and fails nothing, and the event's proof is its first leaf.
/// While the row is gone, the deletion is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_deleted_and_written_again_verifies_and_is_counted() {
    let mut log = sequenced(60).await;
    let victim = log.rows[7].clone();
    tamper(
        &mut log.conn,
        &format!(
            "DELETE FROM ledger_events WHERE event_id = '{}'",
            victim.event_id
        ),
    )
    .await;
    assert_detected(
        &mut log,
        FailureKind::RowDeleted,
        Some(&victim.event_id),
        None,
    )
    .await;
    assert_eq!(
        ledger::insert_rows(&mut log.conn, std::slice::from_ref(&victim))
            .await
            .unwrap(),
        1
    );
    let mut seq = small_sequencer(&mut log.conn).await;
    let out = seq.step(&mut log.conn).await.unwrap();
    assert_eq!((out.leaves, out.tree_size), (1, 61));
    log.verifiers = keys::verifiers(&mut log.conn).await.unwrap();
    let report = verify::verify(&mut log.conn, everything(), &log.verifiers)
        .await
        .unwrap();
    assert!(report.ok(), "{:#?}", report.failures);
    assert_eq!(report.rewritten, 1);
    assert_eq!(report.events_checked, 60);
    let file = proofs::prove_event(&mut log.conn, &victim.event_id, None, &log.verifiers)
        .await
        .unwrap();
    assert_eq!(
        file.verify(&log.verifiers).unwrap().leaf.event_id,
        victim.event_id
    );
    assert_eq!(leaf_of_first(&mut log.conn, &victim.event_id).await, 7);
    // A copy whose row changes is named like any leaf.
    tamper(
        &mut log.conn,
        &format!(
            "UPDATE ledger_events SET charged_micros = charged_micros + 1 WHERE event_id = '{}'",
            victim.event_id
        ),
    )
    .await;
    let report = assert_detected(
        &mut log,
        FailureKind::RowChanged,
        Some(&victim.event_id),
        None,
    )
    .await;
    let named: Vec<Option<u64>> = report.failures.iter().map(|f| f.leaf_index).collect();
    assert_eq!(named, vec![Some(60), Some(7)], "{:#?}", report.failures);
    log.db.drop().await.unwrap();
}

/// The smallest leaf index of `event_id`.
async fn leaf_of_first(conn: &mut AsyncPgConnection, event_id: &str) -> u64 {
    #[derive(diesel::QueryableByName)]
    struct L {
        #[diesel(sql_type = BigInt)]
        leaf_index: i64,
    }
    let l: L = diesel::sql_query(
        "SELECT min(leaf_index) AS leaf_index FROM merkle_leaves WHERE event_id = $1",
    )
    .bind::<Text, _>(event_id)
    .get_result(conn)
    .await
    .unwrap();
    l.leaf_index as u64
}

// ------------------------------------------------------------------ the sequencer under kill -9

fn writer(
    db_url: &str,
    brokers: &str,
    group: &str,
    log: &std::path::Path,
    http: u16,
    key_dir: &std::path::Path,
) -> ConsumerProcess {
    ConsumerProcess {
        binary: env!("CARGO_BIN_EXE_consumers-under-test").into(),
        subcommand: "ledger-writer".into(),
        database_url: db_url.to_owned(),
        brokers: brokers.to_owned(),
        group: group.to_owned(),
        log: log.to_owned(),
        env: vec![
            ("CARACAL_CONSUMER_LEASE_INTERVAL_MS".into(), "300".into()),
            (
                "CARACAL_CONSUMER_HTTP_ADDR".into(),
                format!("127.0.0.1:{http}"),
            ),
            (
                "CARACAL_LEDGER_WRITER_MERKLE_KEY_DIR".into(),
                key_dir.display().to_string(),
            ),
            ("CARACAL_LEDGER_WRITER_MERKLE_ORIGIN".into(), ORIGIN.into()),
            (
                "CARACAL_LEDGER_WRITER_MERKLE_BATCH_SIZE_LIMIT".into(),
                "1000".into(),
            ),
            (
                "CARACAL_LEDGER_WRITER_MERKLE_BATCH_TIMEOUT_SECONDS".into(),
                "1".into(),
            ),
            (
                "CARACAL_LEDGER_WRITER_MERKLE_SELF_CHECK_INTERVAL_SECONDS".into(),
                "2".into(),
            ),
        ],
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn leads(port: u16) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let (code, body) = http_get(addr, "/metrics").await;
    code == 200 && metric_value(&body, metric::LEADER, &[]) == Some(1.0)
}

async fn tree_size(url: &str) -> u64 {
    let mut conn = AsyncPgConnection::establish(url).await.unwrap();
    sequencer::state(&mut conn).await.unwrap().0
}

/// Issue 26: two ledger-writer replicas (each runs the sequencer; one leads), the
/// leader SIGKILLed five times while 100,000 charges arrive, each time after the
/// tree grew (so mostly mid-transaction). The other replica takes over each time;
/// at the end the log holds every row exactly once, indices dense, every
/// checkpoint consistent with the next, and verify-range passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sequencer_killed_five_times_loses_and_repeats_no_leaf() {
    const N: u64 = 100_000;
    let tansu = Tansu::start_with_storage("memory://tansu/").await.unwrap();
    create_topics(&tansu.brokers(), &[METERING, DLQ], 4)
        .await
        .unwrap();
    let db = TestDb::create("merkle").await.unwrap();
    caracal_service_kit::db::run_migrations(&db.url)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The signing key, as a mounted secret both replicas read.
    let key_dir = dir.path().join("keys");
    keys::generate_into(&key_dir, ORIGIN, None).unwrap();
    let group = format!("ledger-{}", uuid::Uuid::new_v4().simple());
    let ports = [free_port(), free_port()];
    let replicas: Vec<ConsumerProcess> = (0..2)
        .map(|i| {
            writer(
                &db.url,
                &tansu.brokers(),
                &group,
                &dir.path().join(format!("writer{i}.log")),
                ports[i],
                &key_dir,
            )
        })
        .collect();

    let run = uuid::Uuid::new_v4().simple().to_string();
    let roots: Vec<uuid::Uuid> = (0..12).map(|_| uuid::Uuid::new_v4()).collect();
    let events: Vec<ChargeEvent> = (0..N)
        .map(|i| {
            numbered_charge(
                &run,
                i,
                &roots[(i % 12) as usize],
                &roots[(i % 12) as usize],
            )
        })
        .collect();
    let expected_sum: i64 = events.iter().map(charged).sum();
    let out: Vec<ChargeMessage> = events.iter().map(ChargeMessage::event).collect();
    drop(events);
    let brokers = tansu.brokers();
    let producing = tokio::spawn(async move {
        // One message per record batch (see ledger_writer.rs: tansu's in-memory
        // storage and restarts at an offset inside a batch).
        let p = burst_charge_producer(&brokers, 1).unwrap();
        for chunk in out.chunks(5_000) {
            produce_charges(&p, chunk).await.unwrap();
        }
    });

    let mut children = [replicas[0].spawn().unwrap(), replicas[1].spawn().unwrap()];
    let started = Instant::now();
    let mut takeovers = 0;
    for kill in 0..5 {
        // Who leads (bounded wait: the first election, or the last takeover).
        let deadline = Instant::now() + Duration::from_secs(30);
        let leader = loop {
            if leads(ports[0]).await {
                break 0;
            }
            if leads(ports[1]).await {
                break 1;
            }
            assert!(
                Instant::now() < deadline,
                "no sequencer leads; logs:\n{}\n{}",
                replicas[0].log_tail(30),
                replicas[1].log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // Kill it once the tree has grown: it is sequencing.
        let before = tree_size(&db.url).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while tree_size(&db.url).await == before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(random_ms(0, 300)).await;
        children[leader].kill().unwrap(); // SIGKILL
        children[leader].wait().unwrap();
        let at_kill = tree_size(&db.url).await;
        eprintln!(
            "kill {kill}: replica {leader} at tree size {at_kill} after {:?}",
            started.elapsed()
        );
        // The other replica takes over and the tree grows again (unless all is in).
        let other = 1 - leader;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !leads(ports[other]).await {
            assert!(
                Instant::now() < deadline,
                "replica {other} did not take over; log:\n{}",
                replicas[other].log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        takeovers += 1;
        children[leader] = replicas[leader].spawn().unwrap();
    }
    assert_eq!(takeovers, 5);
    producing.await.unwrap();
    let t = wait_for_ledger_rows(&db.url, N as i64, Duration::from_secs(60)).await;
    assert_eq!(t.rows, N as i64);
    // Every row under a checkpoint (batchTimeoutSeconds 1).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut conn = AsyncPgConnection::establish(&db.url).await.unwrap();
    loop {
        let (size, checkpointed) = sequencer::state(&mut conn).await.unwrap();
        if size == N && checkpointed == N {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tree {size}, checkpoint {checkpointed}; logs:\n{}\n{}",
            replicas[0].log_tail(30),
            replicas[1].log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (child, replica) in children.iter_mut().zip(&replicas) {
        if let Err(e) = terminate(child, Duration::from_secs(30)) {
            panic!("a writer on SIGTERM: {e}; log:\n{}", replica.log_tail(40));
        }
    }

    let totals = ledger_totals(&db.url).await;
    assert_eq!(
        (totals.rows, totals.distinct_ids, totals.charged),
        (N as i64, N as i64, expected_sum)
    );
    #[derive(diesel::QueryableByName)]
    struct Dense {
        #[diesel(sql_type = BigInt)]
        n: i64,
        #[diesel(sql_type = BigInt)]
        distinct_events: i64,
        #[diesel(sql_type = BigInt)]
        max: i64,
        #[diesel(sql_type = BigInt)]
        unsequenced: i64,
    }
    let d: Dense = diesel::sql_query(
        "SELECT count(*) AS n, count(DISTINCT (occurred_at, event_id)) AS distinct_events, \
                coalesce(max(leaf_index), -1) AS max, \
                (SELECT count(*) FROM ledger_events e WHERE NOT EXISTS (SELECT 1 FROM merkle_leaves l \
                   WHERE l.occurred_at = e.occurred_at AND l.event_id = e.event_id)) AS unsequenced \
         FROM merkle_leaves",
    )
    .get_result(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        (d.n, d.distinct_events, d.max, d.unsequenced),
        (N as i64, N as i64, N as i64 - 1, 0)
    );
    assert_eq!(sequencer::queue_depth(&mut conn).await.unwrap(), 0);

    // Every checkpoint consistent with the next, against the signed notes.
    let verifiers = keys::verifiers(&mut conn).await.unwrap();
    assert_eq!(
        verifiers.len(),
        1,
        "one key of record, shared by the replicas"
    );
    let cps = checkpoints::list(&mut conn, 0, N, 10_000).await.unwrap();
    assert!(cps.len() >= 100, "{} checkpoints", cps.len());
    assert_eq!(cps.last().unwrap().tree_size, N as i64);
    for pair in cps.windows(2) {
        let (older, newer, path) = proofs::prove_consistency(
            &mut conn,
            pair[0].tree_size as u64,
            pair[1].tree_size as u64,
        )
        .await
        .unwrap();
        verify_consistency_notes(&older.note, &newer.note, &path, &verifiers)
            .unwrap_or_else(|e| panic!("{} -> {}: {e}", pair[0].tree_size, pair[1].tree_size));
    }
    let report = verify::verify(&mut conn, everything(), &verifiers)
        .await
        .unwrap();
    assert!(report.ok(), "{:#?}", report.failures);
    assert_eq!(report.events_checked, N);
    db.drop().await.unwrap();
}
