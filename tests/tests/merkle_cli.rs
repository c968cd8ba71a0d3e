//! `caracal merkle ...` (as a process) and the MerkleService against a real
//! authz-service on real PostgreSQL: the log is prepared directly (ledger rows,
//! queued, then sequenced and signed by the real sequencer step), then read,
//! proved, verified offline with the exported public key, tampered with, and
//! re-keyed.

use base64::{engine::general_purpose::STANDARD, Engine as _};
use caracal_domain::merkle::{
    keys::{key_id_hex, Signer},
    leaf::LedgerLeaf,
    proof_file::ProofFile,
    tree::{self, Hash},
};
use caracal_merkle_log::{
    keys,
    sequencer::{Limits, Sequencer},
};
use caracal_tests::{
    cli_process::{run_caracal, Run},
    TestStack,
};
use diesel::sql_types::{BigInt, Bytea, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use serde_json::Value;

/// The log's origin (= the signing key's name) in these tests.
const ORIGIN: &str = "caracal.test/ledger";
/// Ledger rows seeded: checkpoints at 4 (batch size) and 7 (batch timeout).
const EVENTS: i64 = 7;

async fn caracal(stack: &TestStack, args: &[&str]) -> Run {
    run_caracal(env!("CARGO_BIN_EXE_caracal-under-test"), stack, args)
        .await
        .unwrap()
}

fn ok(run: &Run) -> &str {
    assert_eq!(run.code, 0, "stdout: {}\nstderr: {}", run.out, run.err);
    &run.out
}

fn json(run: &Run) -> Value {
    serde_json::from_str(ok(run)).unwrap_or_else(|e| panic!("not JSON ({e}): {}", run.out))
}

fn limits() -> Limits {
    Limits {
        batch_size_limit: 4,
        batch_timeout: chrono::Duration::seconds(1),
        max_leaves_per_transaction: 100,
    }
}

/// Inserts ledger rows evt-<from> ..= evt-<to>, every 6 hours from
/// 2026-02-01T10:00Z (evt-1 at 16:00 .. evt-7 at 2026-02-03T04:00Z), and queues
/// them as the backfill does (no leaf hash: the sequencer hashes the stored row).
async fn insert_events(conn: &mut AsyncPgConnection, from: i64, to: i64) {
    diesel::sql_query(
        "INSERT INTO ledger_events (event_id, kind, reservation_id, request_id, agent_id, \
            root_agent_id, policy_ids, currency, reserved_micros, charged_micros, \
            overshoot_micros, input_tokens, output_tokens, cached_input_tokens, provider, \
            model, price_version, schema_version, occurred_at, reserved_at, kafka_topic, \
            kafka_partition, kafka_offset) \
         SELECT 'evt-' || i, 'settle', 'rsv-' || i, 'req-' || i, $3::uuid, $3::uuid, \
            ARRAY['pol-1'], 'USD', 2000000, 1000000 + i, 0, 100 * i, 10 * i, 0, 'openai', \
            'gpt-4o', 1, 1, \
            '2026-02-01T10:00:00Z'::timestamptz + make_interval(hours => (6 * i)::int), \
            '2026-02-01T09:59:00Z'::timestamptz + make_interval(hours => (6 * i)::int), \
            'caracal.metering.events', 0, i \
         FROM generate_series($1::int8, $2::int8) i",
    )
    .bind::<BigInt, _>(from)
    .bind::<BigInt, _>(to)
    .bind::<Text, _>("6f1d2c1e-0000-4000-8000-000000000001")
    .execute(conn)
    .await
    .unwrap();
    diesel::sql_query(
        "INSERT INTO merkle_queue (leaves, occurred_ats, event_ids, leaf_hashes) \
         SELECT count(*), array_agg(e.occurred_at ORDER BY e.occurred_at, e.event_id), \
                array_agg(e.event_id ORDER BY e.occurred_at, e.event_id), \
                array_agg(NULL::bytea) \
         FROM ledger_events e \
         WHERE NOT EXISTS (SELECT 1 FROM merkle_leaves l \
                           WHERE l.occurred_at = e.occurred_at AND l.event_id = e.event_id) \
           AND NOT EXISTS (SELECT 1 FROM merkle_queue q, unnest(q.occurred_ats, q.event_ids) \
                             AS u(occurred_at, event_id) \
                           WHERE u.occurred_at = e.occurred_at AND u.event_id = e.event_id) \
         HAVING count(*) > 0",
    )
    .execute(conn)
    .await
    .unwrap();
}

/// A stack whose log holds evt-1 ..= evt-7 as leaves 0 ..= 6, under checkpoints
/// of sizes 4 and 7 signed by the returned key.
async fn seeded_log() -> (TestStack, Signer) {
    let stack = TestStack::start().await.unwrap();
    let mut conn = stack.db().await.unwrap();
    insert_events(&mut conn, 1, EVENTS).await;
    let signer = Signer::generate(ORIGIN).unwrap();
    keys::register(&mut conn, &signer.verifier()).await.unwrap();
    let copy = Signer::from_pkcs8_pem(ORIGIN, &signer.to_pkcs8_pem(None).unwrap(), None).unwrap();
    let mut sequencer = Sequencer::new(copy, ORIGIN, limits());
    let first = sequencer.step(&mut conn).await.unwrap();
    assert_eq!((first.leaves, first.checkpoints.clone()), (7, vec![4]));
    // The 3 leaves past 4 wait for the batch timeout (1 s).
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let second = sequencer.step(&mut conn).await.unwrap();
    assert_eq!((second.leaves, second.checkpoints), (0, vec![7]));
    (stack, signer)
}

#[derive(diesel::QueryableByName)]
struct Stored {
    #[diesel(sql_type = Text)]
    note: String,
    #[diesel(sql_type = Bytea)]
    root: Vec<u8>,
}

async fn stored_checkpoint(conn: &mut AsyncPgConnection, size: i64) -> Stored {
    diesel::sql_query("SELECT note, root FROM merkle_checkpoints WHERE tree_size = $1")
        .bind::<BigInt, _>(size)
        .get_result(conn)
        .await
        .unwrap()
}

fn path_str(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test]
async fn checkpoints_proofs_and_leaves_verify_offline_with_the_exported_key() {
    let (stack, signer) = seeded_log().await;
    let key_id = key_id_hex(&signer.id());
    let mut conn = stack.db().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| dir.path().join(name);

    // The newest checkpoint, its note exactly as signed.
    let newest = stored_checkpoint(&mut conn, 7).await;
    let run = caracal(&stack, &["merkle", "checkpoint"]).await;
    assert_eq!(ok(&run), newest.note);
    assert_eq!(newest.note.lines().nth(1), Some("7"));
    let cp4 = json(
        &caracal(
            &stack,
            &["merkle", "checkpoint", "--size", "4", "--output", "json"],
        )
        .await,
    );
    assert_eq!(cp4["tree_size"], 4);
    assert_eq!(cp4["key_id"], key_id.as_str());
    assert_eq!(cp4["log_size"], 7);
    let stored4 = stored_checkpoint(&mut conn, 4).await;
    assert_eq!(cp4["root"], STANDARD.encode(&stored4.root));
    assert_eq!(cp4["note"], stored4.note.as_str());
    let missing = caracal(&stack, &["merkle", "checkpoint", "--size", "5"]).await;
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(
        missing
            .err
            .contains("NotFound: no checkpoint of tree size 5"),
        "{}",
        missing.err
    );

    // Listing: all, from a size, the newest one.
    let sizes = |v: Value| -> Vec<u64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| c["tree_size"].as_u64().unwrap())
            .collect()
    };
    let all = caracal(&stack, &["merkle", "list-checkpoints", "--output", "json"]).await;
    assert_eq!(sizes(json(&all)), [4, 7]);
    let from5 = caracal(
        &stack,
        &[
            "merkle",
            "list-checkpoints",
            "--from",
            "5",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(sizes(json(&from5)), [7]);
    let last = caracal(
        &stack,
        &[
            "merkle",
            "list-checkpoints",
            "--limit",
            "1",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(sizes(json(&last)), [7]);
    let table = caracal(&stack, &["merkle", "list-checkpoints"]).await;
    let lines: Vec<&str> = ok(&table).lines().collect();
    assert_eq!(lines.len(), 3, "{}", table.out);
    assert!(
        lines[1].starts_with('4') && lines[1].contains(&key_id),
        "{}",
        lines[1]
    );

    // The public key, exported to a file.
    let keys_pem = file("keys.pem");
    ok(&caracal(
        &stack,
        &["merkle", "export-public-key", "--out", path_str(&keys_pem)],
    )
    .await);
    let exported = std::fs::read_to_string(&keys_pem).unwrap();
    assert!(
        exported.starts_with(&format!("# key_id={key_id} name={ORIGIN} registered_at=")),
        "{exported}"
    );
    assert!(exported.contains(&signer.verifier().to_public_key_pem().unwrap()));
    assert!(!exported.contains("PRIVATE"), "{exported}");

    // A proof of evt-2 (leaf 1), verified offline with that key.
    let proof_path = file("proof.json");
    let run = caracal(
        &stack,
        &[
            "merkle",
            "prove",
            "--event-id",
            "evt-2",
            "--out",
            path_str(&proof_path),
        ],
    )
    .await;
    assert!(ok(&run).is_empty(), "{}", run.out);
    assert!(
        run.err.contains(&format!(
            "event evt-2 is leaf 1 of the tree of size 7 (checkpoint signed by key {key_id})"
        )),
        "{}",
        run.err
    );
    let proof = ProofFile::from_json(&std::fs::read_to_string(&proof_path).unwrap()).unwrap();
    assert_eq!((proof.leaf_index, proof.tree_size), (1, 7));
    assert_eq!(proof.checkpoint, newest.note);
    let verify = |path: std::path::PathBuf, key: std::path::PathBuf| {
        let stack = &stack;
        async move {
            caracal(
                stack,
                &[
                    "merkle",
                    "verify-proof",
                    path_str(&path),
                    "--public-key",
                    path_str(&key),
                ],
            )
            .await
        }
    };
    let run = verify(proof_path.clone(), keys_pem.clone()).await;
    let said = ok(&run);
    assert!(
        said.starts_with(&format!(
            "OK: event evt-2 is leaf 1 of the tree of size 7 signed by key {key_id} at 20"
        )),
        "{said}"
    );
    assert!(said.contains("1.000002 USD"), "{said}");

    // Another key: refused, exit code 3, saying why.
    let other_pem = file("other.pem");
    let other = Signer::generate(ORIGIN).unwrap();
    std::fs::write(&other_pem, other.verifier().to_public_key_pem().unwrap()).unwrap();
    let run = verify(proof_path.clone(), other_pem.clone()).await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.err.contains("does NOT verify"), "{}", run.err);
    assert!(
        run.err.contains("not among the trusted public keys"),
        "{}",
        run.err
    );

    // The amount changed in the proved leaf: not included.
    let mut leaf = LedgerLeaf::decode(&STANDARD.decode(&proof.leaf).unwrap()).unwrap();
    assert_eq!(
        (leaf.event_id.as_str(), leaf.charged_micros),
        ("evt-2", 1_000_002)
    );
    leaf.charged_micros += 1_000_000;
    let mut forged = proof.clone();
    forged.leaf = STANDARD.encode(leaf.encode());
    forged.event = serde_json::to_value(&leaf).unwrap();
    let forged_path = file("forged.json");
    std::fs::write(&forged_path, forged.to_json().unwrap()).unwrap();
    let run = verify(forged_path.clone(), keys_pem.clone()).await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.err.contains("is not at index 1 of the tree of size 7"),
        "{}",
        run.err
    );
    // ... and in the readable copy only: the leaf verifies, the copy is refused.
    let mut edited = proof.clone();
    edited.event["charged_micros"] = Value::from(9_000_000);
    std::fs::write(&forged_path, edited.to_json().unwrap()).unwrap();
    let run = verify(forged_path, keys_pem.clone()).await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.err.contains("charged_micros"), "{}", run.err);

    // Against the older checkpoint, to stdout; an event past it is refused.
    let run = caracal(
        &stack,
        &[
            "merkle",
            "prove",
            "--event-id",
            "evt-2",
            "--checkpoint",
            "4",
        ],
    )
    .await;
    let old = ProofFile::from_json(ok(&run)).unwrap();
    assert_eq!((old.leaf_index, old.tree_size), (1, 4));
    assert_eq!(old.checkpoint, stored4.note);
    let run = caracal(
        &stack,
        &[
            "merkle",
            "prove",
            "--event-id",
            "evt-6",
            "--checkpoint",
            "4",
        ],
    )
    .await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.err
            .contains("NotFound: event evt-6 is leaf 5, not under the checkpoint of size 4"),
        "{}",
        run.err
    );
    let run = caracal(&stack, &["merkle", "prove", "--event-id", "evt-99"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.err.contains("evt-99 is not in the Merkle log"),
        "{}",
        run.err
    );

    // Consistency 4 -> 7, checked with the exported key only.
    let run = caracal(
        &stack,
        &[
            "merkle",
            "consistency",
            "--from",
            "4",
            "--verify",
            "--public-key",
            path_str(&keys_pem),
        ],
    )
    .await;
    assert!(
        ok(&run).contains("OK: the checkpoint of size 7 extends the checkpoint of size 4"),
        "{}",
        run.out
    );
    let cons = json(
        &caracal(
            &stack,
            &[
                "merkle",
                "consistency",
                "--from",
                "4",
                "--to",
                "7",
                "--output",
                "json",
            ],
        )
        .await,
    );
    assert_eq!(
        (
            cons["from"]["tree_size"].as_u64(),
            cons["to"]["tree_size"].as_u64()
        ),
        (Some(4), Some(7))
    );
    let hashes: Vec<Hash> = cons["proof"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| Hash::try_from(STANDARD.decode(h.as_str().unwrap()).unwrap().as_slice()).unwrap())
        .collect();
    let root = |stored: &Stored| Hash::try_from(stored.root.as_slice()).unwrap();
    tree::verify_consistency(4, 7, &hashes, &root(&stored4), &root(&newest)).unwrap();
    let run = caracal(
        &stack,
        &[
            "merkle",
            "consistency",
            "--from",
            "4",
            "--verify",
            "--public-key",
            path_str(&other_pem),
        ],
    )
    .await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.err.contains("does NOT verify"), "{}", run.err);

    // The leaves, exported: their hashes rebuild both signed roots.
    let run = caracal(
        &stack,
        &["merkle", "export-leaves", "--from", "0", "--to", "6"],
    )
    .await;
    let leaves: Vec<Value> = ok(&run)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(leaves.len(), 7);
    let mut leaf_hashes = Vec::new();
    for (i, l) in leaves.iter().enumerate() {
        assert_eq!(l["leaf_index"], i as u64);
        assert_eq!(l["event_id"], format!("evt-{}", i + 1));
        let bytes = STANDARD.decode(l["leaf"].as_str().unwrap()).unwrap();
        assert_eq!(
            LedgerLeaf::decode(&bytes).unwrap().event_id,
            format!("evt-{}", i + 1)
        );
        let hash = tree::leaf_hash(&bytes);
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(l["leaf_hash"], hex.as_str());
        leaf_hashes.push(hash);
    }
    assert_eq!(tree::root(&leaf_hashes), root(&newest));
    assert_eq!(tree::root(&leaf_hashes[..4]), root(&stored4));
    // Part of the range, to a file.
    let part = file("leaves.jsonl");
    let run = caracal(
        &stack,
        &[
            "merkle",
            "export-leaves",
            "--from",
            "5",
            "--out",
            path_str(&part),
        ],
    )
    .await;
    ok(&run);
    assert!(run.err.contains("2 leaves written"), "{}", run.err);
    let text = std::fs::read_to_string(&part).unwrap();
    let indices: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["leaf_index"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(indices, [5, 6]);

    stack.stop().await.unwrap();
}

