//! What the budget scripts cost inside Redis, without the network, the client or
//! the service: one EVAL defines authorize.lua and finish.lua as functions, exactly
//! as the group-commit script does (`budget/store.rs`), builds `--pairs` Authorize
//! and Settle calls of the shape the service sends (calendar policies, a record
//! with one line per policy, ~300 B of event metadata), then times the Authorizes
//! and the Settles with Redis's TIME. Rounds alternate between the two ways the
//! scripts run:
//! - **alone**: each call as a script of its own (`lua/alone_prelude.lua`: it looks
//!   at the budget-state marker and writes the expiry index itself);
//! - **batch**: calls in runs of `--run` (`lua/batch_prelude.lua`: the marker looked
//!   at once per run, the index written at the end of each run).
//!
//! EVALSHA's own cost (turning the keys and arguments into Lua strings, ~4.5 µs per
//! Authorize, README) is not in these figures; `authz-bench` prints the whole.
//! This VM's speed varies from minute to minute, so compare medians of interleaved
//! rounds, never two single runs.
//!
//!   cargo run --release -p caracal-tests --bin script-bench -- --pairs 1000 --rounds 15
//!
//! Prints µs per Authorize, per Settle and per pair: median and best of the rounds.

use anyhow::{bail, Context};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "µs inside Redis per budget script call, measured in one EVAL")]
struct Args {
    /// Authorize + Settle pairs per round.
    #[arg(long, default_value_t = 1000)]
    pairs: usize,
    /// Rounds per way of running (alone, batch), interleaved.
    #[arg(long, default_value_t = 15)]
    rounds: usize,
    /// Calendar policies per agent (counters per decision), 1-3.
    #[arg(long, default_value_t = 3)]
    policies: usize,
    /// Calls per run in the batch rounds.
    #[arg(long, default_value_t = 8)]
    run: usize,
}

const AUTHORIZE: &str = include_str!("../../../authz-service/src/budget/lua/authorize.lua");
const FINISH: &str = include_str!("../../../authz-service/src/budget/lua/finish.lua");
const ALONE: &str = include_str!("../../../authz-service/src/budget/lua/alone_prelude.lua");
const BATCH: &str = include_str!("../../../authz-service/src/budget/lua/batch_prelude.lua");

