//! The answer to a `/predict`: the depth map rendered at the input's size, then streamed to
//! the client and into the store at once.
//!
//! The stream runs in its own task, so a client that goes away does not stop the prediction
//! from being stored; every wait in it is bounded (the store's calls by the store timeout,
//! each send to the client by the send timeout), so the task cannot outlive its request by
//! more than that. The last chunk is held back until the output object is committed: a client
//! that receives the whole image knows it is stored.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use hyper::header::{CONTENT_TYPE, HeaderValue, LOCATION};
use hyper::{Response, StatusCode};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::names::prediction_name;
use super::pipe::{PipeSender, pipe};
use super::{AppState, Body, BoxError, Metrics};
use crate::budget::Share;
use crate::pipeline::{self, DepthMap, ImageHeader, PointSamples, RenderOptions};
use crate::storage::Upload;

/// Chunks of the response that may wait for a slow client.
const RESPONSE_PIPE_DEPTH: usize = 4;

/// Stage timings of one request, in milliseconds.
#[derive(Debug, Default)]
pub struct Timings {
    /// Receiving the upload.
    pub upload: f64,
    /// Decoding and pre-processing.
    pub decode: f64,
    /// Waiting for the model.
    pub queue: f64,
    /// The forward pass.
    pub forward: f64,
    /// Rendering.
    pub postprocess: f64,
}

impl Timings {
    /// The `Server-Timing` header's value.
    pub fn header(&self) -> String {
        format!(
            "upload;dur={:.1}, decode;dur={:.1}, queue;dur={:.1}, forward;dur={:.1}, postprocess;dur={:.1}",
            self.upload, self.decode, self.queue, self.forward, self.postprocess
        )
    }
}

/// Milliseconds since `since`.
pub fn millis(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// The render step's share of the budget, for an output the size of `header`'s image (or a
/// cloud of `samples`, from a depth map of `depth_values`).
pub async fn render_share(
    state: &AppState,
    header: &ImageHeader,
    samples: Option<&PointSamples>,
    depth_values: usize,
) -> Result<Share, ApiError> {
    let bytes = match samples {
        Some(samples) => pipeline::cloud_bytes(samples.grid().len() as u64, depth_values as u64),
        None => pipeline::render_bytes(header.width, header.height),
    };
    state
        .budget
        .reserve(bytes, "rendered output")
        .await
        .map_err(ApiError::from)
}

/// What the answer step needs from the steps before it.
pub struct Answer {
    /// The network's output.
    pub depth: DepthMap,
    /// The input image's header (its size is the output's).
    pub header: ImageHeader,
    /// A point cloud's colours and camera.
    pub samples: Option<PointSamples>,
    /// How to render.
    pub options: RenderOptions,
    /// The request's id.
    pub request_id: String,
    /// The committed input's object name.
    pub input_object: String,
    /// The input's size in bytes.
    pub input_bytes: u64,
    /// The client.
    pub peer: SocketAddr,
    /// When the request began.
    pub started: Instant,
}

/// Renders the depth map, then answers `201 Created` with the image streaming behind.
pub async fn answer(
    state: &AppState,
    answer: Answer,
    mut timings: Timings,
) -> Result<Response<Body>, ApiError> {
    let output_object = prediction_name(&answer.request_id, answer.options.format.extension())
        .ok_or_else(|| ApiError::Internal("malformed request id".to_string()))?;
    let postprocess_started = Instant::now();
    let share = render_share(
        state,
        &answer.header,
        answer.samples.as_ref(),
        answer.depth.data.len(),
    )
    .await?;
    let worker = state
        .pixel_work
        .acquire()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let (depth, options, samples) = (answer.depth, answer.options, answer.samples);
    let original = (answer.header.width, answer.header.height);
    let chunks =
        tokio::task::spawn_blocking(move || pipeline::render(&depth, original, options, samples))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Internal(e.to_string()))?;
    drop(worker);
    timings.postprocess = millis(postprocess_started);
    state
        .metrics
        .stage("postprocess", timings.postprocess / 1000.0);

    let (client, body) = pipe(RESPONSE_PIPE_DEPTH, state.config.send_timeout(), share);
    let store = &state.store;
    let headers = [
        (
            LOCATION.as_str(),
            format!("/predictions/{}", answer.request_id),
        ),
        ("x-input-object", store.object_key(&answer.input_object)),
        ("x-output-object", store.object_key(&output_object)),
        ("server-timing", timings.header()),
    ];
    let stream = OutputStream {
        upload: store.begin(&output_object),
        client,
        metrics: state.metrics.clone(),
        log: RequestLog {
            request_id: answer.request_id,
            peer: answer.peer,
            started: answer.started,
            input_bytes: answer.input_bytes,
            timings_header: timings.header(),
            input_object: answer.input_object,
            output_object,
        },
    };
    tokio::spawn(stream.run(chunks));

    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::CREATED;
    let map = response.headers_mut();
    map.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(options.format.content_type()),
    );
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            map.insert(name, value);
        }
    }
    Ok(response)
}

