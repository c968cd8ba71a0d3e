//! One module per resource; each turns parsed arguments into admin API calls and renders
//! the answers. Local checks (files, arguments) run before connecting.

mod agent;
mod allowlist;
mod audit;
mod policy;
mod pricebook;

use std::io::Write;

use anyhow::Result;

use crate::{
    args::{Cli, Command, ConnOpts},
    client::Connection,
    output::OutputFormat,
};

/// What every command needs besides its own arguments.
pub struct Ctx<'a> {
    conn: &'a ConnOpts,
    pub format: OutputFormat,
}

/// The per-call timeout of the long admin operations (budget rebuild, snapshot
/// create and restore) when `--timeout` is shorter: they read the whole current
/// window of the ledger.
const LONG_CALL_TIMEOUT_S: u64 = 600;

impl Ctx<'_> {
    pub async fn connect(&self) -> Result<Connection> {
        Connection::open(self.conn).await
    }

    /// A connection for one long operation: at least [`LONG_CALL_TIMEOUT_S`] per call.
    pub async fn connect_long(&self) -> Result<Connection> {
        let mut opts = self.conn.clone();
        opts.timeout = opts.timeout.max(LONG_CALL_TIMEOUT_S);
        Connection::open(&opts).await
    }
}

/// A long operation's error: when the answer did not come in time, the server
/// still finishes the work (it runs detached from the call), so say where to
/// follow it instead of leaving the operator to guess.
pub fn long_call_error(status: tonic::Status, follow: &str) -> anyhow::Error {
    match status.code() {
        tonic::Code::Cancelled | tonic::Code::DeadlineExceeded => anyhow::anyhow!(
            "{:?}: {}: no answer in time, but the server goes on with it; follow it with \
             `{follow}`",
            status.code(),
            status.message()
        ),
        _ => status.into(),
    }
}

/// Runs a parsed command line, writing its result to `out`.
pub async fn execute(cli: Cli, out: &mut dyn Write) -> Result<()> {
    let format = cli.format();
    let Cli { conn, command, .. } = cli;
    let ctx = Ctx {
        conn: &conn,
        format,
    };
    match command {
        Command::Agent(a) => agent::run(&ctx, a.command, out).await,
        Command::Policy(p) => policy::run(&ctx, p.command, out).await,
        Command::Allowlist(a) => allowlist::run(&ctx, a.command, out).await,
        Command::Pricebook(p) => pricebook::run(&ctx, p.command, out).await,
        Command::Audit(a) => audit::run(a.command, out).await,
        Command::Dlq(d) => crate::dlq::run(&ctx, d.command, out).await,
        Command::Ledger(l) => crate::ledger::run(&ctx, l.command, out).await,
        Command::Spend(s) => crate::spend::run(&ctx, s.command, out).await,
        Command::Merkle(m) => crate::merkle::run(&ctx, m.command, out).await,
        Command::Budget(b) => crate::budget::run(&ctx, b.command, out).await,
        Command::Replay(r) => crate::replay::run(format, r.command, out).await,
        Command::Snapshot(s) => crate::snapshot::run(&ctx, s.command, out).await,
    }
}

/// Largest page the server hands out.
const MAX_PAGE: u32 = 1000;

/// Reads a paged list: asks for pages until the server returns no `next_page_token` or
/// `limit` items are in hand. `fetch` gets each page request and returns the page's items
/// and its `next_page_token`.
pub async fn read_pages<T, F, Fut>(limit: Option<u32>, mut fetch: F) -> Result<Vec<T>>
where
    F: FnMut(caracal_proto::v1::PageRequest) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String)>>,
{
    let limit = limit.map(|l| usize::try_from(l).unwrap_or(usize::MAX));
    let mut items: Vec<T> = Vec::new();
    let mut page_token = String::new();
    loop {
        let want = match limit {
            Some(limit) => limit.saturating_sub(items.len()),
            None => usize::MAX,
        };
        if want == 0 {
            break;
        }
        let page = caracal_proto::v1::PageRequest {
            limit: u32::try_from(want).unwrap_or(MAX_PAGE).min(MAX_PAGE),
            page_token: page_token.clone(),
        };
        let (page_items, next) = fetch(page).await?;
        items.extend(page_items);
        if next.is_empty() {
            break;
        }
        if next == page_token {
            anyhow::bail!("the server returned the same page token twice; stopping");
        }
        page_token = next;
    }
    if let Some(limit) = limit {
        items.truncate(limit);
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use caracal_proto::v1::PageRequest;

    use super::*;

    /// A fake server over `total` items that never returns more than two per page.
    fn fake(
        total: usize,
        seen: &Mutex<Vec<PageRequest>>,
    ) -> impl FnMut(PageRequest) -> std::future::Ready<Result<(Vec<usize>, String)>> + '_ {
        move |page| {
            seen.lock().unwrap().push(page.clone());
            let start: usize = if page.page_token.is_empty() {
                0
            } else {
                page.page_token.parse().unwrap()
            };
            let end = (start + (page.limit as usize).min(2)).min(total);
            let next = if end < total {
                end.to_string()
            } else {
                String::new()
            };
            std::future::ready(Ok(((start..end).collect(), next)))
        }
    }

    #[tokio::test]
    async fn reads_every_page() {
        let seen = Mutex::new(Vec::new());
        let items = read_pages(None, fake(5, &seen)).await.unwrap();
        assert_eq!(items, vec![0, 1, 2, 3, 4]);
        let tokens: Vec<String> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.page_token.clone())
            .collect();
        assert_eq!(tokens, ["", "2", "4"]);
        assert!(seen.lock().unwrap().iter().all(|p| p.limit == MAX_PAGE));
    }

    #[tokio::test]
    async fn stops_at_the_limit() {
        let seen = Mutex::new(Vec::new());
        let items = read_pages(Some(3), fake(5, &seen)).await.unwrap();
        assert_eq!(items, vec![0, 1, 2]);
        let limits: Vec<u32> = seen.lock().unwrap().iter().map(|p| p.limit).collect();
        assert_eq!(limits, [3, 1]);
    }

    #[tokio::test]
    async fn empty_list_and_stuck_token() {
        let seen = Mutex::new(Vec::new());
        assert!(read_pages(None, fake(0, &seen)).await.unwrap().is_empty());
        let stuck = |_: PageRequest| std::future::ready(Ok((vec![1], "same".to_owned())));
        assert!(read_pages(None, stuck).await.is_err());
    }
}

#[cfg(test)]
mod long_call_tests {
    use super::long_call_error;

    #[test]
    fn a_long_call_without_an_answer_says_where_to_follow_it() {
        let e = long_call_error(
            tonic::Status::cancelled("Timeout expired"),
            "caracal snapshot status",
        );
        let text = e.to_string();
        assert!(text.starts_with("Cancelled: Timeout expired"), "{text}");
        assert!(text.contains("`caracal snapshot status`"), "{text}");
        // Any other failure stays the server's status, as every command shows it.
        let e = long_call_error(
            tonic::Status::failed_precondition("live"),
            "caracal budget status",
        );
        let status = e.downcast_ref::<tonic::Status>().unwrap();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    }
}
