//! A service's HTTP endpoints as a test reads them: `/health/live`,
//! `/health/ready` and the Prometheus text on `/metrics`.

use std::{net::SocketAddr, time::Duration};

use http_body_util::BodyExt;

/// GET `http://<addr><path>`: status and body; `(0, "")` when nothing answers
/// within 10 s.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let Ok(uri) = format!("http://{addr}{path}").parse::<hyper::Uri>() else {
        return (0, String::new());
    };
    match tokio::time::timeout(Duration::from_secs(10), client.get(uri)).await {
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
        _ => (0, String::new()),
    }
}

/// The value of the first sample of `metric` (that name exactly) whose labels
/// contain every `labels` part.
pub fn metric_value(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    let (with_labels, bare) = (format!("{metric}{{"), format!("{metric} "));
    text.lines()
        .filter(|l| l.starts_with(&with_labels) || l.starts_with(&bare))
        .filter(|l| labels.iter().all(|p| l.contains(p)))
        .find_map(|l| l.rsplit(' ').next().and_then(|v| v.parse().ok()))
}