/// What the final log line of a `/predict` request reports.
struct RequestLog {
    request_id: String,
    peer: SocketAddr,
    started: Instant,
    input_bytes: u64,
    timings_header: String,
    input_object: String,
    output_object: String,
}

/// The encoded output on its way to the client and the store.
struct OutputStream {
    upload: Upload,
    /// The response body's end; it holds the rendered image's share of the memory budget
    /// until the client has the last chunk (or is given up on).
    client: PipeSender,
    metrics: Metrics,
    log: RequestLog,
}

impl OutputStream {
    /// Encodes on a blocking thread and forwards each chunk to the store and the client.
    async fn run(mut self, chunks: pipeline::EncodedChunks) {
        let (encoded_sender, mut encoded) =
            mpsc::channel::<Result<Bytes, pipeline::EncodeError>>(RESPONSE_PIPE_DEPTH);
        let encode_started = Instant::now();
        let encoder = tokio::task::spawn_blocking(move || {
            for chunk in chunks {
                if encoded_sender.blocking_send(chunk).is_err() {
                    return;
                }
            }
        });
        let mut held: Option<Bytes> = None;
        let mut client_open = true;
        let mut output_bytes = 0u64;
        let mut failure: Option<String> = None;
        while let Some(chunk) = encoded.recv().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(error) => {
                    failure = Some(error.to_string());
                    break;
                }
            };
            output_bytes += chunk.len() as u64;
            if let Err(error) = self.upload.write(chunk.clone()).await {
                failure = Some(error.to_string());
                break;
            }
            if let Some(previous) = held.replace(chunk)
                && client_open
            {
                client_open = self.send(Ok(previous)).await;
            }
        }
        drop(encoded);
        let _ = encoder.await;
        let encode_ms = millis(encode_started);
        self.metrics.stage("encode", encode_ms / 1000.0);
        let upload = self.upload;
        let result = match failure {
            // Dropping the upload aborts it.
            Some(error) => Err(error),
            None => upload.finish().await.map_err(|e| e.to_string()),
        };
        let log = &self.log;
        match result {
            Ok(size) => {
                self.metrics.stored("output", size);
                if let Some(last) = held
                    && client_open
                {
                    client_open = self.client.send(Ok(last)).await && self.client.finish().await;
                }
                tracing::info!(
                    request_id = %log.request_id,
                    method = "POST",
                    path = "/predict",
                    status = 201,
                    peer = %log.peer,
                    input_bytes = log.input_bytes,
                    output_bytes,
                    server_timing = %log.timings_header,
                    encode_ms,
                    total_ms = millis(log.started),
                    input_object = %log.input_object,
                    output_object = %log.output_object,
                    client_received_all = client_open,
                    "request"
                );
            }
            Err(error) => {
                self.metrics.store_error("output");
                tracing::error!(request_id = %log.request_id, %error, "storing the prediction failed; the response is cut short");
                self.client.send(Err(error.into())).await;
            }
        }
    }

    async fn send(&self, item: Result<Bytes, BoxError>) -> bool {
        let open = self.client.send(item).await;
        if !open {
            tracing::info!(
                request_id = %self.log.request_id,
                "the client stopped reading; the prediction is still stored"
            );
        }
        open
    }
}