/// The driver: ARGV = pairs, run length, key prefix, metadata, then the policy
/// ids, then their counter keys. Returns {µs of the Authorizes, µs of the Settles}.
const DRIVER: &str = r#"
local N, RUN, P, META = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local NPOL = (#ARGV - 4) / 2
local POLS, CKEYS = {}, {}
for j = 1, NPOL do POLS[j] = ARGV[4 + j]; CKEYS[j] = ARGV[4 + NPOL + j] end
local marker = P .. ':state'
redis.call('SET', marker, 'bench')
local aks, aas, fks, fas = {}, {}, {}, {}
for i = 1, N do
  local stem = 'rsv_0_' .. string.format('%032x', i)
  local rk = P .. ':rsv:' .. stem
  local ks = {rk, P .. ':exp', P .. ':outbox'}
  for j = 1, NPOL do ks[#ks + 1] = CKEYS[j] end
  ks[#ks + 1] = marker
  aks[i] = ks
  local rec = 'L\t5000\tUSD\t' .. NPOL .. '\n'
  for j = 1, NPOL do
    rec = rec .. CKEYS[j] .. '\t' .. POLS[j] .. '\t1000000000000\tc\t0\t0\t0\tcharge\n'
  end
  local a = {'1796600000000', stem .. '_1796600000000', '5000', '1796600300000',
    string.gsub(META, 'REQ', 'req-' .. i), rec, stem .. '_1796600000000/authorize',
    stem .. '/deny/1796600000000', tostring(NPOL), stem}
  for j = 1, NPOL do
    for _, v in ipairs({POLS[j], '1000000000000', 'c', '0', '0', '1796700000'}) do
      a[#a + 1] = v
    end
  end
  aas[i] = a
  fks[i] = {rk, P .. ':exp', P .. ':outbox', marker, P .. ':parked'}
  fas[i] = {'settle', '1796600001000', stem, '3600', '4000', '1796600000000', '10', '20',
    '0', '1', '', 'USD', ''}
end
local function us(a, b)
  return (tonumber(b[1]) - tonumber(a[1])) * 1000000 + tonumber(b[2]) - tonumber(a[2])
end
-- Every call of `script` in order (in runs of RUN when batched); µs in all, or nil
-- and what went wrong when a call did not answer `want`.
local function timed(script, ks, as, want)
  local t0 = redis.call('TIME')
  for i = 1, N do
    local r = script(ks[i], as[i], BATCHED)
    if r[1] ~= want then return nil, want .. ' ' .. i .. ': ' .. tostring(r[1]) end
    if BATCHED and i % RUN == 0 then flush_index_writes() end
  end
  if BATCHED then flush_index_writes() end
  return us(t0, redis.call('TIME'))
end
local a_us, a_err = timed(authorize, aks, aas, 'allow')
if not a_us then return redis.error_reply(a_err) end
local s_us, s_err = timed(finish, fks, fas, 'settle')
if not s_us then return redis.error_reply(s_err) end
return {a_us, s_us}
"#;

/// The event metadata the service sends (`store.rs` `event_meta`), REQ replaced
/// per call.
const META: &str = r#"{"request_id":"REQ","agent_id":"0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b","root_agent_id":"0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b","currency":"USD","provider":"openai","model":"gpt-4o-mini","resource":"/v1/chat/completions","reserved_at_ms":"1796600000000","generation":"1796600000000"}"#;

fn script(batched: bool) -> String {
    let (prelude, flag) = if batched {
        (BATCH, "local BATCHED = true\n")
    } else {
        // No flush in the alone rounds: each call wrote the index itself.
        (
            ALONE,
            "local BATCHED = false\nlocal function flush_index_writes() end\n",
        )
    };
    format!(
        "{prelude}\n{flag}local function authorize(KEYS, ARGV, MARKER_PRESENT)\n{AUTHORIZE}\nend\n\
         local function finish(KEYS, ARGV, MARKER_PRESENT)\n{FINISH}\nend\n{DRIVER}"
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(1..=3).contains(&args.policies) || args.pairs == 0 || args.run == 0 {
        bail!("--policies must be 1-3, --pairs and --run at least 1");
    }
    let client = redis::Client::open(caracal_tests::redis_url())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .context("connecting to Redis")?;
    let policies: Vec<String> = (0..args.policies)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    println!(
        "caracal script bench: {} Authorize + Settle pairs per round, {} calendar policies, {} rounds each way, batch runs of {}",
        args.pairs, args.policies, args.rounds, args.run
    );
    // (authorize µs per call, settle µs per call) per round, alone and batch.
    let mut figures: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
    for round in 0..args.rounds {
        for (way, batched) in [false, true].into_iter().enumerate() {
            // Its own hash tag, so the keys could live on one cluster slot.
            let prefix = format!("scriptbench{{{}}}", uuid::Uuid::new_v4().simple());
            let counters: Vec<String> = policies
                .iter()
                .map(|p| format!("{prefix}:c:{p}:d20261207"))
                .collect();
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(script(batched))
                .arg(0)
                .arg(args.pairs)
                .arg(args.run)
                .arg(&prefix)
                .arg(META)
                .arg(&policies)
                .arg(&counters);
            let reply: redis::RedisResult<(i64, i64)> = cmd.query_async(&mut conn).await;
            caracal_tests::delete_redis_prefix(&prefix).await?;
            let (a, s) = reply.with_context(|| format!("round {round}"))?;
            let n = args.pairs as f64;
            figures[way].push((a as f64 / n, s as f64 / n));
        }
    }
    for (way, name) in ["alone", "batch"].into_iter().enumerate() {
        let a: Vec<f64> = figures[way].iter().map(|f| f.0).collect();
        let s: Vec<f64> = figures[way].iter().map(|f| f.1).collect();
        let p: Vec<f64> = figures[way].iter().map(|f| f.0 + f.1).collect();
        println!(
            "  {name:5}  µs per call, median (best): Authorize {:.1} ({:.1})  Settle {:.1} ({:.1})  pair {:.1} ({:.1})",
            median(a.clone()),
            best(&a),
            median(s.clone()),
            best(&s),
            median(p.clone()),
            best(&p)
        );
    }
    Ok(())
}
