//! Runs the real `midas-serve serve` binary on a loopback port and talks to it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running server process.
pub struct Server {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    logs: Arc<Mutex<Vec<String>>>,
}

/// How long a server may take to become ready (the first wgpu start compiles shaders).
const STARTUP: Duration = Duration::from_secs(120);

impl Server {
    /// Starts `midas-serve serve --host 127.0.0.1 --port 0 ARGS` and waits until it listens.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        match Self::try_start(args, env) {
            Ok(server) => server,
            Err(logs) => panic!("the server did not start:\n{logs}"),
        }
    }

    /// Like [`Server::start`], but returns everything the process logged if it stops first.
    pub fn try_start(args: &[&str], env: &[(&str, &str)]) -> Result<Self, String> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_midas-serve"));
        command
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .env("MIDAS_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env_remove("STORAGE_EMULATOR_HOST")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("the binary starts");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_sender, addr_receiver) = std::sync::mpsc::channel();
        let collected = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line)
                    && value["message"] == "listening"
                {
                    let _ =
                        addr_sender.send(value["addr"].as_str().unwrap_or_default().to_string());
                }
                collected.lock().unwrap().push(line);
            }
        });
        let started = Instant::now();
        loop {
            if let Ok(addr) = addr_receiver.recv_timeout(Duration::from_millis(50)) {
                return Ok(Self { child, addr, logs });
            }
            if let Ok(Some(_)) = child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                return Err(logs.lock().unwrap().join("\n"));
            }
            if started.elapsed() > STARTUP {
                let _ = child.kill();
                return Err(format!(
                    "not listening after {STARTUP:?}:\n{}",
                    logs.lock().unwrap().join("\n")
                ));
            }
        }
    }

    /// Wraps another server's process (the replaced Python service, for comparisons) once it
    /// accepts connections on `addr`.
    pub fn adopt(mut child: Child, addr: String) -> Self {
        let started = Instant::now();
        while TcpStream::connect(&addr).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the server on {addr} exited before listening: {status}");
            }
            assert!(
                started.elapsed() < STARTUP,
                "nothing listens on {addr} after {STARTUP:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            child,
            addr,
            logs: Arc::default(),
        }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Lines the server has logged so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
    pub fn memory_kib(&self, field: &str) -> u64 {
        process_memory_kib(self.pid(), field)
    }

    /// Sends a signal (`TERM`, `INT`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// A raw TCP connection to the server.
    pub fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(&self.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        stream
    }
}

/// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`) for any process.
pub fn process_memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `multipart/form-data` body with one part.
pub fn multipart(field: &str, file_name: Option<&str>, content: &[u8]) -> (String, Vec<u8>) {
    let boundary = "midasTestBoundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    let disposition = match file_name {
        Some(name) => format!("form-data; name=\"{field}\"; filename=\"{name}\""),
        None => format!("form-data; name=\"{field}\""),
    };
    write!(body, "--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: application/octet-stream\r\n\r\n").unwrap();
    body.extend_from_slice(content);
    write!(body, "\r\n--{boundary}--\r\n").unwrap();
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// A raw HTTP/1.1 response.
#[derive(Debug)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// Header lines, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    /// Sizes of the chunks, for a chunked body.
    pub chunks: Vec<usize>,
}

impl RawResponse {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Reads one response (Connection: close, or chunked, or Content-Length).
pub fn read_response(stream: &mut TcpStream) -> RawResponse {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        let (name, value) = trimmed.split_once(':').unwrap();
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    let mut body = Vec::new();
    let mut chunks = Vec::new();
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap(), 16).unwrap();
            if size == 0 {
                break;
            }
            let mut chunk = vec![0; size];
            reader.read_exact(&mut chunk).unwrap();
            body.extend_from_slice(&chunk);
            chunks.push(size);
            line.clear();
            reader.read_line(&mut line).unwrap();
        }
    } else if let Some(length) = find("content-length") {
        body = vec![0; length.parse().unwrap()];
        reader.read_exact(&mut body).unwrap();
    } else {
        reader.read_to_end(&mut body).unwrap();
    }
    RawResponse {
        status,
        headers,
        body,
        chunks,
    }
}

/// Sends a complete request and reads the response.
pub fn request(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    let mut stream = server.connect();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        server.addr,
        body.len()
    )
    .unwrap();
    for (name, value) in headers {
        write!(stream, "{name}: {value}\r\n").unwrap();
    }
    stream.write_all(b"\r\n").unwrap();
    // The server may answer (and close) before reading everything, e.g. on a 413.
    let _ = stream.write_all(body);
    read_response(&mut stream)
}

/// Posts a multipart `body` of `content_type` to `/predict{query}`.
fn post_predict(
    server: &Server,
    query: &str,
    (content_type, body): (String, Vec<u8>),
) -> RawResponse {
    let path = format!("/predict{query}");
    request(
        server,
        "POST",
        &path,
        &[("Content-Type", &content_type)],
        &body,
    )
}

/// Uploads `content` as the `file` field named `file_name` to `/predict{query}`.
pub fn predict(server: &Server, file_name: &str, content: &[u8], query: &str) -> RawResponse {
    post_predict(server, query, multipart("file", Some(file_name), content))
}

/// Posts a form of text parts `fields`, then the file `(name, content)` as `file`, to `/predict`.
pub fn post_form(server: &Server, fields: &[(&str, &str)], file: (&str, &[u8])) -> RawResponse {
    let (content_type, file_part) = multipart("file", Some(file.0), file.1);
    let boundary = content_type.rsplit('=').next().unwrap_or_default();
    let mut body = Vec::new();
    for (name, value) in fields {
        write!(
            body,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        )
        .unwrap();
    }
    body.extend_from_slice(&file_part);
    post_predict(server, "", (content_type, body))
}

/// Posts `content` as the multipart field `field` (with file name `name`, if any) to `/predict`.
pub fn post_multipart(
    server: &Server,
    field: &str,
    name: Option<&str>,
    content: &[u8],
) -> RawResponse {
    post_predict(server, "", multipart(field, name, content))
}
