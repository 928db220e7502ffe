//! `POST /predict`: the upload is streamed into the store while it arrives, checked as soon as
//! its header is in, decoded when complete, queued for the model, and the encoded result is
//! streamed back to the client and into the store at the same time.
//!
//! Ordering guarantees: the 200 goes out only once the input object is durably stored (no
//! false success), and the response's last chunk only once the output object is; if storing
//! the output fails, the body is cut short so the client sees an incomplete transfer, not a
//! complete image that was never stored.

use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::TryStreamExt;
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use multer::{Constraints, Multipart, SizeLimit};

use super::error::ApiError;
use super::inference::Reply;
use super::metrics::ObjectLabels;
use super::{AppState, Body, BoxError};
use crate::pipeline::{self, ImageFormat, ImageHeader, NetInput, OutputFormat, RenderOptions};
use crate::storage::{ObjectNames, Upload};

/// The only form field accepted.
const FILE_FIELD: &str = "file";

/// Chunks of the response that may wait for a slow client.
const RESPONSE_PIPE_DEPTH: usize = 4;

/// Stage timings of one request, in milliseconds.
#[derive(Debug, Default)]
struct Timings {
    upload: f64,
    decode: f64,
    queue: f64,
    forward: f64,
    postprocess: f64,
}

impl Timings {
    fn header(&self) -> String {
        format!(
            "upload;dur={:.1}, decode;dur={:.1}, queue;dur={:.1}, forward;dur={:.1}, postprocess;dur={:.1}",
            self.upload, self.decode, self.queue, self.forward, self.postprocess
        )
    }
}

fn millis(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// Answers `POST /predict`, turning any failure into its JSON refusal.
pub async fn handle(
    state: &AppState,
    request: Request<Incoming>,
    request_id: &str,
    peer: SocketAddr,
) -> Response<Body> {
    let timeout = state.config.request_timeout();
    match tokio::time::timeout(timeout, respond(state, request, request_id, peer)).await {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            tracing::debug!(request_id, %error, "refused");
            error.into_response(request_id)
        }
        Err(_) => ApiError::Timeout(timeout).into_response(request_id),
    }
}

fn render_options(query: Option<&str>) -> Result<RenderOptions, ApiError> {
    let mut options = RenderOptions::default();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "colormap" => {
                options.colormap = pipeline::Colormap::from_name(value).ok_or_else(|| {
                    ApiError::BadQuery(format!(
                        "unknown colormap {value:?}; use inferno, viridis or gray"
                    ))
                })?;
            }
            "format" => {
                options.format = OutputFormat::from_name(value).ok_or_else(|| {
                    ApiError::BadQuery(format!("unknown format {value:?}; use png, png16 or npy"))
                })?;
            }
            other => {
                return Err(ApiError::BadQuery(format!(
                    "unknown query parameter {other:?}; use colormap and format"
                )));
            }
        }
    }
    Ok(options)
}

/// Maps a multipart failure, recognising the body-size limit underneath.
fn multipart_error(error: multer::Error, limit: u64) -> ApiError {
    match &error {
        multer::Error::StreamSizeExceeded { .. } | multer::Error::FieldSizeExceeded { .. } => {
            ApiError::BodyTooLarge(limit)
        }
        multer::Error::StreamReadFailed(inner)
            if inner.is::<http_body_util::LengthLimitError>() =>
        {
            ApiError::BodyTooLarge(limit)
        }
        multer::Error::UnknownField { field_name } => {
            ApiError::UnexpectedField(field_name.clone().unwrap_or_default())
        }
        _ => ApiError::BadMultipart(error.to_string()),
    }
}

/// The image header, once enough bytes have arrived; checks type and pixel budget.
fn check_header(
    state: &AppState,
    bytes: &[u8],
    complete: bool,
    declared: ImageFormat,
) -> Result<Option<ImageHeader>, ApiError> {
    if let Some(found) = ImageFormat::sniff(bytes).or_else(|| complete.then_some(declared))
        && found != declared
    {
        return Err(ApiError::TypeMismatch {
            declared: format!("{declared:?}"),
            found: format!("{found:?}"),
        });
    }
    let Some(header) = pipeline::probe(bytes, complete)? else {
        return Ok(None);
    };
    state.limits.check(&header)?;
    Ok(Some(header))
}

