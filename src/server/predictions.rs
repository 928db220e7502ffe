//! `GET /predictions/<id>`: a stored prediction, streamed back from the store. A client whose
//! response broke off fetches its result here instead of running the model again. Objects
//! never change once stored, so the id is a strong `ETag` and the response is immutable.

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{
    CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, ETAG, HeaderValue, IF_NONE_MATCH,
};
use hyper::{Request, Response, StatusCode};

use super::error::ApiError;
use super::names::prediction_name;
use super::pipe::{CHUNK_BYTES, pipe};
use super::responses::full;
use super::{AppState, Body, BoxError};
use crate::pipeline::OutputFormat;
use crate::storage::StoreError;

/// The path prefix of the route.
pub const PREFIX: &str = "/predictions/";

/// Chunks of a stored object queued for a client at once.
const PIPE_DEPTH: usize = 2;

/// What one stream is charged: the queued chunks, the one hyper holds while the client's
/// window lets it through, and the one being read from the store.
const PIPE_BYTES: u64 = ((PIPE_DEPTH + 2) * CHUNK_BYTES) as u64;

/// Answers `GET` (or `HEAD`) `/predictions/<id>`.
pub async fn handle(
    state: &AppState,
    request: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let path = request.uri().path();
    let id = path.strip_prefix(PREFIX).unwrap_or_default();
    let unknown = || ApiError::UnknownPrediction(id.to_string());
    let etag = format!("\"{id}\"");
    // Each extension once (png16 is stored as .png), the most common first.
    let mut found = None;
    for format in [OutputFormat::Png, OutputFormat::Ply, OutputFormat::Npy] {
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
        .get_all(IF_NONE_MATCH)
        .iter()
        .any(|value| none_match_hits(value.as_bytes(), &etag))
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
        let share = state
            .budget
            .reserve(PIPE_BYTES, "streamed prediction")
            .await?;
        let (sender, body) = pipe(PIPE_DEPTH, state.config.send_timeout(), share);
        tokio::spawn(async move {
            loop {
                let item = match object.next_chunk().await {
                    Ok(Some(chunk)) => Ok(chunk),
                    Ok(None) => break,
                    Err(error) => Err(Box::new(error) as BoxError),
                };
                let last = item.is_err();
                if !sender.send(item).await || last {
                    return;
                }
            }
            sender.finish().await;
        });
        let mut response = Response::new(body);
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

/// Whether an `If-None-Match` value names `etag`, by RFC 9110's weak comparison: `*`, or any
/// entity tag in the comma-separated list equal to it once a `W/` prefix is set aside.
fn none_match_hits(value: &[u8], etag: &str) -> bool {
    let Ok(value) = std::str::from_utf8(value) else {
        return false;
    };
    value.trim() == "*"
        || value.split(',').any(|tag| {
            let tag = tag.trim();
            tag.strip_prefix("W/").unwrap_or(tag) == etag
        })
}

#[cfg(test)]
mod tests {
    use super::none_match_hits;

    #[test]
    fn if_none_match_uses_weak_comparison() {
        let etag = "\"20251125-abc\"";
        for hit in [
            "\"20251125-abc\"",
            "W/\"20251125-abc\"",
            "*",
            " \"x\", W/\"20251125-abc\" ",
            "\"x\",\"20251125-abc\"",
        ] {
            assert!(none_match_hits(hit.as_bytes(), etag), "{hit}");
        }
        for miss in ["\"x\"", "20251125-abc", "W/\"20251125-ab\"", "", "\"x\", *"] {
            assert!(!none_match_hits(miss.as_bytes(), etag), "{miss}");
        }
    }
}
