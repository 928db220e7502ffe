//! Request routing, and the small routes: the welcome page, the API's description, health,
//! readiness and metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::header::{ALLOW, CACHE_CONTROL, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use super::connection::Activity;
use super::error::ApiError;
use super::metrics::{InFlight, RequestLabels, RouteLabels};
use super::responses::full;
use super::{AppState, Body, predict, predictions};

fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    full(status, "application/json", value.to_string())
}

/// The routes and the methods they accept; anything else is 404, a wrong method 405.
fn route(path: &str) -> Option<(&'static str, &'static [Method], &'static str)> {
    Some(match path {
        "/" => ("/", &[Method::GET, Method::HEAD], "GET, HEAD"),
        "/openapi.json" => ("/openapi.json", &[Method::GET, Method::HEAD], "GET, HEAD"),
        "/predict" => ("/predict", &[Method::POST], "POST"),
        "/healthz" => ("/healthz", &[Method::GET, Method::HEAD], "GET, HEAD"),
        "/readyz" => ("/readyz", &[Method::GET, Method::HEAD], "GET, HEAD"),
        "/metrics" => ("/metrics", &[Method::GET], "GET"),
        _ if path.starts_with(predictions::PREFIX) => {
            ("/predictions", &[Method::GET, Method::HEAD], "GET, HEAD")
        }
        _ => return None,
    })
}

/// What every request's answer is finished with, whatever its route.
struct Exchange<'a> {
    state: &'a AppState,
    request_id: String,
    method: Method,
    path: String,
    peer: SocketAddr,
    started: Instant,
}

/// Answers one request; never fails (errors become JSON responses).
pub async fn handle(
    state: Arc<AppState>,
    request: Request<Incoming>,
    peer: SocketAddr,
    connection: &Activity,
) -> Response<Body> {
    // Decremented on drop: also when hyper drops this future because the client went away.
    let _in_flight = InFlight::enter(&state.metrics);
    let exchange = Exchange {
        state: &state,
        request_id: super::names::new_request_id(std::time::SystemTime::now()),
        method: request.method().clone(),
        path: request.uri().path().to_string(),
        peer,
        started: Instant::now(),
    };
    let (label, response) = dispatch(&exchange, request, connection).await;
    exchange.finish(label, response)
}

/// The route's answer, or the refusal of a head too large, a path unknown or a method not
/// allowed; with the route's label for metrics.
async fn dispatch(
    exchange: &Exchange<'_>,
    request: Request<Incoming>,
    connection: &Activity,
) -> (&'static str, Response<Body>) {
    let (state, request_id) = (exchange.state, exchange.request_id.as_str());
    let head_size = head_size(&request);
    let limit = state.config.max_header_bytes;
    match route(&exchange.path) {
        _ if head_size > limit => {
            let error = ApiError::HeadersTooLarge {
                size: head_size,
                limit,
            };
            ("other", error.into_response(request_id))
        }
        None => {
            let error = ApiError::NotFound(exchange.path.clone());
            ("other", error.into_response(request_id))
        }
        Some((label, methods, allowed)) if !methods.contains(&exchange.method) => {
            let error = ApiError::MethodNotAllowed {
                method: exchange.method.to_string(),
                allowed,
            };
            let mut response = error.into_response(request_id);
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allowed));
            (label, response)
        }
        Some((label, _, _)) => {
            let response = match label {
                "/predict" => {
                    predict::handle(state, request, request_id, exchange.peer, connection).await
                }
                "/predictions" => predictions::handle(state, &request)
                    .await
                    .unwrap_or_else(|error| error.into_response(request_id)),
                "/healthz" => health(state),
                "/readyz" => readiness(state),
                "/metrics" => metrics(state),
                "/openapi.json" => full(StatusCode::OK, "application/json", state.openapi.clone()),
                _ => welcome(state),
            };
            (label, response)
        }
    }
}

impl Exchange<'_> {
    /// Adds the headers every answer carries, counts and times it, and logs it (`/predict`
    /// logs its own line once its streamed body is complete).
    fn finish(self, label: &'static str, mut response: Response<Body>) -> Response<Body> {
        let state = self.state;
        let status = response.status().as_u16();
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(&self.request_id) {
            headers.insert("x-request-id", value);
        }
        if state.model.weights.untrained {
            headers.insert(
                "x-model-warning",
                HeaderValue::from_static(
                    "untrained deterministic weights: depth maps are meaningless",
                ),
            );
        }
        let labels = RequestLabels {
            route: label,
            status,
        };
        state.metrics.requests.get_or_create(&labels).inc();
        state
            .metrics
            .latency
            .get_or_create(&RouteLabels { route: label })
            .observe(self.started.elapsed().as_secs_f64());
        if label != "/predict" || status != 201 {
            tracing::info!(
                request_id = %self.request_id,
                method = %self.method,
                path = %self.path,
                status,
                peer = %self.peer,
                ms = self.started.elapsed().as_secs_f64() * 1000.0,
                "request"
            );
        }
        response
    }
}

fn welcome(state: &AppState) -> Response<Body> {
    let mut response = full(
        StatusCode::OK,
        "text/html; charset=utf-8",
        state.page.clone(),
    );
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The request line and headers' size, as they arrived (HTTP/1.1 framing).
fn head_size(request: &Request<Incoming>) -> usize {
    let line = request.method().as_str().len() + request.uri().to_string().len() + 12;
    request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + line
}

/// Liveness: the process answers and its model thread runs.
fn health(state: &AppState) -> Response<Body> {
    if state.queue.is_alive() {
        json(StatusCode::OK, serde_json::json!({ "status": "ok" }))
    } else {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "status": "the inference thread has stopped" }),
        )
    }
}

fn readiness(state: &AppState) -> Response<Body> {
    let ready = state.ready.load(Ordering::SeqCst) && state.queue.is_alive();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(
        status,
        serde_json::json!({
            "ready": ready,
            "model": state.model.kind,
            "transform": state.model.transform,
            "backend": state.model.backend,
            "adapter": state.model.adapter,
            "untrained": state.model.weights.untrained,
            "weights": state.model.weights.source,
            "max_depth": state.model.weights.max_depth,
            "queue_depth": state.queue.waiting(),
            "memory_budget_bytes": state.budget.total(),
            "memory_available_bytes": state.budget.available(),
        }),
    )
}

fn metrics(state: &AppState) -> Response<Body> {
    state.metrics.queue_depth.set(state.queue.waiting() as i64);
    full(
        StatusCode::OK,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        state.metrics.encode(),
    )
}
