//! The one place request failures become HTTP statuses: every refusal is a JSON body
//! `{"error": code, "message": ..., "request_id": ...}`.

use std::time::Duration;

use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};

use super::Body;
use super::responses::full;
use crate::budget::BudgetError;
use crate::pipeline::DecodeError;
use crate::storage::StoreError;

/// Why a request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No route for this path.
    #[error("no such path: {0}")]
    NotFound(String),
    /// The path exists but not for this method.
    #[error("method {method} is not allowed here; use {allowed}")]
    MethodNotAllowed {
        /// The method used.
        method: String,
        /// The methods the path accepts.
        allowed: &'static str,
    },
    /// The body is not `multipart/form-data` with a boundary.
    #[error("{0}")]
    NotMultipart(String),
    /// The multipart body is malformed.
    #[error("malformed multipart body: {0}")]
    BadMultipart(String),
    /// No part carries a file.
    #[error(
        "the form has no file part: send the image as a part with a filename (e.g. field 'file' or 'image')"
    )]
    MissingFile,
    /// A form field other than the one file and the `colormap` / `format` options.
    #[error(
        "unexpected form field {0:?}: send one file, plus optional 'colormap' and 'format' fields"
    )]
    UnexpectedField(String),
    /// The `file` part is empty.
    #[error("the uploaded file is empty")]
    EmptyFile,
    /// The file name's extension is not an accepted image type.
    #[error("file extension of {0:?} is not accepted; send a .jpg, .jpeg, .png or .webp image")]
    DisallowedExtension(String),
    /// The bytes are not the image type the file name declares.
    #[error("the file is named as {declared} but its content is {found}")]
    TypeMismatch {
        /// The type the extension declares.
        declared: String,
        /// What the bytes are.
        found: String,
    },
    /// The image could not be decoded.
    #[error(transparent)]
    Image(#[from] DecodeError),
    /// A query parameter has an unknown value.
    #[error("{0}")]
    BadQuery(String),
    /// The body exceeds the byte limit.
    #[error("the request body exceeds the limit of {0} bytes")]
    BodyTooLarge(u64),
    /// The client took longer than the request timeout.
    #[error("the request was not completed within {0:?}")]
    Timeout(Duration),
    /// The connection already has as many uploads in flight as it may.
    #[error(
        "this connection already has {0} uploads in flight; wait for one to finish or open another connection"
    )]
    TooManyUploads(usize),
    /// The inference queue is full.
    #[error("the model is busy: the queue of {0} requests is full; retry shortly")]
    Overloaded(usize),
    /// The inference thread has stopped; the instance is unhealthy.
    #[error("the model is not running on this instance; retry (another instance will answer)")]
    ModelUnavailable,
    /// No share of the memory budget: it stayed in use, or the request needs more than all of it.
    #[error(transparent)]
    Budget(#[from] BudgetError),
    /// The request head is larger than allowed.
    #[error("the request line and headers take {size} bytes, above the limit of {limit}")]
    HeadersTooLarge {
        /// Their size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// No stored prediction has this id.
    #[error("no prediction {0:?}")]
    UnknownPrediction(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Anything else that went wrong on our side.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// HTTP status and machine-readable code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::MethodNotAllowed { .. } => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::NotMultipart(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "not_multipart"),
            Self::BadMultipart(_) => (StatusCode::BAD_REQUEST, "bad_multipart"),
            Self::MissingFile => (StatusCode::BAD_REQUEST, "missing_file"),
            Self::UnexpectedField(_) => (StatusCode::BAD_REQUEST, "unexpected_field"),
            Self::EmptyFile => (StatusCode::BAD_REQUEST, "empty_file"),
            Self::DisallowedExtension(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_extension")
            }
            Self::TypeMismatch { .. } => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "type_mismatch"),
            Self::Image(error) => (
                match error {
                    DecodeError::UnsupportedFormat => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    DecodeError::TooManyPixels { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                    DecodeError::Truncated(_)
                    | DecodeError::Empty { .. }
                    | DecodeError::ExtremeAspectRatio { .. }
                    | DecodeError::Corrupt { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                },
                error.code(),
            ),
            Self::BadQuery(_) => (StatusCode::BAD_REQUEST, "bad_query"),
            Self::BodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            Self::Timeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            Self::TooManyUploads(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_uploads"),
            Self::Overloaded(_) => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            Self::ModelUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "model_unavailable"),
            Self::Budget(BudgetError::Busy(_)) => (StatusCode::SERVICE_UNAVAILABLE, "memory_busy"),
            Self::Budget(BudgetError::OverBudget { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "over_budget")
            }
            Self::HeadersTooLarge { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
            ),
            Self::UnknownPrediction(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Store(StoreError::Timeout(_)) => (StatusCode::GATEWAY_TIMEOUT, "store_timeout"),
            Self::Store(StoreError::Unreadable { .. }) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "store_unreadable")
            }
            Self::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// The JSON response for this error.
    pub fn into_response(self, request_id: &str) -> Response<Body> {
        let (status, code) = self.status_and_code();
        let body = serde_json::json!({ "error": code, "message": self.to_string(), "request_id": request_id });
        let mut response = full(status, "application/json", body.to_string());
        let headers = response.headers_mut();
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

#[cfg(test)]
impl ApiError {
    /// One error of every kind, decode, budget and store failures included, for the tests that
    /// check each code is documented. The `match` below makes a new variant a compile error
    /// here, so it cannot be left out by accident.
    pub(crate) fn examples() -> Vec<ApiError> {
        use crate::pipeline::ImageFormat;
        let decode = [
            DecodeError::UnsupportedFormat,
            DecodeError::Truncated(ImageFormat::Jpeg),
            DecodeError::TooManyPixels {
                width: 1,
                height: 1,
                pixels: 1,
                limit: 0,
            },
            DecodeError::ExtremeAspectRatio {
                width: 1,
                height: 1,
                limit: 1,
            },
            DecodeError::Empty {
                width: 0,
                height: 0,
            },
            DecodeError::Corrupt {
                format: ImageFormat::Png,
                message: String::new(),
            },
        ];
        let store = [
            StoreError::Unavailable(String::new()),
            StoreError::Timeout(Duration::ZERO),
            StoreError::Unreadable {
                name: String::new(),
                code: "",
                reason: String::new(),
            },
        ];
        let mut all = vec![
            Self::NotFound(String::new()),
            Self::MethodNotAllowed {
                method: String::new(),
                allowed: "",
            },
            Self::NotMultipart(String::new()),
            Self::BadMultipart(String::new()),
            Self::MissingFile,
            Self::UnexpectedField(String::new()),
            Self::EmptyFile,
            Self::DisallowedExtension(String::new()),
            Self::TypeMismatch {
                declared: String::new(),
                found: String::new(),
            },
            Self::BadQuery(String::new()),
            Self::BodyTooLarge(0),
            Self::Timeout(Duration::ZERO),
            Self::TooManyUploads(0),
            Self::Overloaded(0),
            Self::ModelUnavailable,
            Self::Budget(BudgetError::Busy(Duration::ZERO)),
            Self::Budget(BudgetError::OverBudget {
                purpose: "",
                bytes: 0,
                total: 0,
            }),
            Self::HeadersTooLarge { size: 0, limit: 0 },
            Self::UnknownPrediction(String::new()),
            Self::Internal(String::new()),
        ];
        all.extend(decode.into_iter().map(Self::Image));
        all.extend(store.into_iter().map(Self::Store));
        for error in &all {
            match error {
                Self::NotFound(_)
                | Self::MethodNotAllowed { .. }
                | Self::NotMultipart(_)
                | Self::BadMultipart(_)
                | Self::MissingFile
                | Self::UnexpectedField(_)
                | Self::EmptyFile
                | Self::DisallowedExtension(_)
                | Self::TypeMismatch { .. }
                | Self::Image(_)
                | Self::BadQuery(_)
                | Self::BodyTooLarge(_)
                | Self::Timeout(_)
                | Self::TooManyUploads(_)
                | Self::Overloaded(_)
                | Self::ModelUnavailable
                | Self::Budget(_)
                | Self::HeadersTooLarge { .. }
                | Self::UnknownPrediction(_)
                | Self::Store(_)
                | Self::Internal(_) => {}
            }
        }
        all
    }
}
