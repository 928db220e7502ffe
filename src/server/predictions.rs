//! `GET /predictions/<id>`: a stored prediction, streamed back from the store. A client whose
//! response broke off fetches its result here instead of running the model again. Objects
//! never change once stored, so the id is a strong `ETag` and the response is immutable.

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{
    CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, ETAG, HeaderValue, IF_NONE_MATCH,
};
use hyper::{Request, Response, StatusCode};

use super::error::ApiError;
use super::routes::full;
use super::{AppState, Body, BoxError};
use crate::pipeline::OutputFormat;
use crate::storage::{StoreError, prediction_name};

/// The path prefix of the route.
pub const PREFIX: &str = "/predictions/";

/// Answers `GET` (or `HEAD`) `/predictions/<id>`.
pub async fn handle(
    state: &AppState,
    request: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let path = request.uri().path();
    let id = path.strip_prefix(PREFIX).unwrap_or_default();
    let unknown = || ApiError::UnknownPrediction(id.to_string());
    let etag = format!("\"{id}\"");
    // The formats' extensions, most common first; npy is the only other one.
    let mut found = None;
    for format in [OutputFormat::Png, OutputFormat::Npy] {
        let name = prediction_name(id, format.extension()).ok_or_else(unknown)?;
        match state.store.open_object(&name).await {
            Ok(object) => {
                found = Some((format, object));
                break;
            }
            Err(StoreError::NotFound(_)) => {}
            Err(error) => return Err(error.into()),
        }
    }
    let (format, mut object) = found.ok_or_else(unknown)?;
    let content_type = format.content_type();
    let mut response = if request
        .headers()
        .get(IF_NONE_MATCH)
        .is_some_and(|value| value.as_bytes() == etag.as_bytes())
    {
        full(StatusCode::NOT_MODIFIED, content_type, Bytes::new())
    } else if request.method() == hyper::Method::HEAD {
        let mut response = full(StatusCode::OK, content_type, Bytes::new());
        if let Some(size) = object.size() {
            response
                .headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(size));
        }
        response
    } else {
        let size = object.size();
        // The reader is not `Sync`, which a response body must be: it runs in its own task,
        // which ends when the object does, when the client goes, or after a send timeout.
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<Result<Bytes, BoxError>>(2);
        let send_timeout = state.config.send_timeout();
        tokio::spawn(async move {
            loop {
                let item = match object.next_chunk().await {
                    Ok(Some(chunk)) => Ok(chunk),
                    Ok(None) => return,
                    Err(error) => Err(Box::new(error) as BoxError),
                };
                let last = item.is_err();
                let sent = tokio::time::timeout(send_timeout, sender.send(item)).await;
                if last || !matches!(sent, Ok(Ok(()))) {
                    return;
                }
            }
        });
        let body = async_stream::stream! {
            while let Some(item) = receiver.recv().await {
                yield item.map(Frame::data);
            }
        };
        let mut response = Response::new(BodyExt::boxed(StreamBody::new(body)));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Some(size) = size {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(size));
        }
        response
    };
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(ETAG, value);
    }
    headers.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    Ok(response)
}
