//! `midas-serve batch` as a Cloud Run job runs it: several task processes side by side over a
//! tree of real images (good, corrupt and not images at all), on local directories and on a
//! real Cloud Storage emulator, including tasks killed mid-run and a store that goes away.

use crate::support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::fixture;
use support::gcs::FakeGcs;

/// The good images of the tree: (name under the input, fixture it is a copy of).
const GOOD: [(&str, &str); 6] = [
    ("rocket.jpg", "rocket.jpg"),
    ("cats/chelsea.webp", "chelsea.webp"),
    ("cats/small/chelsea_small.png", "chelsea_small.png"),
    ("grey/camera_odd.png", "camera_odd.png"),
    ("grey/deeper/horse.PNG", "horse_rgba.png"),
    ("x/y/z/rocket_copy.jpeg", "rocket.jpg"),
];

/// Inputs with an image extension that are not images a decoder accepts, with the code
/// their manifest line must carry.
fn bad_inputs() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let mut truncated = image("camera_odd.png");
    truncated.truncate(5000);
    vec![
        (
            "broken.jpg",
            b"this is text, not a JPEG".to_vec(),
            "unsupported_image",
        ),
        ("cats/half.png", truncated, "truncated_image"),
        ("grey/empty.png", Vec::new(), "unsupported_image"),
    ]
}

/// Objects (or files) by `/`-separated name, with their bytes.
type Objects = BTreeMap<String, Vec<u8>>;

/// Files that are not images by name: ignored.
const OTHER: [&str; 2] = ["README.txt", "cats/labels.csv"];

fn image(name: &str) -> Vec<u8> {
    std::fs::read(fixture(&format!("images/{name}"))).unwrap()
}

fn output_name(input: &str) -> String {
    let (stem, _) = input.rsplit_once('.').unwrap();
    format!("{stem}.png")
}