#[tokio::test]
async fn verify_range_passes_on_the_ledger_and_names_a_changed_row() {
    let (stack, _signer) = seeded_log().await;
    let mut conn = stack.db().await.unwrap();

    // The runbook command: the end date is included.
    let report = json(
        &caracal(
            &stack,
            &[
                "merkle",
                "verify-range",
                "--start",
                "2026-02-01",
                "--end",
                "2026-02-03",
                "--output",
                "json",
            ],
        )
        .await,
    );
    assert_eq!(report["events_checked"], 7);
    assert_eq!(report["failures_total"], 0);
    assert_eq!(report["checkpoints_checked"], 2);
    assert_eq!(
        (report["pending"].as_u64(), report["unsigned"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(
        report["range"],
        "2026-02-01T00:00:00Z .. 2026-02-04T00:00:00Z (end excluded)"
    );
    let count = |v: Value| v["events_checked"].as_u64().unwrap();
    // evt-1 .. evt-6 fall on 02-01 and 02-02; an RFC 3339 end is excluded.
    let run = caracal(
        &stack,
        &[
            "merkle",
            "verify-range",
            "--start",
            "2026-02-01",
            "--end",
            "2026-02-02",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(count(json(&run)), 6);
    let run = caracal(
        &stack,
        &[
            "merkle",
            "verify-range",
            "--start",
            "2026-02-01",
            "--end",
            "2026-02-02T04:00:00Z",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(count(json(&run)), 2);
    let table = caracal(
        &stack,
        &[
            "merkle",
            "verify-range",
            "--start",
            "2026-02-01",
            "--end",
            "2026-02-03",
        ],
    )
    .await;
    assert!(
        ok(&table).contains("OK: every row of the range matches the signed log"),
        "{}",
        table.out
    );

    // Too long a range, refused by the service.
    let run = caracal(
        &stack,
        &[
            "merkle",
            "verify-range",
            "--start",
            "2025-01-01",
            "--end",
            "2026-02-03",
        ],
    )
    .await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.err.contains("InvalidArgument") && run.err.contains("366 days"),
        "{}",
        run.err
    );

    // Change evt-3's amount behind the ledger's back (as a superuser can).
    conn.batch_execute(
        "ALTER TABLE ledger_events DISABLE TRIGGER USER; \
         UPDATE ledger_events SET charged_micros = charged_micros + 1 WHERE event_id = 'evt-3'; \
         ALTER TABLE ledger_events ENABLE TRIGGER USER;",
    )
    .await
    .unwrap();

    let run = caracal(
        &stack,
        &[
            "merkle",
            "verify-range",
            "--start",
            "2026-02-01",
            "--end",
            "2026-02-03",
        ],
    )
    .await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.out
            .contains("FAILURE row_changed event=evt-3 leaf=2 checkpoint=7:"),
        "{}",
        run.out
    );
    assert_eq!(run.out.matches("FAILURE ").count(), 1, "{}", run.out);
    assert!(
        run.err.contains("verify-range found 1 failure(s)"),
        "{}",
        run.err
    );
    let report = caracal(
        &stack,
        &[
            "merkle",
            "verify-range",
            "--start",
            "2026-02-01",
            "--end",
            "2026-02-03",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(report.code, 3);
    let report: Value = serde_json::from_str(&report.out).unwrap();
    assert_eq!(report["failures_total"], 1);
    assert_eq!(report["failures"][0]["kind"], "row_changed");
    assert_eq!(report["failures"][0]["event_id"], "evt-3");
    assert_eq!(report["failures"][0]["leaf_index"], 2);
    assert_eq!(report["failures"][0]["checkpoint"], 7);

    // By leaf index: the range without leaf 2 is clean; leaf 2 alone is not.
    let run = caracal(
        &stack,
        &[
            "merkle",
            "verify-range",
            "--from-leaf",
            "3",
            "--to-leaf",
            "6",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let run = caracal(
        &stack,
        &[
            "merkle",
            "verify-range",
            "--from-leaf",
            "2",
            "--to-leaf",
            "2",
        ],
    )
    .await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.out.contains("event=evt-3 leaf=2"), "{}", run.out);

    // No proof is handed out for the changed row: its leaf is not in the signed
    // tree at its index. (The status code is merkle-log's choice: prove_event
    // reports this as Invalid today, DATA_LOSS once it maps it to Corrupt.)
    let run = caracal(&stack, &["merkle", "prove", "--event-id", "evt-3"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.out.is_empty(), "{}", run.out);
    assert!(
        run.err.contains("is not at index 2 of the tree of size 7")
            || run.err.contains("event evt-3 (leaf 2)"),
        "{}",
        run.err
    );
    // The untouched rows still prove.
    let run = caracal(&stack, &["merkle", "prove", "--event-id", "evt-4"]).await;
    assert_eq!(ProofFile::from_json(ok(&run)).unwrap().leaf_index, 3);

    stack.stop().await.unwrap();
}

#[tokio::test]
async fn rotate_key_registers_a_second_key_and_old_proofs_keep_verifying() {
    let (stack, signer) = seeded_log().await;
    let old_id = key_id_hex(&signer.id());
    let mut conn = stack.db().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key_dir = dir.path().join("keys");
    let key_dir_arg = path_str(&key_dir).to_owned();

    let run = caracal(
        &stack,
        &[
            "merkle",
            "rotate-key",
            "--key-dir",
            &key_dir_arg,
            "--origin",
            ORIGIN,
            "--database-url",
            &stack.database_url,
            "--output",
            "json",
        ],
    )
    .await;
    assert!(!run.out.contains("PRIVATE"), "{}", run.out);
    let rotated = json(&run);
    let new_id = rotated["key_id"].as_str().unwrap().to_owned();
    assert_eq!(new_id.len(), 8);
    assert_ne!(new_id, old_id);
    assert_eq!(rotated["registered"], true);
    assert_eq!(rotated["key_name"], ORIGIN);
    // The key file is in the directory, private to its owner, and opens.
    let held = keys::load_signers(&key_dir, ORIGIN, None).unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(key_id_hex(&held[0].1.id()), new_id);
    assert_eq!(
        held[0].0.display().to_string(),
        rotated["file"].as_str().unwrap()
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&held[0].0).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert_eq!(
        rotated["public_key_pem"],
        held[0].1.verifier().to_public_key_pem().unwrap().as_str()
    );

    // Both keys are listed, oldest first; one by its id.
    let listed = caracal(&stack, &["merkle", "export-public-key"]).await;
    let ids: Vec<String> = ok(&listed)
        .lines()
        .filter_map(|l| l.strip_prefix("# key_id="))
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();
    assert_eq!(ids, [old_id.clone(), new_id.clone()]);
    let one = caracal(
        &stack,
        &["merkle", "export-public-key", "--key-id", &new_id],
    )
    .await;
    assert_eq!(ok(&one), rotated["public_key_pem"].as_str().unwrap());
    let run = caracal(
        &stack,
        &["merkle", "export-public-key", "--key-id", "00000000"],
    )
    .await;
    assert_eq!(run.code, 1);
    assert!(run.err.contains("no public key 00000000"), "{}", run.err);

    // The sequencer, with the new key, signs the next checkpoint with it.
    let (_, new_signer) = keys::load_signers(&key_dir, ORIGIN, None)
        .unwrap()
        .remove(0);
    insert_events(&mut conn, EVENTS + 1, EVENTS + 1).await;
    let mut sequencer = Sequencer::new(new_signer, ORIGIN, limits());
    let step = sequencer.step(&mut conn).await.unwrap();
    assert_eq!(step.checkpoints, vec![8]);
    let cp8 = json(&caracal(&stack, &["merkle", "checkpoint", "--output", "json"]).await);
    assert_eq!(
        (cp8["tree_size"].as_u64(), cp8["key_id"].as_str()),
        (Some(8), Some(new_id.as_str()))
    );

    // With both public keys: the old proof and the new one verify, and 4 -> 8 is
    // consistent across the rotation.
    let keys_pem = dir.path().join("keys.pem");
    ok(&caracal(
        &stack,
        &["merkle", "export-public-key", "--out", path_str(&keys_pem)],
    )
    .await);
    for (event, checkpoint, key) in [("evt-2", "4", &old_id), ("evt-8", "8", &new_id)] {
        let proof = dir.path().join(format!("{event}.json"));
        ok(&caracal(
            &stack,
            &[
                "merkle",
                "prove",
                "--event-id",
                event,
                "--checkpoint",
                checkpoint,
                "--out",
                path_str(&proof),
            ],
        )
        .await);
        let run = caracal(
            &stack,
            &[
                "merkle",
                "verify-proof",
                path_str(&proof),
                "--public-key",
                path_str(&keys_pem),
            ],
        )
        .await;
        assert!(
            ok(&run).contains(&format!(
                "of the tree of size {checkpoint} signed by key {key}"
            )),
            "{}",
            run.out
        );
    }
    let run = caracal(
        &stack,
        &[
            "merkle",
            "consistency",
            "--from",
            "4",
            "--verify",
            "--public-key",
            path_str(&keys_pem),
        ],
    )
    .await;
    assert!(
        ok(&run).contains("OK: the checkpoint of size 8 extends the checkpoint of size 4"),
        "{}",
        run.out
    );

    stack.stop().await.unwrap();
}