async fn respond(
    state: &AppState,
    request: Request<Incoming>,
    request_id: &str,
    peer: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    let options = render_options(request.uri().query())?;
    let limit = state.config.max_body_bytes;
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let boundary = multer::parse_boundary(content_type).map_err(|_| {
        ApiError::NotMultipart(format!(
            "expected a multipart/form-data body with a boundary, got content type {content_type:?}"
        ))
    })?;
    let declared_length = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > limit) {
        return Err(ApiError::BodyTooLarge(limit));
    }
    // Content-Length alone does not bound a chunked body: the stream itself is limited.
    let body = Limited::new(request.into_body(), limit as usize)
        .into_data_stream()
        .map_err(|e| -> BoxError { e });
    let constraints = Constraints::new()
        .allowed_fields(vec![FILE_FIELD])
        .size_limit(SizeLimit::new().whole_stream(limit).per_field(limit));
    let mut multipart = Multipart::with_constraints(body, boundary, constraints);

    let mut field = multipart
        .next_field()
        .await
        .map_err(|e| multipart_error(e, limit))?
        .ok_or(ApiError::MissingFile)?;
    let file_name = field
        .file_name()
        .filter(|n| !n.is_empty())
        .ok_or(ApiError::MissingFilename)?
        .to_string();
    let extension = file_name
        .rsplit_once('.')
        .map(|(_, e)| e)
        .unwrap_or_default();
    let declared = ImageFormat::from_extension(extension)
        .ok_or_else(|| ApiError::DisallowedExtension(file_name.clone()))?;
    let names = ObjectNames::new(
        request_id,
        &file_name,
        options.format.extension(),
        SystemTime::now(),
    );

    // Stream the part into the store and a bounded buffer, checking the header on the way.
    let mut upload = state.store.begin(&names.input);
    let mut buffer = BytesMut::new();
    let mut header = None;
    let received = async {
        while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, limit))? {
            buffer.extend_from_slice(&chunk);
            if header.is_none() {
                header = check_header(state, &buffer, false, declared)?;
            }
            upload.write(chunk).await?;
        }
        if buffer.is_empty() {
            return Err(ApiError::EmptyFile);
        }
        if header.is_none() {
            header = check_header(state, &buffer, true, declared)?;
        }
        Ok(())
    }
    .await;
    // multer hands out the next part only once the current one is dropped.
    drop(field);
    let received = match received {
        Ok(()) => match multipart.next_field().await {
            Ok(None) => Ok(()),
            Ok(Some(extra)) => Err(ApiError::UnexpectedField(
                extra.name().unwrap_or_default().to_string(),
            )),
            Err(error) => Err(multipart_error(error, limit)),
        },
        Err(error) => Err(error),
    };
    if let Err(error) = received {
        if matches!(error, ApiError::Store(_)) {
            state
                .metrics
                .store_errors
                .get_or_create(&ObjectLabels { kind: "input" })
                .inc();
        }
        upload.abort().await;
        return Err(error);
    }
    let mut timings = Timings {
        upload: millis(started),
        ..Timings::default()
    };
    let input_bytes = upload.bytes();
    state.metrics.stage("upload", timings.upload / 1000.0);

    // A file that does not decode is refused before its upload is committed, so it leaves
    // nothing behind; then the store commits the upload while the model runs.
    let input = match decode(state, buffer.freeze(), &mut timings).await {
        Ok(input) => input,
        Err(error) => {
            upload.abort().await;
            return Err(error);
        }
    };
    // Admission next: a full queue refuses before anything is committed.
    let reply = match state.queue.submit(input.0) {
        Ok(reply) => reply,
        Err(full) => {
            upload.abort().await;
            return Err(ApiError::Overloaded(full.capacity));
        }
    };
    let stored = tokio::spawn(upload.finish());
    let result = infer(state, reply, &mut timings).await;
    let stored = stored
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let (input, original) = match (result, stored) {
        (Ok(depth), Ok(size)) => {
            state
                .metrics
                .stored_bytes
                .get_or_create(&ObjectLabels { kind: "input" })
                .inc_by(size);
            (depth, input.1)
        }
        (_, Err(error)) => {
            state
                .metrics
                .store_errors
                .get_or_create(&ObjectLabels { kind: "input" })
                .inc();
            return Err(error.into());
        }
        (Err(error), Ok(_)) => return Err(error),
    };

    // Post-process (colourise and resize) before answering, so its time is in the header.
    let postprocess_started = Instant::now();
    let permit = state
        .pixel_work
        .acquire()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let chunks = tokio::task::spawn_blocking(move || pipeline::render(&input, original, options))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    drop(permit);
    timings.postprocess = millis(postprocess_started);
    state
        .metrics
        .stage("postprocess", timings.postprocess / 1000.0);

    let (sender, mut receiver) =
        tokio::sync::mpsc::channel::<Result<Bytes, BoxError>>(RESPONSE_PIPE_DEPTH);
    let output = state.store.begin(&names.output);
    let log = RequestLog {
        request_id: request_id.to_string(),
        peer,
        started,
        input_bytes,
        timings_header: timings.header(),
        input_object: names.input.clone(),
        output_object: names.output.clone(),
    };
    tokio::spawn(stream_output(
        chunks,
        output,
        sender,
        state.metrics.clone(),
        log,
    ));

    let body = async_stream::stream! {
        while let Some(item) = receiver.recv().await {
            yield item.map(Frame::data);
        }
    };
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(body)));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(options.format.content_type()),
    );
    let (input_key, output_key) = (
        state.store.object_key(&names.input),
        state.store.object_key(&names.output),
    );
    for (name, value) in [
        ("x-input-object", &input_key),
        ("x-output-object", &output_key),
        ("server-timing", &timings.header()),
    ] {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    }
    Ok(response)
}