/// Writes the tree under `root`.
fn write_tree(root: &Path) {
    for (name, source) in GOOD {
        write(&root.join(name), &image(source));
    }
    for (name, bytes, _) in bad_inputs() {
        write(&root.join(name), &bytes);
    }
    for name in OTHER {
        write(&root.join(name), b"not an image");
    }
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn midas() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_midas-serve"));
    command
        .env("MIDAS_LOG_FORMAT", "json")
        .env("RUST_LOG", "info,midas_serve::batch=debug")
        .env_remove("STORAGE_EMULATOR_HOST")
        .env_remove("CLOUD_RUN_TASK_INDEX")
        .env_remove("CLOUD_RUN_TASK_COUNT");
    command
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `midas-serve batch --input INPUT --output OUTPUT`, as task `index` of `count` (through
/// Cloud Run's variables), started and not waited for.
fn spawn_task(input: &str, output: &str, task: (usize, usize), env: &[(&str, &str)]) -> Child {
    midas()
        .args(["batch", "--input", input, "--output", output])
        .env("CLOUD_RUN_TASK_INDEX", task.0.to_string())
        .env("CLOUD_RUN_TASK_COUNT", task.1.to_string())
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts")
}

/// Runs one task over the whole input to its end; returns its summary after checking it
/// succeeded.
fn run_whole(input: &str, output: &str, env: &[(&str, &str)]) -> serde_json::Value {
    let finished = spawn_task(input, output, (0, 1), env);
    summary(&finished.wait_with_output().unwrap(), true)
}

/// Enough inputs (copies of three photos) for a task to be stopped mid-run: each input's name
/// (from `name(i, extension)`), its bytes, and the output name and bytes it must get.
fn many_inputs(
    predicted: &BTreeMap<&str, Vec<u8>>,
    name: impl Fn(usize, &str) -> String,
) -> (Vec<(String, Vec<u8>)>, Objects) {
    let sources = ["rocket.jpg", "chelsea.webp", "camera_odd.png"];
    let mut inputs = Vec::new();
    let mut expected = BTreeMap::new();
    for i in 0..30 {
        let source = sources[i % sources.len()];
        let extension = source.rsplit_once('.').unwrap().1;
        let input = name(i, extension);
        expected.insert(output_name(&input), predicted[source].clone());
        inputs.push((input, image(source)));
    }
    (inputs, expected)
}

/// The task's summary (its stdout), after checking how it exited.
fn summary(output: &Output, success: bool) -> serde_json::Value {
    assert_eq!(
        output.status.success(),
        success,
        "{}\n{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("a JSON summary on stdout: {}", text(&output.stderr)))
}

/// What `midas-serve predict` writes for each good fixture, by fixture name.
fn predicted() -> BTreeMap<&'static str, Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let mut command = midas();
    command.args(["predict", "--out-dir", dir.path().to_str().unwrap()]);
    let fixtures: Vec<&str> = {
        let mut names: Vec<&str> = GOOD.iter().map(|(_, f)| *f).collect();
        names.sort();
        names.dedup();
        names
    };
    for name in &fixtures {
        command.arg(fixture(&format!("images/{name}")));
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    fixtures
        .into_iter()
        .map(|name| {
            let stem = name.rsplit_once('.').unwrap().0;
            (
                name,
                std::fs::read(dir.path().join(format!("{stem}.png"))).unwrap(),
            )
        })
        .collect()
}

/// Every file under `root`, by `/`-separated relative name. A file that goes away between the
/// listing and its reading (a running task renaming its temporary file into place) is left out.
fn files(root: &Path) -> Objects {
    fn walk(dir: &Path, prefix: &str, found: &mut Objects) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let name = format!("{prefix}{}", entry.file_name().to_str().unwrap());
            if entry.file_type().unwrap().is_dir() {
                walk(&entry.path(), &format!("{name}/"), found);
            } else {
                match std::fs::read(entry.path()) {
                    Ok(bytes) => {
                        found.insert(name, bytes);
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                    Err(error) => panic!("cannot read {name}: {error}"),
                }
            }
        }
    }
    let mut found = BTreeMap::new();
    if root.exists() {
        walk(root, "", &mut found);
    }
    found
}

/// Manifest lines (records and summaries) of every manifest in `objects`.
fn manifests(objects: &Objects) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let (mut records, mut summaries) = (Vec::new(), Vec::new());
    for (name, bytes) in objects {
        if !name.starts_with("_manifests/") {
            continue;
        }
        assert!(name.ends_with(".jsonl"), "{name}");
        for line in text(bytes).lines() {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            match value.get("summary") {
                Some(summary) => summaries.push(summary.clone()),
                None => records.push(value),
            }
        }
    }
    (records, summaries)
}

/// Outputs only: the manifests and any leftover temporary file (a killed writer's) left out.
fn outputs(objects: &Objects) -> Objects {
    objects
        .iter()
        .filter(|(name, _)| {
            !name.starts_with("_manifests/")
                && !name.rsplit('/').next().unwrap().starts_with(".partial-")
        })
        .map(|(name, bytes)| (name.clone(), bytes.clone()))
        .collect()
}

/// Asserts two sets of objects are the same, naming the ones that differ (not dumping bytes).
#[track_caller]
fn assert_same(actual: &Objects, expected: &Objects) {
    let missing: Vec<&String> = expected
        .keys()
        .filter(|k| !actual.contains_key(*k))
        .collect();
    let extra: Vec<&String> = actual
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    let different: Vec<&String> = expected
        .iter()
        .filter(|(k, v)| actual.get(*k).is_some_and(|a| a != *v))
        .map(|(k, _)| k)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && different.is_empty(),
        "missing {missing:?}, unexpected {extra:?}, different bytes {different:?}"
    );
}

/// The outputs every good input must have, byte for byte.
fn expected_outputs(predicted: &BTreeMap<&str, Vec<u8>>) -> Objects {
    GOOD.iter()
        .map(|(name, source)| (output_name(name), predicted[source].clone()))
        .collect()
}

/// Checks the manifests of a complete run: one line per image, good ones done (or skipped),
/// bad ones failed with their code and no output.
fn check_manifest_records(records: &[serde_json::Value]) {
    let mut by_input: BTreeMap<String, &serde_json::Value> = BTreeMap::new();
    for record in records {
        let input = record["input"].as_str().unwrap().to_string();
        assert!(
            by_input.insert(input.clone(), record).is_none(),
            "{input} in two manifests"
        );
    }
    for (name, _) in GOOD {
        let record = by_input[name];
        assert_eq!(record["status"], "done", "{record}");
        assert_eq!(record["output"], output_name(name));
        assert!(record["output_bytes"].as_u64().unwrap() > 0);
        assert!(record["timings"]["forward_ms"].as_f64().unwrap() > 0.0);
    }
    for (name, _, code) in bad_inputs() {
        let record = by_input[name];
        assert_eq!(record["status"], "failed", "{record}");
        assert_eq!(record["error"], code, "{record}");
    }
    assert_eq!(by_input.len(), GOOD.len() + bad_inputs().len());
}

