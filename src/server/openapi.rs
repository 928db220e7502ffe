//! `GET /openapi.json`: the OpenAPI 3.1 description of the API, for clients that generate code
//! from it. The document is written by hand (`openapi.json`, beside this file) and kept true by
//! `tests/service/openapi.rs`, which validates it and checks the server's real answers against it. What
//! the flags decide (the colour map by default, the point-cloud defaults and bounds) is filled
//! in at start-up, so the document describes the server that serves it.

use serde_json::{Value, json};

use crate::config::ServeArgs;
use crate::pipeline::DEFAULT_FOV_DEGREES;

const DOCUMENT: &str = include_str!("openapi.json");

/// The document for a server started with `config`.
pub fn render(config: &ServeArgs) -> String {
    // The text is part of the binary and parsed by this module's test: it cannot fail at run time.
    let mut document: Value = serde_json::from_str(DOCUMENT).unwrap_or_default();
    document["info"]["version"] = json!(env!("CARGO_PKG_VERSION"));
    let cloud = config.cloud.defaults();
    let parameters = &mut document["components"]["parameters"];
    parameters["colormap"]["schema"]["default"] = json!(config.default_colormap.name());
    parameters["points"]["schema"]["maximum"] = json!(cloud.max_points);
    parameters["points"]["schema"]["default"] = json!(cloud.points);
    parameters["fov"]["description"] = json!(format!(
        "Point clouds: horizontal field of view in degrees, used when `fx` is not given and the \
         photo's EXIF has no `FocalLengthIn35mmFilm` (this server's default: {}; built in: {}).",
        cloud.fov, DEFAULT_FOV_DEGREES
    ));
    document.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::error::ApiError;

    #[test]
    fn the_document_is_json_with_every_route_and_option() {
        let document: Value = serde_json::from_str(DOCUMENT).expect("openapi.json parses");
        assert_eq!(document["openapi"], "3.1.0");
        let paths = document["paths"].as_object().expect("paths");
        for path in [
            "/",
            "/openapi.json",
            "/predict",
            "/predictions/{id}",
            "/healthz",
            "/readyz",
            "/metrics",
        ] {
            assert!(paths.contains_key(path), "{path} is not described");
        }
        let parameters = document["components"]["parameters"]
            .as_object()
            .expect("parameters");
        for name in ["colormap", "format"]
            .into_iter()
            .chain(crate::pipeline::CloudOptions::NAMES)
        {
            assert!(
                parameters.contains_key(name),
                "query option {name} is not described"
            );
        }
    }

    #[test]
    fn every_error_code_the_server_produces_is_in_the_document() {
        let document: Value = serde_json::from_str(DOCUMENT).expect("openapi.json parses");
        let codes: Vec<&str> = document["components"]["schemas"]["ErrorCode"]["enum"]
            .as_array()
            .expect("ErrorCode enum")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for error in ApiError::examples() {
            let (status, code) = error.status_and_code();
            assert!(
                codes.contains(&code),
                "{code} ({status}) is not in ErrorCode"
            );
            let described = document["components"]["schemas"]["ErrorCode"]["description"]
                .as_str()
                .unwrap_or_default();
            assert!(
                described.contains(&format!("`{code}` {}", status.as_u16())),
                "ErrorCode's description does not give {code} its status {status}"
            );
        }
    }
}
