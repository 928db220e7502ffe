//! `GET /openapi.json` against the server that serves it: the document is valid OpenAPI 3.1,
//! real answers on every route match it, and schemathesis's generated requests (valid and
//! hostile) get only answers it describes. The checking is `openapi_check.py`, beside this file, run with
//! the Python that `scripts/test.sh` provides (schemathesis, openapi-spec-validator).

use crate::support;

use std::process::Command;

use support::server::Server;

#[test]
fn the_openapi_document_describes_the_server_that_serves_it() {
    let store = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let server = Server::start(
        &[
            "--store",
            store.path().to_str().unwrap(),
            "--max-points",
            "100000",
            "--default-points",
            "20000",
            "--default-colormap",
            "viridis",
        ],
        &[],
    );

    // What the flags decide is in the document.
    let document: serde_json::Value = support::get(server.url("/openapi.json"))
        .unwrap()
        .json()
        .unwrap();
    let parameters = &document["components"]["parameters"];
    assert_eq!(parameters["points"]["schema"]["maximum"], 100_000);
    assert_eq!(parameters["points"]["schema"]["default"], 20_000);
    assert_eq!(parameters["colormap"]["schema"]["default"], "viridis");
    assert_eq!(document["info"]["version"], env!("CARGO_PKG_VERSION"));

    let python = support::python();
    let output = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/service/openapi_check.py"
        ))
        .arg(format!("http://{}", server.addr))
        .arg(support::fixture(""))
        .arg(work.path())
        .output()
        .unwrap_or_else(|e| panic!("{python} runs (scripts/test.sh installs schemathesis): {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the server's answers differ from its OpenAPI document:\n{stdout}\n{stderr}"
    );
    // The last line lists the real answers checked: a success and refusals on every route.
    let checked: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    let checked: Vec<&str> = checked["checked"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for expected in [
        "POST /predict 201",
        "POST /predict 400",
        "POST /predict 415",
        "POST /predict 422",
        "GET /predictions/{id} 200",
        "GET /predictions/{id} 304",
        "GET /predictions/{id} 404",
        "HEAD /predictions/{id} 200",
        "GET / 200",
        "GET /openapi.json 200",
        "GET /healthz 200",
        "GET /readyz 200",
        "GET /metrics 200",
    ] {
        assert!(
            checked.contains(&expected),
            "{expected} not checked: {checked:?}"
        );
    }
    assert!(
        stdout.contains("generated") && !stdout.contains(" 0 generated"),
        "schemathesis generated no requests:\n{stdout}"
    );
}