#[test]
fn three_tasks_share_a_local_tree_exactly_once_and_a_rerun_redoes_nothing() {
    let predicted = predicted();
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in"), dir.path().join("out"));
    write_tree(&input);
    let (input, output) = (input.to_str().unwrap(), output.to_str().unwrap());

    let tasks: Vec<Child> = (0..3)
        .map(|i| spawn_task(input, output, (i, 3), &[]))
        .collect();
    let summaries: Vec<serde_json::Value> = tasks
        .into_iter()
        .map(|task| summary(&task.wait_with_output().unwrap(), true))
        .collect();
    let total_done: u64 = summaries.iter().map(|s| s["done"].as_u64().unwrap()).sum();
    let total_failed: u64 = summaries
        .iter()
        .map(|s| s["failed"].as_u64().unwrap())
        .sum();
    assert_eq!(total_done, GOOD.len() as u64);
    assert_eq!(total_failed, bad_inputs().len() as u64);
    for (index, summary) in summaries.iter().enumerate() {
        assert_eq!(summary["task_index"], index);
        assert_eq!(summary["images_total"], GOOD.len() + bad_inputs().len());
        assert_eq!(summary["ignored_files"], OTHER.len());
        assert_eq!(summary["images_in_task"], 3, "{summary}");
    }

    let objects = files(Path::new(output));
    assert_same(&outputs(&objects), &expected_outputs(&predicted));
    let (records, manifest_summaries) = manifests(&objects);
    assert_eq!(manifest_summaries.len(), 3);
    check_manifest_records(&records);

    // A rerun as one task: everything is skipped, no output is written again.
    let before: Vec<(PathBuf, std::time::SystemTime)> = outputs(&objects)
        .keys()
        .map(|name| {
            let path = Path::new(output).join(name);
            let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
            (path, modified)
        })
        .collect();
    let rerun = run_whole(input, output, &[]);
    assert_eq!(rerun["done"], 0, "{rerun}");
    assert_eq!(rerun["skipped"], GOOD.len(), "{rerun}");
    assert_eq!(rerun["failed"], bad_inputs().len(), "{rerun}");
    let after = files(Path::new(output));
    assert_same(&outputs(&after), &expected_outputs(&predicted));
    for (path, modified) in before {
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            modified
        );
    }
    assert_eq!(
        manifests(&after).1.len(),
        4,
        "the rerun adds its own manifest"
    );
}

#[test]
fn a_task_killed_mid_run_leaves_no_partial_output_and_its_rerun_completes_the_set() {
    let predicted = predicted();
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in"), dir.path().join("out"));
    let (inputs, expected) = many_inputs(&predicted, |i, extension| {
        format!("d{}/img{i:02}.{extension}", i % 4)
    });
    for (name, bytes) in &inputs {
        write(&input.join(name), bytes);
    }
    let (input_spec, output_spec) = (input.to_str().unwrap(), output.to_str().unwrap());

    let mut task = spawn_task(input_spec, output_spec, (0, 1), &[]);
    let started = Instant::now();
    while outputs(&files(&output)).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no output appeared"
        );
        assert!(task.try_wait().unwrap().is_none(), "the task ended early");
        std::thread::sleep(Duration::from_millis(5));
    }
    task.kill().unwrap(); // SIGKILL
    task.wait().unwrap();

    let killed = files(&output);
    let written = outputs(&killed);
    assert!(
        !written.is_empty() && written.len() < expected.len(),
        "the kill must land mid-run: {} of {} written",
        written.len(),
        expected.len()
    );
    for (name, bytes) in &written {
        assert!(bytes == &expected[name], "{name} is partial or wrong");
    }
    assert!(
        manifests(&killed).1.is_empty(),
        "a killed task writes no manifest"
    );

    let rerun = run_whole(input_spec, output_spec, &[]);
    assert_eq!(
        rerun["done"].as_u64().unwrap() as usize,
        expected.len() - written.len()
    );
    assert_eq!(rerun["skipped"].as_u64().unwrap() as usize, written.len());
    assert_same(&outputs(&files(&output)), &expected);
}

