//! A small client of QEMU's machine protocol (QMP) over its unix socket: JSON objects, one a line.
//! [`Qmp::connect`] waits for the socket, reads the greeting and leaves negotiation mode;
//! [`Qmp::execute`] sends a command and waits for its answer (matched by `id`); a reader thread
//! keeps every asynchronous event ([`QmpEvent`]: `STOP`, `RESUME`, `MIGRATION`, ...) with its
//! time on `CLOCK_MONOTONIC` (QEMU stamps events with the wall clock; the reader converts), so
//! they line up with the lab's other timestamps.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use victor_proto::clock::monotonic_ns;

/// How long a command may take to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// What can go wrong talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket did not accept a connection in time.
    #[error("QMP socket {path}: no connection after {waited:?}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// How long it was tried.
        waited: Duration,
        /// The last error.
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// QEMU closed the connection (it exited).
    #[error("QMP socket {0}: QEMU closed the connection")]
    Closed(PathBuf),
    /// QEMU did not say what QMP expects.
    #[error("QMP socket {path}: unexpected {what}: {line}")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// What was expected.
        what: &'static str,
        /// What came.
        line: String,
    },
    /// A command failed.
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// No answer or event in time.
    #[error("QMP socket {path}: no {what} after {waited:?}")]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// What was awaited.
        what: String,
        /// How long.
        waited: Duration,
    },
}

/// An asynchronous event.
#[derive(Debug, Clone)]
pub struct QmpEvent {
    /// Its name (`RESUME`, `STOP`, `MIGRATION`, ...).
    pub name: String,
    /// Its `data` member (null when absent).
    pub data: Value,
    /// When QEMU emitted it, on CLOCK_MONOTONIC (ns).
    pub mono_ns: u64,
}

#[derive(Default)]
struct Inbox {
    answers: HashMap<u64, Value>,
    events: Vec<QmpEvent>,
    closed: bool,
}

