//! Reading a `/predict` form: the image is streamed into the store and a buffer while it
//! arrives, and its header is checked as soon as it is in, so an image over the limits is
//! refused before the rest of it is read.
//!
//! The image is the first part that carries a file name, whatever the field's name (`file`
//! for our own page and clients, `image` for the replaced service's); text parts named as the
//! query's options (`colormap`, `format`, the point cloud's) set them as the query does;
//! anything else is refused.

use bytes::{Bytes, BytesMut};
use futures_util::TryStreamExt;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use multer::{Constraints, Field, Multipart, SizeLimit};

use super::budget::BodyCharge;
use super::error::ApiError;
use super::names::upload_name;
use super::{AppState, BoxError};
use crate::pipeline::{
    self, CloudDefaults, CloudOptions, HeaderProbe, ImageFormat, ImageHeader, OutputFormat,
    RenderOptions,
};
use crate::storage::Upload;

/// Longest value of a text option part.
const MAX_OPTION_BYTES: usize = 64;

/// A received image, buffered whole and streamed into the store (not yet committed).
pub struct Received {
    /// The header, checked against the limits.
    pub header: ImageHeader,
    /// The file's bytes.
    pub bytes: Bytes,
    /// The upload of the file into the store; dropping it leaves nothing stored.
    pub upload: Upload,
    /// The query's options, overridden by the form's text parts.
    pub options: RenderOptions,
}

/// A request's options as it names them, in its query and then its form's text parts, over
/// the server's defaults.
#[derive(Clone, Copy, Debug)]
pub struct RequestOptions {
    options: RenderOptions,
    /// A colour map was named (which a point cloud, coloured by the photo, refuses).
    colormap_named: bool,
}

impl RequestOptions {
    /// The options a query string sets over the server's `defaults`; anything unknown is
    /// refused.
    pub fn from_query(query: Option<&str>, defaults: RenderOptions) -> Result<Self, ApiError> {
        let mut options = Self {
            options: defaults,
            colormap_named: false,
        };
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            options.apply(key, value)?;
        }
        Ok(options)
    }

    /// Whether a form's text part may be named `name`.
    fn is_option(name: &str) -> bool {
        matches!(name, "colormap" | "format") || CloudOptions::NAMES.contains(&name)
    }

    /// Applies one option, from the query or a form field.
    fn apply(&mut self, key: &str, value: &str) -> Result<(), ApiError> {
        match key {
            "colormap" => {
                self.options.colormap = pipeline::Colormap::from_name(value).ok_or_else(|| {
                    ApiError::BadQuery(format!(
                        "unknown colormap {value:?}; use inferno, viridis or gray"
                    ))
                })?;
                self.colormap_named = true;
            }
            "format" => {
                self.options.format = OutputFormat::from_name(value).ok_or_else(|| {
                    ApiError::BadQuery(format!(
                        "unknown format {value:?}; use png, png16, npy or ply"
                    ))
                })?;
            }
            other => {
                let known = self
                    .options
                    .cloud
                    .set(other, value)
                    .map_err(|e| ApiError::BadQuery(e.to_string()))?;
                if !known {
                    return Err(ApiError::BadQuery(format!(
                        "unknown query parameter {other:?}; use colormap, format or, for \
                         format=ply, {}",
                        CloudOptions::NAMES.join(", ")
                    )));
                }
            }
        }
        Ok(())
    }

    /// The options, checked against each other and the server's point-cloud bounds.
    pub fn finish(self, cloud: &CloudDefaults) -> Result<RenderOptions, ApiError> {
        if self.options.format == OutputFormat::Ply && self.colormap_named {
            return Err(ApiError::BadQuery(
                "colormap: a point cloud (format=ply) is coloured by the photo; leave colormap out"
                    .to_string(),
            ));
        }
        self.options
            .cloud
            .validate(cloud)
            .map_err(|e| ApiError::BadQuery(e.to_string()))?;
        Ok(self.options)
    }
}

/// A `/predict` request's body, as it arrives.
pub struct Form<'a> {
    /// The body.
    pub incoming: Incoming,
    /// Its `Content-Type` (the boundary is in it).
    pub content_type: &'a str,
    /// The most bytes it may have.
    pub limit: u64,
    /// Its share of the memory budget, grown as the file arrives.
    pub charge: &'a mut BodyCharge,
}

/// Reads the form of request `request_id`.
pub async fn receive(
    state: &AppState,
    form: Form<'_>,
    request_id: &str,
    mut options: RequestOptions,
) -> Result<Received, ApiError> {
    let Form {
        incoming: body,
        content_type,
        limit,
        charge,
    } = form;
    let boundary = multer::parse_boundary(content_type).map_err(|_| {
        ApiError::NotMultipart(format!(
            "expected a multipart/form-data body with a boundary, got content type {content_type:?}"
        ))
    })?;
    // Content-Length alone does not bound a chunked body: the stream itself is limited.
    let body = Limited::new(body, limit as usize)
        .into_data_stream()
        .map_err(|e| -> BoxError { e });
    let constraints =
        Constraints::new().size_limit(SizeLimit::new().whole_stream(limit).per_field(limit));
    let mut multipart = Multipart::with_constraints(body, boundary, constraints);
    let mut file: Option<(ImageHeader, Bytes, Upload)> = None;
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| multipart_error(e, limit))?
    {
        let name = field.name().unwrap_or_default().to_string();
        match file_name(&field) {
            // A file input left empty: browsers send the part with an empty name.
            Some(file_name) if file_name.is_empty() => drain(field, limit).await?,
            Some(_) if file.is_some() => return Err(ApiError::UnexpectedField(name)),
            Some(file_name) => {
                let part = FilePart {
                    field,
                    file_name: &file_name,
                    limit,
                    charge: &mut *charge,
                };
                file = Some(receive_file(state, part, request_id).await?);
            }
            None if RequestOptions::is_option(&name) => {
                let value = option_text(field, limit).await?;
                options.apply(&name, &value)?;
            }
            None => return Err(ApiError::UnexpectedField(name)),
        }
    }
    let (header, bytes, upload) = file.ok_or(ApiError::MissingFile)?;
    Ok(Received {
        header,
        bytes,
        upload,
        options: options.finish(&state.config.cloud.defaults())?,
    })
}