/// Decodes and pre-processes on a blocking thread; returns the input and the original size.
async fn decode(
    state: &AppState,
    bytes: Bytes,
    timings: &mut Timings,
) -> Result<(NetInput, (u32, u32)), ApiError> {
    let started = Instant::now();
    let permit = state
        .pixel_work
        .acquire()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let limits = state.limits;
    let decoded =
        tokio::task::spawn_blocking(move || -> Result<(NetInput, (u32, u32)), ApiError> {
            let image = pipeline::decode(&bytes, &limits)?;
            let original = image.dimensions();
            Ok((pipeline::preprocess(&image), original))
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    drop(permit);
    timings.decode = millis(started);
    state.metrics.stage("decode", timings.decode / 1000.0);
    decoded
}

/// Waits for the model's thread to run a queued input.
async fn infer(
    state: &AppState,
    reply: Reply,
    timings: &mut Timings,
) -> Result<pipeline::DepthMap, ApiError> {
    let inference = reply
        .await
        .map_err(|_| ApiError::Internal("the inference thread stopped".to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    timings.queue = inference.queued.as_secs_f64() * 1000.0;
    timings.forward = inference.forward.as_secs_f64() * 1000.0;
    state.metrics.stage("queue", inference.queued.as_secs_f64());
    state
        .metrics
        .stage("forward", inference.forward.as_secs_f64());
    Ok(inference.depth)
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

/// Encodes on a blocking thread and forwards each chunk to the store and the client. The last
/// chunk is held back until the output object is committed.
async fn stream_output(
    chunks: pipeline::EncodedChunks,
    mut output: Upload,
    client: tokio::sync::mpsc::Sender<Result<Bytes, BoxError>>,
    metrics: super::Metrics,
    log: RequestLog,
) {
    let (encoded_sender, mut encoded) =
        tokio::sync::mpsc::channel::<Result<Bytes, pipeline::EncodeError>>(RESPONSE_PIPE_DEPTH);
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
        if let Err(error) = output.write(chunk.clone()).await {
            failure = Some(error.to_string());
            break;
        }
        if let Some(previous) = held.replace(chunk)
            && client_open
        {
            client_open = client.send(Ok(previous)).await.is_ok();
        }
    }
    let _ = encoder.await;
    let encode_ms = millis(encode_started);
    metrics.stage("encode", encode_ms / 1000.0);
    let result = match failure {
        Some(error) => {
            output.abort().await;
            Err(error)
        }
        None => output.finish().await.map_err(|e| e.to_string()),
    };
    match result {
        Ok(size) => {
            metrics
                .stored_bytes
                .get_or_create(&ObjectLabels { kind: "output" })
                .inc_by(size);
            if let Some(last) = held
                && client_open
            {
                client_open = client.send(Ok(last)).await.is_ok();
            }
            tracing::info!(
                request_id = %log.request_id,
                method = "POST",
                path = "/predict",
                status = 200,
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
            metrics
                .store_errors
                .get_or_create(&ObjectLabels { kind: "output" })
                .inc();
            tracing::error!(request_id = %log.request_id, %error, "storing the prediction failed; the response is cut short");
            let _ = client.send(Err(error.into())).await;
        }
    }
}
