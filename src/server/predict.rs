//! `POST /predict`, as a request's life in four steps:
//!
//! 1. **admission**, before a byte of the body is read: a full queue or a dead model thread
//!    refuses at once, and the body's bytes are taken from the memory budget;
//! 2. **intake** ([`super::intake`]): the upload streams into the store and a buffer, its
//!    header checked as soon as it is in;
//! 3. **inference**: decode (charged to the budget), queue for the model while the store
//!    commits the upload;
//! 4. **answer** ([`super::output`]): render, then `201 Created` with `Location:
//!    /predictions/<id>`, the encoded image streamed to the client and into the store at once.
//!
//! The upload is an [`crate::storage::Upload`], which aborts when dropped: any early return
//! (a `?` anywhere, a client that disconnects and so drops this future) leaves nothing stored.
//! The 201 goes out only once the input object is committed (no false success), and the
//! response's last chunk only once the output object is.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response};

use super::budget::BodyCharge;
use super::connection::Activity;
use super::error::ApiError;
use super::inference::{Reply, SubmitError};
use super::intake::{self, Received, RequestOptions};
use super::output::{self, Answer, Timings, millis};
use super::{AppState, Body};
use crate::budget::decode_bytes;
use crate::pipeline::{self, ImageHeader, NetInput, PointSamples, RenderOptions};

/// Answers `POST /predict`, turning any failure into its JSON refusal.
pub async fn handle(
    state: &AppState,
    request: Request<Incoming>,
    request_id: &str,
    peer: SocketAddr,
    connection: &Activity,
) -> Response<Body> {
    let timeout = state.config.request_timeout();
    let responding = respond(state, request, request_id, peer, connection);
    match tokio::time::timeout(timeout, responding).await {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            tracing::debug!(request_id, %error, "refused");
            error.into_response(request_id)
        }
        Err(_) => ApiError::Timeout(timeout).into_response(request_id),
    }
}

async fn respond(
    state: &AppState,
    request: Request<Incoming>,
    request_id: &str,
    peer: SocketAddr,
    connection: &Activity,
) -> Result<Response<Body>, ApiError> {
    let started = Instant::now();
    let options = RequestOptions::from_query(request.uri().query(), state.default_options)?;
    // Refused before the body is read when the query alone is wrong.
    options.finish(&state.config.cloud.defaults())?;
    let _slot = connection.upload_slot().ok_or(ApiError::TooManyUploads(
        state.config.max_uploads_per_connection,
    ))?;
    let mut body_charge = admit(state, &request).await?;
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let limit = state.config.max_body_bytes;
    let received = intake::receive(
        state,
        intake::Form {
            incoming: request.into_body(),
            content_type: &content_type,
            limit,
            charge: &mut body_charge,
        },
        request_id,
        options,
    )
    .await?;
    let mut timings = Timings {
        upload: millis(started),
        ..Timings::default()
    };
    state.metrics.stage("upload", timings.upload / 1000.0);
    let input_bytes = received.upload.bytes();
    let options = received.options;
    let inferred = infer(state, received, body_charge, &mut timings).await?;
    output::answer(
        state,
        Answer {
            depth: inferred.depth,
            header: inferred.upright,
            samples: inferred.samples,
            options,
            request_id: request_id.to_string(),
            input_object: inferred.input_object,
            input_bytes,
            peer,
            started,
        },
        timings,
    )
    .await
}

/// Refuses at the edge, before the body is read, what would be refused after it; then takes
/// the body's bytes from the memory budget: its declared length, or, for a body sent without
/// one, a first step that grows as the bytes arrive ([`BodyCharge::cover`]).
async fn admit(state: &AppState, request: &Request<Incoming>) -> Result<BodyCharge, ApiError> {
    state.queue.admits().map_err(|error| match error {
        SubmitError::Full { capacity } => ApiError::Overloaded(capacity),
        SubmitError::Stopped => ApiError::ModelUnavailable,
    })?;
    let limit = state.config.max_body_bytes;
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(ApiError::BodyTooLarge(limit));
    }
    BodyCharge::new(&state.budget, declared).await
}

/// What the steps before the answer leave for it.
struct Inferred {
    depth: pipeline::DepthMap,
    /// The upright image's header (the output's size).
    upright: ImageHeader,
    /// A point cloud's colours and camera, taken from the decoded image.
    samples: Option<PointSamples>,
    /// The committed input's object name.
    input_object: String,
}

/// Decodes, then runs the model while the store commits the upload.
async fn infer(
    state: &AppState,
    received: Received,
    body_charge: BodyCharge,
    timings: &mut Timings,
) -> Result<Inferred, ApiError> {
    let Received {
        header,
        bytes,
        upload,
        options,
    } = received;
    // A file that does not decode is refused before its upload is committed (dropping the
    // upload aborts it), so it leaves nothing behind.
    let decoded = decode(state, bytes, header, options, timings).await?;
    drop(body_charge);
    let reply = state
        .queue
        .submit(decoded.input)
        .map_err(|error| match error {
            SubmitError::Full { capacity } => ApiError::Overloaded(capacity),
            SubmitError::Stopped => ApiError::ModelUnavailable,
        })?;
    let object = upload.name().to_string();
    let (stored, depth) = tokio::join!(upload.finish(), wait_for_model(state, reply, timings));
    match stored {
        Ok(size) => state.metrics.stored("input", size),
        Err(error) => {
            state.metrics.store_error("input");
            return Err(error.into());
        }
    }
    Ok(Inferred {
        depth: depth?,
        upright: decoded.upright,
        samples: decoded.samples,
        input_object: object,
    })
}

/// A decoded image reduced to what the next steps need.
struct Decoded {
    input: NetInput,
    upright: ImageHeader,
    samples: Option<PointSamples>,
}

/// Decodes and pre-processes on a blocking thread, holding the decode's share of the budget;
/// a point cloud's samples are taken from the image before it is dropped.
async fn decode(
    state: &AppState,
    bytes: Bytes,
    header: ImageHeader,
    options: RenderOptions,
    timings: &mut Timings,
) -> Result<Decoded, ApiError> {
    let started = Instant::now();
    let pixels = u64::from(header.width) * u64::from(header.height);
    let _share = state
        .budget
        .reserve(decode_bytes(pixels), "decoded image")
        .await?;
    let _worker = state
        .pixel_work
        .acquire()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let limits = state.limits;
    let (kind, transform) = (state.model.kind, state.model.transform);
    let cloud = state.config.cloud.defaults();
    let decoded = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let image = pipeline::decode_checked(&bytes, &header, &limits)?;
        let upright = ImageHeader {
            width: image.width(),
            height: image.height(),
            ..header
        };
        let samples = pipeline::point_samples(&image, &bytes, &options, &cloud, kind);
        Ok(Decoded {
            input: pipeline::preprocess(&image, kind, transform),
            upright,
            samples,
        })
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    timings.decode = millis(started);
    state.metrics.stage("decode", timings.decode / 1000.0);
    Ok(decoded)
}

/// Waits for the model's thread to run a queued input.
async fn wait_for_model(
    state: &AppState,
    reply: Reply,
    timings: &mut Timings,
) -> Result<pipeline::DepthMap, ApiError> {
    let inference = reply
        .await
        .map_err(|_| ApiError::ModelUnavailable)?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    timings.queue = inference.queued.as_secs_f64() * 1000.0;
    timings.forward = inference.forward.as_secs_f64() * 1000.0;
    state.metrics.stage("queue", inference.queued.as_secs_f64());
    state
        .metrics
        .stage("forward", inference.forward.as_secs_f64());
    Ok(inference.depth)
}
