//! The deployment files are well-formed: `cloudbuild.yaml` builds, pushes and deploys one image
//! with every substitution declared, and the Dockerfile runs the server as its entrypoint.

use std::collections::BTreeSet;

fn read(name: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(name)).unwrap()
}

/// `${_NAME}` and `$_NAME` references in a text.
fn user_substitutions(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let bytes = text.as_bytes();
    for (i, _) in text.match_indices('$') {
        let rest = &text[i + 1..];
        let (name, braced) = match rest.strip_prefix('{') {
            Some(inner) => (inner, true),
            None => (rest, false),
        };
        if !name.starts_with('_') {
            continue;
        }
        let end = name
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(name.len());
        if braced {
            assert_eq!(
                bytes.get(i + 2 + end),
                Some(&b'}'),
                "unterminated substitution at {i}"
            );
        }
        found.insert(name[..end].to_string());
    }
    found
}

#[test]
fn cloudbuild_builds_pushes_and_deploys_one_image() {
    let text = read("cloudbuild.yaml");
    let config: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("valid YAML");

    let declared: BTreeSet<String> = config["substitutions"]
        .as_mapping()
        .expect("substitutions")
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    let used = user_substitutions(&text);
    let undeclared: Vec<_> = used.difference(&declared).collect();
    assert!(
        undeclared.is_empty(),
        "used but not declared: {undeclared:?}"
    );
    let unused: Vec<_> = declared.difference(&used).collect();
    assert!(unused.is_empty(), "declared but never used: {unused:?}");

    let steps = config["steps"].as_sequence().expect("steps");
    let ids: Vec<&str> = steps.iter().map(|s| s["id"].as_str().unwrap()).collect();
    let position = |id: &str| {
        ids.iter()
            .position(|x| *x == id)
            .unwrap_or_else(|| panic!("no {id} step in {ids:?}"))
    };
    assert!(
        position("build") < position("push") && position("push") < position("deploy"),
        "{ids:?}"
    );

    let args = |id: &str| -> String {
        steps[position(id)]["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let image = "${_REGION}-docker.pkg.dev/$PROJECT_ID/${_REPOSITORY}/midas-serve";
    let build = args("build");
    assert!(
        build.contains(&format!("--tag={image}:$SHORT_SHA"))
            && build.contains(&format!("--tag={image}:latest")),
        "{build}"
    );
    assert!(
        build.contains(&format!("--cache-from={image}:latest")),
        "{build}"
    );
    assert!(args("push").contains(image));
    let deploy = args("deploy");
    assert!(
        deploy.contains("gcloud run deploy")
            && deploy.contains(&format!("--image={image}:$SHORT_SHA")),
        "{deploy}"
    );
    for flag in [
        "--region=",
        "--memory=",
        "--cpu=",
        "--concurrency=",
        "--min-instances=",
        "--max-instances=",
        "--timeout=",
    ] {
        assert!(deploy.contains(flag), "deploy lacks {flag}");
    }
    // Traffic waits for readiness; a dead inference thread gets the instance replaced.
    let probe = |flag: &str| {
        deploy
            .split_whitespace()
            .find_map(|word| word.strip_prefix(flag))
            .unwrap_or_else(|| panic!("deploy lacks {flag}"))
            .split(',')
            .map(|pair| pair.split_once('=').expect("KEY=VALUE"))
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect::<std::collections::BTreeMap<String, String>>()
    };
    let startup = probe("--startup-probe=");
    assert_eq!(startup["httpGet.path"], "/readyz");
    let window: u64 = startup["periodSeconds"].parse::<u64>().unwrap()
        * startup["failureThreshold"].parse::<u64>().unwrap();
    assert!(
        window <= 240,
        "Cloud Run allows a start-up window of 240 s, not {window}"
    );
    let liveness = probe("--liveness-probe=");
    assert_eq!(liveness["httpGet.path"], "/healthz");
    // HTTP probes need HTTP/1.1 between Cloud Run and the container.
    assert!(!deploy.contains("--use-http2"), "{deploy}");

    // The batch job: the same image, `midas-serve batch` as its command, every knob a
    // substitution.
    assert!(position("push") < position("deploy-job"), "{ids:?}");
    let job = args("deploy-job");
    assert!(
        job.contains("gcloud run jobs deploy ${_JOB}")
            && job.contains(&format!("--image={image}:$SHORT_SHA"))
            && job.contains("--command=/usr/local/bin/midas-serve")
            && job.contains("--args=batch"),
        "{job}"
    );
    for flag in [
        "--region=${_REGION}",
        "--tasks=${_JOB_TASKS}",
        "--parallelism=${_JOB_PARALLELISM}",
        "--max-retries=${_JOB_MAX_RETRIES}",
        "--task-timeout=${_JOB_TASK_TIMEOUT}",
        "--memory=${_JOB_MEMORY}",
        "--cpu=${_JOB_CPU}",
        "MIDAS_BATCH_INPUT=gs://${_BUCKET}/${_JOB_INPUT}",
        "MIDAS_BATCH_OUTPUT=gs://${_BUCKET}/${_JOB_OUTPUT}",
    ] {
        assert!(job.contains(flag), "the job step lacks {flag}");
    }

    let images: Vec<&str> = config["images"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap())
        .collect();
    assert!(images.contains(&format!("{image}:$SHORT_SHA").as_str()));
    assert!(config["options"]["machineType"].as_str().is_some());
    assert!(config["timeout"].as_str().unwrap().ends_with('s'));
    // Far below the original service's 8 GiB.
    assert_eq!(config["substitutions"]["_MEMORY"].as_str(), Some("768Mi"));
}

#[test]
fn dockerfile_runs_the_server_directly() {
    let text = read("Dockerfile");
    // Exec form, so SIGTERM reaches the binary rather than a shell.
    assert_eq!(
        text.matches("ENTRYPOINT [\"/usr/local/bin/midas-serve\", \"serve\"]")
            .count(),
        2
    );
    assert!(text.contains("FROM gcr.io/distroless/cc-debian12:nonroot AS runtime-cpu"));
    assert!(
        text.trim_end()
            .lines()
            .rev()
            .find(|l| l.starts_with("FROM "))
            .unwrap()
            .contains("runtime-cpu"),
        "the CPU image is the default target"
    );
    assert!(text.contains("cargo chef cook") && text.contains("--profile dist"));
}