/// A connected QMP session.
pub struct Qmp {
    path: PathBuf,
    writer: Mutex<UnixStream>,
    inbox: Arc<(Mutex<Inbox>, Condvar)>,
    next_id: Mutex<u64>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Qmp {
    /// Connects to the QMP socket at `path` (retrying until `timeout`: QEMU creates it while it
    /// starts), reads the greeting and sends `qmp_capabilities`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(source) if started.elapsed() >= timeout => {
                    return Err(QmpError::Connect { path: path.to_owned(), waited: timeout, source });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let io = |source| QmpError::Io { path: path.to_owned(), source };
        let mut lines = BufReader::new(stream.try_clone().map_err(io)?);
        let mut greeting = String::new();
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        lines.read_line(&mut greeting).map_err(io)?;
        stream.set_read_timeout(None).map_err(io)?;
        if !serde_json::from_str::<Value>(&greeting).is_ok_and(|v| v.get("QMP").is_some()) {
            return Err(QmpError::Protocol { path: path.to_owned(), what: "greeting", line: greeting });
        }
        let inbox: Arc<(Mutex<Inbox>, Condvar)> = Arc::default();
        let inbox2 = inbox.clone();
        let reader =
            std::thread::Builder::new().name("qmp".into()).spawn(move || read_loop(lines, &inbox2)).map_err(io)?;
        let qmp = Qmp {
            path: path.to_owned(),
            writer: Mutex::new(stream),
            inbox,
            next_id: Mutex::new(1),
            reader: Some(reader),
        };
        qmp.execute("qmp_capabilities", Value::Null)?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` (`Value::Null` for none) and returns its `return` value.
    pub fn execute(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let id = {
            let mut next = self.next_id.lock().expect("qmp id");
            *next += 1;
            *next
        };
        let mut request = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .lock()
            .expect("qmp writer")
            .write_all(line.as_bytes())
            .map_err(|source| QmpError::Io { path: self.path.clone(), source })?;
        let answer = self.wait(&format!("answer to {command}"), ANSWER_TIMEOUT, |inbox| inbox.answers.remove(&id))?;
        if let Some(error) = answer.get("error") {
            let text = |k: &str| error.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
            return Err(QmpError::Command { command: command.to_owned(), class: text("class"), desc: text("desc") });
        }
        Ok(answer.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Every event received so far.
    pub fn events(&self) -> Vec<QmpEvent> {
        self.inbox.0.lock().expect("qmp inbox").events.clone()
    }

    /// Waits for the first event named `name` emitted at or after `since_mono_ns`.
    pub fn wait_event(&self, name: &str, since_mono_ns: u64, timeout: Duration) -> Result<QmpEvent, QmpError> {
        self.wait(&format!("{name} event"), timeout, |inbox| {
            inbox.events.iter().find(|e| e.name == name && e.mono_ns >= since_mono_ns).cloned()
        })
    }

    fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut take: impl FnMut(&mut Inbox) -> Option<T>,
    ) -> Result<T, QmpError> {
        let deadline = Instant::now() + timeout;
        let (lock, ready) = &*self.inbox;
        let mut inbox = lock.lock().expect("qmp inbox");
        loop {
            if let Some(found) = take(&mut inbox) {
                return Ok(found);
            }
            if inbox.closed {
                return Err(QmpError::Closed(self.path.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(QmpError::Timeout { path: self.path.clone(), what: what.to_owned(), waited: timeout });
            }
            inbox = ready.wait_timeout(inbox, deadline - now).expect("qmp inbox").0;
        }
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        let _ = self.writer.lock().map(|w| w.shutdown(std::net::Shutdown::Both));
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Files answers by id and events with their monotonic time until the connection closes.
fn read_loop(mut lines: BufReader<UnixStream>, inbox: &(Mutex<Inbox>, Condvar)) {
    let mut line = String::new();
    loop {
        line.clear();
        let read = lines.read_line(&mut line);
        let (mono, wall) = (monotonic_ns(), SystemTime::now());
        let mut state = inbox.0.lock().expect("qmp inbox");
        match read {
            Ok(0) | Err(_) => {
                state.closed = true;
                inbox.1.notify_all();
                return;
            }
            Ok(_) => {}
        }
        let Ok(msg) = serde_json::from_str::<Value>(&line) else { continue };
        if let Some(name) = msg.get("event").and_then(Value::as_str) {
            let mono_ns = event_mono_ns(&msg, mono, wall);
            let data = msg.get("data").cloned().unwrap_or(Value::Null);
            state.events.push(QmpEvent { name: name.to_owned(), data, mono_ns });
        } else if let Some(id) = msg.get("id").and_then(Value::as_u64) {
            state.answers.insert(id, msg);
        }
        inbox.1.notify_all();
    }
}

/// The event's wall-clock `timestamp` moved onto CLOCK_MONOTONIC by the offset between the two
/// clocks when it was read (its arrival time when it has none).
fn event_mono_ns(msg: &Value, mono_now: u64, wall_now: SystemTime) -> u64 {
    let stamp = msg.get("timestamp");
    let field = |k: &str| stamp.and_then(|t| t.get(k)).and_then(Value::as_i64);
    let (Some(s), Some(us)) = (field("seconds"), field("microseconds")) else { return mono_now };
    let event_ns = s as i128 * 1_000_000_000 + us as i128 * 1000;
    let now_ns = wall_now.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(event_ns);
    (mono_now as i128 - (now_ns - event_ns).max(0)).max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_time_moves_onto_the_monotonic_clock() {
        let wall = UNIX_EPOCH + Duration::from_secs(1_000);
        let msg = json!({ "event": "RESUME", "timestamp": { "seconds": 999, "microseconds": 750_000 } });
        // Emitted 250 ms before it was read.
        assert_eq!(event_mono_ns(&msg, 5_000_000_000, wall), 4_750_000_000);
        let bare = json!({ "event": "RESUME" });
        assert_eq!(event_mono_ns(&bare, 5_000_000_000, wall), 5_000_000_000);
    }
}