#[test]
fn refused_settings_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    write_tree(&input);
    let input = input.to_str().unwrap();
    let run = |args: &[&str]| {
        let output = midas().arg("batch").args(args).output().unwrap();
        assert!(!output.status.success(), "{args:?} succeeded");
        text(&output.stderr)
    };
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let stderr = run(&[
        "--input",
        input,
        "--output",
        out,
        "--task-index",
        "3",
        "--task-count",
        "3",
    ]);
    assert!(stderr.contains("task 3 of 3"), "{stderr}");
    let stderr = run(&["--input", input, "--output", input]);
    assert!(stderr.contains("is the input itself"), "{stderr}");
    let missing = dir.path().join("missing");
    let stderr = run(&["--input", missing.to_str().unwrap(), "--output", out]);
    assert!(
        stderr.contains("input") && stderr.contains("missing"),
        "{stderr}"
    );
}

/// Loads the good and bad inputs into `bucket` under `prefix`.
fn upload_tree(gcs: &FakeGcs, bucket: &str, prefix: &str) {
    for (name, source) in GOOD {
        gcs.put(bucket, &format!("{prefix}/{name}"), image(source));
    }
    for (name, bytes, _) in bad_inputs() {
        gcs.put(bucket, &format!("{prefix}/{name}"), bytes);
    }
    for name in OTHER {
        gcs.put(
            bucket,
            &format!("{prefix}/{name}"),
            b"not an image".to_vec(),
        );
    }
}

/// The objects of `bucket` under `prefix/`, named relative to it.
fn bucket_objects(gcs: &FakeGcs, bucket: &str, prefix: &str) -> Objects {
    gcs.list(bucket)
        .into_iter()
        .filter_map(|name| {
            let relative = name.strip_prefix(&format!("{prefix}/"))?.to_string();
            Some((relative, gcs.get(bucket, &name)))
        })
        .collect()
}

#[test]
fn two_tasks_over_a_bucket_write_every_output_once() {
    let predicted = predicted();
    let gcs = FakeGcs::start();
    gcs.create_bucket("data");
    upload_tree(&gcs, "data", "cityscapes/test");
    let env = [("STORAGE_EMULATOR_HOST", gcs.host.as_str())];
    let (input, output) = ("gs://data/cityscapes/test", "gs://data/cityscapes/depth");

    let tasks: Vec<Child> = (0..2)
        .map(|i| spawn_task(input, output, (i, 2), &env))
        .collect();
    for task in tasks {
        summary(&task.wait_with_output().unwrap(), true);
    }
    let objects = bucket_objects(&gcs, "data", "cityscapes/depth");
    assert_same(&outputs(&objects), &expected_outputs(&predicted));
    let (records, summaries) = manifests(&objects);
    assert_eq!(summaries.len(), 2);
    check_manifest_records(&records);

    // The output inside the input is not read back as input on a rerun over the parent.
    let rerun = run_whole("gs://data/cityscapes", "gs://data/cityscapes/depth", &env);
    assert_eq!(
        rerun["images_total"],
        GOOD.len() + bad_inputs().len(),
        "{rerun}"
    );
    assert_eq!(rerun["done"], GOOD.len(), "{rerun}");
}

#[test]
fn a_store_that_goes_away_fails_the_task_and_claims_nothing_it_did_not_store() {
    let predicted = predicted();
    let root = tempfile::tempdir().unwrap();
    let mut gcs = FakeGcs::start_on_disk(root.path());
    gcs.create_bucket("data");
    let (inputs, expected) =
        many_inputs(&predicted, |i, extension| format!("img{i:02}.{extension}"));
    for (name, bytes) in inputs {
        gcs.put("data", &format!("in/{name}"), bytes);
    }
    let host = gcs.host.clone();
    let env = [
        ("STORAGE_EMULATOR_HOST", host.as_str()),
        ("MIDAS_STORE_TIMEOUT_SECS", "5"),
    ];
    let (input, output) = ("gs://data/in", "gs://data/out");

    let task = spawn_task(input, output, (0, 1), &env);
    let started = Instant::now();
    while !gcs.list("data").iter().any(|name| name.starts_with("out/")) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no output appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    gcs.kill();
    let finished = task.wait_with_output().unwrap();
    assert!(!finished.status.success(), "{}", text(&finished.stderr));
    let stderr = text(&finished.stderr);
    assert!(
        stderr.contains("storage unavailable") || stderr.contains("timed out"),
        "{stderr}"
    );

    // Every output the task logged as stored is there and whole; nothing else claims success.
    let claimed: Vec<String> = stderr
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["message"] == "stored")
        .map(|line| line["output"].as_str().unwrap().to_string())
        .collect();
    let gcs = FakeGcs::restart(&host, root.path());
    let objects = bucket_objects(&gcs, "data", "out");
    let written = outputs(&objects);
    assert!(
        written.len() < expected.len(),
        "the store went away mid-run"
    );
    for name in &claimed {
        let relative = name.strip_prefix("out/").unwrap();
        assert!(
            written.contains_key(relative),
            "{name} claimed but not stored"
        );
    }
    for (name, bytes) in &written {
        assert!(bytes == &expected[name], "{name} is partial or wrong");
    }

    // With the store back, a rerun completes the set.
    let rerun = run_whole(input, output, &env);
    assert_eq!(
        rerun["done"].as_u64().unwrap() as usize,
        expected.len() - written.len()
    );
    assert_same(&outputs(&bucket_objects(&gcs, "data", "out")), &expected);
}