/// The part's file name: RFC 7578 allows a client to send it as `filename*` (RFC 5987:
/// `charset'language'percent-encoded`), which is preferred when present; else `filename`.
fn file_name(field: &Field<'static>) -> Option<String> {
    let extended = field
        .headers()
        .get(hyper::header::CONTENT_DISPOSITION)
        .and_then(|value| value.to_str().ok())
        .and_then(extended_file_name);
    extended.or_else(|| field.file_name().map(str::to_string))
}

/// The value of a `filename*` parameter in a `Content-Disposition` header, decoded; `None`
/// when there is none or it is malformed (an unknown charset, bad UTF-8).
fn extended_file_name(disposition: &str) -> Option<String> {
    let value = disposition.split(';').find_map(|parameter| {
        let (name, value) = parameter.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("filename*")
            .then(|| value.trim().trim_matches('"'))
    })?;
    let mut parts = value.splitn(3, '\'');
    let (charset, _language, encoded) = (parts.next()?, parts.next()?, parts.next()?);
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(encoded).collect();
    if charset.eq_ignore_ascii_case("utf-8") {
        String::from_utf8(bytes).ok()
    } else if charset.eq_ignore_ascii_case("iso-8859-1") {
        Some(bytes.into_iter().map(char::from).collect())
    } else {
        None
    }
}

/// The form's file part, on its way in.
struct FilePart<'a> {
    field: Field<'static>,
    file_name: &'a str,
    limit: u64,
    charge: &'a mut BodyCharge,
}

/// Streams one file part into the store and a buffer, checking its header on the way and
/// charging its bytes to the budget as they arrive.
async fn receive_file(
    state: &AppState,
    part: FilePart<'_>,
    request_id: &str,
) -> Result<(ImageHeader, Bytes, Upload), ApiError> {
    let FilePart {
        mut field,
        file_name,
        limit,
        charge,
    } = part;
    let extension = file_name
        .rsplit_once('.')
        .map(|(_, e)| e)
        .unwrap_or_default();
    let declared = ImageFormat::from_extension(extension)
        .ok_or_else(|| ApiError::DisallowedExtension(file_name.to_string()))?;
    let object = upload_name(request_id, file_name)
        .ok_or_else(|| ApiError::Internal(format!("malformed request id {request_id:?}")))?;
    let mut upload = state.store.begin(&object);
    let mut buffer = BytesMut::new();
    let mut probe = HeaderProbe::new();
    let mut header = None;
    while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, limit))? {
        buffer.extend_from_slice(&chunk);
        charge.cover(buffer.len() as u64).await?;
        if header.is_none() {
            header = check_header(state, &mut probe, &buffer, false, declared)?;
        }
        upload.write(chunk).await.inspect_err(|_| {
            state.metrics.store_error("input");
        })?;
    }
    if buffer.is_empty() {
        return Err(ApiError::EmptyFile);
    }
    let header = match header {
        Some(header) => header,
        None => {
            check_header(state, &mut probe, &buffer, true, declared)?.ok_or(ApiError::EmptyFile)?
        }
    };
    Ok((header, buffer.freeze(), upload))
}

/// The image header, once enough bytes have arrived; checks type and pixel budget.
fn check_header(
    state: &AppState,
    probe: &mut HeaderProbe,
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
    let Some(header) = probe.advance(bytes, complete)? else {
        return Ok(None);
    };
    state.limits.check(&header)?;
    Ok(Some(header))
}

/// The value of a text option part, refused beyond a few bytes.
async fn option_text(mut field: Field<'static>, limit: u64) -> Result<String, ApiError> {
    let name = field.name().unwrap_or_default().to_string();
    let mut value = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, limit))? {
        value.extend_from_slice(&chunk);
        if value.len() > MAX_OPTION_BYTES {
            return Err(ApiError::BadQuery(format!(
                "the form field {name:?} is longer than {MAX_OPTION_BYTES} bytes"
            )));
        }
    }
    String::from_utf8(value)
        .map_err(|_| ApiError::BadQuery(format!("the form field {name:?} is not UTF-8")))
}

/// Reads a part to its end, discarding it.
async fn drain(mut field: Field<'static>, limit: u64) -> Result<(), ApiError> {
    while field
        .chunk()
        .await
        .map_err(|e| multipart_error(e, limit))?
        .is_some()
    {}
    Ok(())
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
        _ => ApiError::BadMultipart(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::extended_file_name;

    #[test]
    fn extended_file_names_are_decoded() {
        let header = "form-data; name=\"image\"; filename*=UTF-8''caf%C3%A9%20photo.jpg";
        assert_eq!(
            extended_file_name(header).as_deref(),
            Some("café photo.jpg")
        );
        let latin = "form-data; name=\"image\"; FILENAME*=iso-8859-1'en'caf%E9.png";
        assert_eq!(extended_file_name(latin).as_deref(), Some("café.png"));
        for bad in [
            "form-data; name=\"image\"; filename=\"a.png\"",
            "form-data; filename*=UTF-8''%FF.png",
            "form-data; filename*=koi8-r''a.png",
            "form-data; filename*=a.png",
        ] {
            assert_eq!(extended_file_name(bad), None, "{bad}");
        }
    }
}
