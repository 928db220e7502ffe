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
use super::intake::{self, Received};
use super::output::{self, Answer, Timings, millis};
use super::{AppState, Body};
use crate::budget::decode_bytes;
use crate::pipeline::{self, ImageHeader, NetInput};

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
    let options = intake::query_options(request.uri().query(), state.default_options)?;
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
    let (depth, header, input_object) = infer(state, received, body_charge, &mut timings).await?;
    output::answer(
        state,
        Answer {
            depth,
            header,
            options,
            request_id: request_id.to_string(),
            input_object,
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

/// Decodes, then runs the model while the store commits the upload; returns the depth map,
/// the upright image's header (the output's size) and the committed input's object name.
async fn infer(
    state: &AppState,
    received: Received,
    body_charge: BodyCharge,
    timings: &mut Timings,
) -> Result<(pipeline::DepthMap, ImageHeader, String), ApiError> {
    let Received {
        header,
        bytes,
        upload,
        ..
    } = received;
    // A file that does not decode is refused before its upload is committed (dropping the
    // upload aborts it), so it leaves nothing behind.
    let (input, upright) = decode(state, bytes, header, timings).await?;
    drop(body_charge);
    let reply = state.queue.submit(input).map_err(|error| match error {
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
    Ok((depth?, upright, object))
}

/// Decodes and pre-processes on a blocking thread, holding the decode's share of the budget;
/// returns the network's input and the upright image's header.
async fn decode(
    state: &AppState,
    bytes: Bytes,
    header: ImageHeader,
    timings: &mut Timings,
) -> Result<(NetInput, ImageHeader), ApiError> {
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
    let decoded = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let image = pipeline::decode_checked(&bytes, &header, &limits)?;
        let upright = ImageHeader {
            width: image.width(),
            height: image.height(),
            ..header
        };
        Ok((pipeline::preprocess(&image, kind, transform), upright))
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