/// `midas-serve batch` over `input` into `output`, as a process that cannot read what its
/// permissions forbid even when the tests run as root (which bypasses them): started through
/// `setpriv` without the capabilities that override file permissions.
fn unprivileged_task(input: &Path, output: &Path) -> Child {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let mut command = if root {
        let mut command = Command::new("setpriv");
        command.args(["--bounding-set=-dac_override,-dac_read_search", "--"]);
        command.arg(env!("CARGO_BIN_EXE_midas-serve"));
        command
    } else {
        Command::new(env!("CARGO_BIN_EXE_midas-serve"))
    };
    command
        .args(["batch", "--input"])
        .arg(input)
        .arg("--output")
        .arg(output)
        .env("MIDAS_LOG_FORMAT", "json")
        .env_remove("STORAGE_EMULATOR_HOST")
        .env_remove("CLOUD_RUN_TASK_INDEX")
        .env_remove("CLOUD_RUN_TASK_COUNT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts")
}

#[test]
fn every_entry_of_an_untidy_tree_is_recorded_and_the_task_finishes() {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{PermissionsExt, symlink};

    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in"), dir.path().join("out"));
    let outside = dir.path().join("outside.jpg");
    write(&outside, &image("rocket.jpg"));
    write(&input.join("good.png"), &image("camera_odd.png"));
    write(&input.join("unreadable.png"), &image("camera_odd.png"));
    std::fs::set_permissions(
        input.join("unreadable.png"),
        PermissionsExt::from_mode(0o000),
    )
    .unwrap();
    let mkfifo = Command::new("mkfifo")
        .arg(input.join("pipe.jpg"))
        .status()
        .unwrap();
    assert!(mkfifo.success());
    symlink("loop.jpg", input.join("loop.jpg")).unwrap();
    symlink("/dev/null", input.join("device.png")).unwrap();
    symlink(&outside, input.join("linked.jpg")).unwrap();
    let raw_name = std::ffi::OsStr::from_bytes(b"caf\xe9.png");
    write(&input.join(raw_name), &image("camera_odd.png"));
    write(&input.join("locked/inside.png"), &image("camera_odd.png"));
    std::fs::set_permissions(input.join("locked"), PermissionsExt::from_mode(0o000)).unwrap();

    let task = unprivileged_task(&input, &output);
    let started = Instant::now();
    let finished = task.wait_with_output().unwrap();
    let summary = summary(&finished, true);
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "the task hung on a special file"
    );
    std::fs::set_permissions(input.join("locked"), PermissionsExt::from_mode(0o755)).unwrap();
    assert_eq!(summary["done"], 2, "{summary}");
    assert_eq!(summary["failed"], 6, "{summary}");

    let objects = files(&output);
    let (records, _) = manifests(&objects);
    let codes: BTreeMap<String, String> = records
        .iter()
        .map(|record| {
            let input = record["input"].as_str().unwrap().to_string();
            let code = record["error"]
                .as_str()
                .unwrap_or(record["status"].as_str().unwrap());
            (input, code.to_string())
        })
        .collect();
    let expected: BTreeMap<String, String> = [
        ("caf\u{fffd}.png", "non_utf8_name"),
        ("device.png", "not_regular_file"),
        ("good.png", "done"),
        ("linked.jpg", "done"),
        ("locked", "unreadable_directory"),
        ("loop.jpg", "symlink_loop"),
        ("pipe.jpg", "not_regular_file"),
        ("unreadable.png", "permission_denied"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(codes, expected);
    // A link to a file outside the tree is followed: its output is written like any other.
    let outputs = outputs(&objects);
    let written: Vec<&str> = outputs.keys().map(String::as_str).collect();
    assert_eq!(written, ["good.png", "linked.png"]);
}
