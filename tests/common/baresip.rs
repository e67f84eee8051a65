//! A real baresip softphone as a SIP device in end-to-end tests.
//!
//! Written against Debian bookworm's `baresip` 1.0.0 (libre 1.1.0). Each [`Baresip`] runs its own
//! process with a config directory of its own: no ALSA/PulseAudio and no console UI. Audio comes
//! from `aufile` (a WAV file played as the microphone) or `ausine` (a 440 Hz tone). The `sndfile`
//! filter writes what is sent and what is heard to `record_dir`. Only G.711 is loaded (PCMU,
//! then PCMA). The test controls the phone and reads its events over `ctrl_tcp`: JSON in
//! netstrings.
//!
//! What this baresip does:
//! - Digest auth is **MD5 only**. libre 1.1.0 fails the whole 401 with ENOSYS if *any*
//!   `WWW-Authenticate` has an `algorithm` other than MD5, even when an MD5 challenge is also
//!   there. `REGISTER_FAIL` then carries "Function not implemented". So SHA-256 plus MD5
//!   challenges cannot register this phone.
//! - The REGISTER goes to `outbound` (set here to the registrar address). It carries
//!   `Route: <sip:REGISTRAR;transport=udp;lr>`, and the Request-URI is
//!   `sip:DOMAIN;transport=udp`; the digest `uri=` is that same string. The Contact user is
//!   `USER-0x<pointer>`, not USER. An INVITE to the phone must use the Contact user or the AOR
//!   user; any other user gets 404.
//! - `User-Agent: baresip v1.0.0 (x86_64/linux)`, and the same string as `Server:`. It sends no
//!   keepalives (only with `sipnat=outbound`, not used here).
//! - It always sends `180 Ringing` first, even with `answermode=auto`. The 200 reason is
//!   "Answering".
//! - When the WAV source runs out, baresip hangs up the call itself, within about 1 s. That gives
//!   `AUDIO_ERROR` "0,end of file", then `CALL_CLOSED` "end of file". Use a long WAV, or no WAV
//!   (the tone never ends), to keep a call up.
//! - `CALL_CLOSED` params: "Connection reset by peer" when the peer sent BYE, "Connection reset
//!   by user" after [`Baresip::hangup`], "end of file" when the source WAV ran out.
//! - `net_interface` is set to the loopback address. Without it, the SDP `c=` line carries the
//!   host's first interface address (eth0), even though SIP listens on 127.0.0.1.
//! - baresip also listens for SIP/TLS on the SIP port + 1, and exits if that port is taken. The
//!   start checks that it is free, and retries on "Address already in use".
//! - The log holds the SIP trace (`-s`), so a failed wait shows the messages on the wire.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long the waits without an explicit timeout wait.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How many log lines an error message carries.
const TAIL_LINES: usize = 120;
/// The Debian package's module directory.
const DEBIAN_MODULES: &str = "/usr/lib/baresip/modules";

/// Is a baresip binary present (`$BARESIP_BIN`, or `baresip` on `PATH`)?
pub fn available() -> bool {
    binary().is_some()
}

/// Should a test that needs baresip run? True when baresip is present. When it is missing:
/// panics if `SAUTIKIT_REQUIRE_BARESIP=1` (scripts/test.sh sets it and installs baresip), else
/// prints a note naming `test` and returns false, so the test returns early.
pub fn present_or_required(test: &str) -> bool {
    if available() {
        return true;
    }
    assert!(
        std::env::var("SAUTIKIT_REQUIRE_BARESIP").as_deref() != Ok("1"),
        "{test}: SAUTIKIT_REQUIRE_BARESIP=1 but baresip is not installed \
         (Debian package `baresip`, or set BARESIP_BIN)"
    );
    eprintln!(
        "{test}: not run: baresip is not installed (Debian package `baresip`, or set BARESIP_BIN)"
    );
    false
}

fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BARESIP_BIN") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("baresip"))
        .find(|p| p.is_file())
}

/// `$BARESIP_MODULE_PATH`, else the Debian directory if it exists, else baresip's default.
fn module_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BARESIP_MODULE_PATH") {
        return Some(PathBuf::from(p));
    }
    let d = PathBuf::from(DEBIAN_MODULES);
    d.is_dir().then_some(d)
}

#[derive(Debug, Clone)]
pub struct BaresipConfig {
    /// Where REGISTER (and every other out-of-dialog request) is sent: the `outbound` proxy.
    pub registrar: SocketAddr,
    /// "udp" or "tcp".
    pub transport: &'static str,
    pub username: String,
    pub password: String,
    /// The AOR host: `sip:{username}@{domain}`. This may be a name; it is never resolved, because
    /// everything goes to `registrar`.
    pub domain: String,
    /// A 16-bit PCM WAV (mono or stereo, 8/16/24/32/48 kHz) played as the microphone. When it
    /// ends, baresip hangs up. `None` sends a 440 Hz tone that never ends.
    pub source_wav: Option<PathBuf>,
    /// Where `sndfile` writes `dump-YYYY-MM-DD-HH-MM-SS-{enc,dec}.wav` per call (enc = sent,
    /// dec = heard; 8 kHz mono for G.711). Created if missing. Must not contain whitespace or '#'.
    pub record_dir: PathBuf,
    /// `answermode=auto`, or `manual` (answer with [`Baresip::answer`]).
    pub auto_answer: bool,
}

/// An error message that stays readable inside `io::Error`'s Debug output (`.unwrap()`).
struct Failure(String);

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failure {}

fn failure(kind: io::ErrorKind, msg: String) -> io::Error {
    io::Error::new(kind, Failure(msg))
}

#[derive(Default)]
struct State {
    /// stdout and stderr lines with ANSI colours removed, plus one `[ctrl] …` line per event.
    log: Vec<String>,
    events: Vec<Value>,
    /// Command responses by token.
    responses: HashMap<String, Value>,
    /// For each event type: the index in `events` after the last one a wait returned.
    cursors: HashMap<String, usize>,
    /// stdout reached EOF: the process is gone.
    exited: bool,
    ctrl_closed: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Notify,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap());
        self.changed.notify_waiters();
    }

    fn tail(&self, n: usize) -> String {
        let st = self.state.lock().unwrap();
        let from = st.log.len().saturating_sub(n);
        st.log[from..].join("\n")
    }

    /// Waits until `check` returns `Some`. Checks again after every change to the state, until
    /// `deadline`; fails early when the process exits.
    async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&mut State) -> Option<Result<T, String>>,
    ) -> io::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.state.lock().unwrap();
                match check(&mut st) {
                    Some(Ok(v)) => return Ok(v),
                    Some(Err(e)) => {
                        drop(st);
                        return Err(failure(
                            io::ErrorKind::Other,
                            format!(
                                "baresip: {what}: {e}\n--- baresip log tail ---\n{}",
                                self.tail(TAIL_LINES)
                            ),
                        ));
                    }
                    None if st.exited => {
                        drop(st);
                        return Err(failure(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "baresip: {what}: the process exited\n--- baresip log tail ---\n{}",
                                self.tail(TAIL_LINES)
                            ),
                        ));
                    }
                    None => {}
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(failure(
                    io::ErrorKind::TimedOut,
                    format!(
                        "baresip: {what}: timed out after {timeout:?}\n--- baresip log tail ---\n{}",
                        self.tail(TAIL_LINES)
                    ),
                ));
            }
        }
    }
}

/// One call's recordings: what the phone sent and what it heard.
#[derive(Debug, Clone)]
pub struct Recording {
    pub sent: PathBuf,
    pub heard: PathBuf,
}

/// 16-bit PCM samples from a WAV file (interleaved when stereo).
#[derive(Debug, Clone)]
pub struct Wav {
    pub sample_rate: u32,
    pub channels: u16,
    pub samples: Vec<i16>,
}

impl Wav {
    pub fn duration(&self) -> Duration {
        let frames = self.samples.len() as f64 / f64::from(self.channels.max(1));
        Duration::from_secs_f64(frames / f64::from(self.sample_rate.max(1)))
    }

    /// Root mean square over all samples (0 for silence; about 0.7 × amplitude for a sine).
    pub fn rms(&self) -> f64 {
        if self.samples.is_empty() {
            return 0.0;
        }
        let sum: f64 = self
            .samples
            .iter()
            .map(|&s| f64::from(s) * f64::from(s))
            .sum();
        (sum / self.samples.len() as f64).sqrt()
    }
}

struct WavFormat {
    format: u16,
    channels: u16,
    sample_rate: u32,
    bits: u16,
    /// Byte range of the `data` chunk, clamped to the file.
    data: std::ops::Range<usize>,
    /// The RIFF and data sizes match the file: libsndfile has closed it.
    complete: bool,
}

fn parse_wav(bytes: &[u8]) -> Result<WavFormat, String> {
    if bytes.len() < 12 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err("not a RIFF/WAVE file".into());
    }
    let riff_size = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
    let mut fmt = None;
    let mut pos = 12;
    while pos + 8 <= bytes.len() {
        let id = &bytes[pos..pos + 4];
        let size = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().unwrap()) as usize;
        let body = pos + 8;
        if id == b"fmt " {
            if size < 16 || body + 16 > bytes.len() {
                return Err("short fmt chunk".into());
            }
            let b = &bytes[body..];
            fmt = Some((
                u16::from_le_bytes([b[0], b[1]]),
                u16::from_le_bytes([b[2], b[3]]),
                u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
                u16::from_le_bytes([b[14], b[15]]),
            ));
        } else if id == b"data" {
            let (format, channels, sample_rate, bits) = fmt.ok_or("data chunk before fmt chunk")?;
            let end = body.saturating_add(size).min(bytes.len());
            return Ok(WavFormat {
                format,
                channels,
                sample_rate,
                bits,
                data: body..end,
                complete: size > 0 && body + size == bytes.len() && riff_size + 8 == bytes.len(),
            });
        }
        pos = body.saturating_add(size).saturating_add(size & 1);
    }
    Err("no data chunk".into())
}

/// Reads a 16-bit PCM WAV (what `sndfile` writes, and what `aufile` plays).
pub fn read_wav(path: &Path) -> io::Result<Wav> {
    let bytes = std::fs::read(path)?;
    let f = parse_wav(&bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })?;
    if f.format != 1 || f.bits != 16 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: not 16-bit PCM (format {}, {} bits)",
                path.display(),
                f.format,
                f.bits
            ),
        ));
    }
    let samples = bytes[f.data]
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect();
    Ok(Wav {
        sample_rate: f.sample_rate,
        channels: f.channels,
        samples,
    })
}

/// Removes ANSI colour sequences (`ESC [ … letter`), which baresip puts around warnings and the
/// SIP trace.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn spawn_log_reader(
    shared: Arc<Shared>,
    pipe: impl AsyncRead + Unpin + Send + 'static,
    stdout: bool,
) {
    tokio::spawn(async move {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line =
                        strip_ansi(String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']));
                    shared.update(|st| st.log.push(line));
                }
            }
        }
        if stdout {
            shared.update(|st| st.exited = true);
        }
    });
}

fn spawn_ctrl_reader(shared: Arc<Shared>, mut read: tokio::net::tcp::OwnedReadHalf) {
    tokio::spawn(async move {
        let mut buf: Vec<u8> = Vec::new();
        let mut chunk = [0u8; 8192];
        'read: loop {
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            // Netstrings: `<len>:<payload>,`
            while let Some(colon) = buf.iter().position(|&b| b == b':') {
                let Some(len) = std::str::from_utf8(&buf[..colon])
                    .ok()
                    .and_then(|s| s.parse::<usize>().ok())
                else {
                    let junk = String::from_utf8_lossy(&buf).into_owned();
                    shared.update(|st| st.log.push(format!("[ctrl] bad netstring: {junk}")));
                    break 'read;
                };
                if buf.len() < colon + 1 + len + 1 {
                    break;
                }
                let payload = buf[colon + 1..colon + 1 + len].to_vec();
                buf.drain(..colon + 1 + len + 1);
                let Ok(msg) = serde_json::from_slice::<Value>(&payload) else {
                    let text = String::from_utf8_lossy(&payload).into_owned();
                    shared.update(|st| st.log.push(format!("[ctrl] bad JSON: {text}")));
                    continue;
                };
                shared.update(|st| {
                    if msg.get("event").is_some() {
                        st.log.push(format!(
                            "[ctrl] event {} {}",
                            msg["type"].as_str().unwrap_or("?"),
                            msg["param"].as_str().unwrap_or("")
                        ));
                        st.events.push(msg);
                    } else if let Some(token) = msg["token"].as_str() {
                        st.responses.insert(token.to_owned(), msg);
                    }
                });
            }
        }
        shared.update(|st| st.ctrl_closed = true);
    });
}

/// A free port P on `ip` with UDP P, TCP P and TCP P+1 (baresip's SIP/TLS listener) all free,
/// and a free TCP port for ctrl_tcp. The sockets are closed on return; a race with another
/// process is handled by retrying the start.
fn pick_ports(ip: IpAddr) -> io::Result<(u16, u16)> {
    for _ in 0..50 {
        let udp = UdpSocket::bind((ip, 0))?;
        let port = udp.local_addr()?.port();
        if port == u16::MAX {
            continue;
        }
        let (Ok(_tcp), Ok(_tls)) = (
            TcpListener::bind((ip, port)),
            TcpListener::bind((ip, port + 1)),
        ) else {
            continue;
        };
        let ctrl = TcpListener::bind((ip, 0))?;
        return Ok((port, ctrl.local_addr()?.port()));
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "no free SIP port pair for baresip",
    ))
}

fn check_token(what: &str, value: &str, forbidden: &[char]) -> io::Result<()> {
    if value.is_empty()
        || value
            .chars()
            .any(|c| c.is_whitespace() || forbidden.contains(&c))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "baresip: {what} {value:?} is empty or has characters the account line cannot carry"
            ),
        ));
    }
    Ok(())
}

pub struct Baresip {
    /// `None` only after [`Baresip::quit`].
    child: Mutex<Option<Child>>,
    shared: Arc<Shared>,
    ctrl: tokio::sync::Mutex<OwnedWriteHalf>,
    next_token: Mutex<u64>,
    sip_addr: SocketAddr,
    aor: String,
    record_dir: PathBuf,
    /// The config directory; removed on drop.
    _dir: tempfile::TempDir,
}

impl Drop for Baresip {
    fn drop(&mut self) {
        if let Ok(Some(child)) = self.child.get_mut() {
            let _ = child.start_kill();
        }
    }
}

impl Baresip {
    /// Writes a config directory, starts baresip, connects to ctrl_tcp and adds the account,
    /// which starts registering. Call [`Baresip::wait_registered`] next.
    pub async fn start(cfg: BaresipConfig) -> io::Result<Baresip> {
        let bin = binary().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "baresip not found: install the Debian package `baresip` (or set BARESIP_BIN)",
            )
        })?;
        let modules = module_dir();
        if let Some(dir) = &modules
            && !dir.join("ctrl_tcp.so").is_file()
        {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("baresip: no ctrl_tcp.so in {}", dir.display()),
            ));
        }
        if cfg.transport != "udp" && cfg.transport != "tcp" {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "baresip: transport must be udp or tcp, not {:?}",
                    cfg.transport
                ),
            ));
        }
        check_token("username", &cfg.username, &[';', '"', '<', '>', '@', ':'])?;
        check_token("password", &cfg.password, &[';', '"', '<', '>'])?;
        check_token("domain", &cfg.domain, &[';', '"', '<', '>', '@'])?;
        std::fs::create_dir_all(&cfg.record_dir)?;
        let record_dir = std::fs::canonicalize(&cfg.record_dir)?;
        check_token("record_dir", &record_dir.to_string_lossy(), &['#'])?;

        let dir = tempfile::Builder::new().prefix("baresip-").tempdir()?;
        let (source, src_rate, src_channels) = match &cfg.source_wav {
            Some(wav) => {
                let bytes = std::fs::read(wav)?;
                let f = parse_wav(&bytes).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{}: {e}", wav.display()),
                    )
                })?;
                // aufile reads S16LE only; baresip's resampler only does whole ratios to 8 kHz.
                if f.format != 1
                    || f.bits != 16
                    || !(1..=2).contains(&f.channels)
                    || f.sample_rate % 8000 != 0
                    || f.sample_rate > 48000
                {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "{}: baresip needs 16-bit PCM, mono or stereo, at 8/16/24/32/48 kHz \
                             (got format {}, {} bits, {} ch, {} Hz)",
                            wav.display(),
                            f.format,
                            f.bits,
                            f.channels,
                            f.sample_rate
                        ),
                    ));
                }
                // A copy in the config directory, so the path has no spaces or commas.
                let copy = dir.path().join("source.wav");
                std::fs::write(&copy, &bytes)?;
                (
                    format!("aufile,{}", copy.display()),
                    f.sample_rate,
                    f.channels,
                )
            }
            // ausine produces 48 kHz stereo only.
            None => ("ausine,440".to_owned(), 48000, 2),
        };

        let ip: IpAddr = match cfg.registrar {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        };
        let tp = cfg.transport;
        let aor = format!("sip:{}@{}", cfg.username, cfg.domain);
        let account = format!(
            "<{aor};transport={tp}>;auth_user={user};auth_pass={pass};\
             outbound=\"sip:{registrar};transport={tp}\";regint=3600;answermode={mode}",
            user = cfg.username,
            pass = cfg.password,
            registrar = cfg.registrar,
            mode = if cfg.auto_answer { "auto" } else { "manual" },
        );

        let mut earlier = String::new();
        for attempt in 1..=5 {
            let (sip_port, ctrl_port) = pick_ports(ip)?;
            let sip_addr = SocketAddr::new(ip, sip_port);
            let ctrl_addr = SocketAddr::new(ip, ctrl_port);
            let mut config = format!(
                "poll_method\tepoll\n\
                 sip_listen\t{sip_addr}\n\
                 net_interface\t{ip}\n\
                 call_local_timeout\t120\n\
                 call_max_calls\t4\n\
                 audio_buffer\t20-160\n\
                 audio_source\t{source}\n\
                 ausrc_srate\t{src_rate}\n\
                 ausrc_channels\t{src_channels}\n\
                 jitter_buffer_delay\t5-10\n\
                 rtcp_mux\tno\n\
                 statmode_default\toff\n\
                 snd_path\t{record}\n\
                 ctrl_tcp_listen\t{ctrl_addr}\n",
                record = record_dir.display(),
            );
            if let Some(m) = &modules {
                config.push_str(&format!("module_path\t{}\n", m.display()));
            }
            config.push_str(
                "module\tg711.so\n\
                 module\taufile.so\n\
                 module\tausine.so\n\
                 module\tsndfile.so\n\
                 module_app\tmenu.so\n\
                 module_app\tctrl_tcp.so\n",
            );
            std::fs::write(dir.path().join("config"), config)?;

            let shared = Arc::new(Shared::default());
            let mut child = Command::new(&bin)
                .arg("-f")
                .arg(dir.path())
                .arg("-s") // SIP trace into the log
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            spawn_log_reader(
                shared.clone(),
                child.stdout.take().expect("piped stdout"),
                true,
            );
            spawn_log_reader(
                shared.clone(),
                child.stderr.take().expect("piped stderr"),
                false,
            );

            // ctrl_tcp listens before "baresip is ready." is printed.
            let ready = shared
                .wait_until("start", DEFAULT_TIMEOUT, |st| {
                    st.log
                        .iter()
                        .any(|l| l.contains("baresip is ready."))
                        .then_some(Ok(()))
                })
                .await;
            if let Err(e) = ready {
                let _ = child.start_kill();
                let port_clash = shared.tail(usize::MAX).contains("Address already in use");
                if port_clash && attempt < 5 {
                    earlier.push_str(&format!("attempt {attempt}: ports taken, retrying\n"));
                    continue;
                }
                return Err(failure(e.kind(), format!("{earlier}{e}")));
            }

            let stream = TcpStream::connect(ctrl_addr).await.map_err(|e| {
                failure(
                    e.kind(),
                    format!(
                        "baresip: ctrl_tcp {ctrl_addr}: {e}\n--- baresip log tail ---\n{}",
                        shared.tail(TAIL_LINES)
                    ),
                )
            })?;
            let (read, write) = stream.into_split();
            spawn_ctrl_reader(shared.clone(), read);

            let phone = Baresip {
                child: Mutex::new(Some(child)),
                shared,
                ctrl: tokio::sync::Mutex::new(write),
                next_token: Mutex::new(0),
                sip_addr,
                aor,
                record_dir,
                _dir: dir,
            };
            // Adding the account over ctrl_tcp (not an `accounts` file) means the REGISTERING and
            // REGISTER_OK events arrive on a connection that is already open.
            phone.command("uanew", Some(&account)).await?;
            return Ok(phone);
        }
        unreachable!("the last attempt returns")
    }

    /// Where baresip listens for SIP (UDP and TCP; TLS on the next port).
    pub fn sip_addr(&self) -> SocketAddr {
        self.sip_addr
    }

    /// `sip:{username}@{domain}`.
    pub fn aor(&self) -> &str {
        &self.aor
    }

    /// Everything baresip printed so far (ANSI colours removed), with the ctrl events.
    pub fn log(&self) -> String {
        self.shared.tail(usize::MAX)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.shared.tail(lines)
    }

    /// Every ctrl_tcp event so far, in order.
    pub fn events(&self) -> Vec<Value> {
        self.shared.state.lock().unwrap().events.clone()
    }

    /// Sends a ctrl_tcp command (a menu long command such as `dial`, `hangup`, `accept`,
    /// `reginfo`, `listcalls`) and returns its `data` text. Fails if baresip says `ok: false`.
    pub async fn command(&self, command: &str, params: Option<&str>) -> io::Result<String> {
        let token = {
            let mut n = self.next_token.lock().unwrap();
            *n += 1;
            format!("t{n}")
        };
        let mut msg = json!({ "command": command, "token": token });
        if let Some(p) = params {
            msg["params"] = Value::from(p);
        }
        self.send(&msg).await?;
        let what = format!("command {command}");
        let resp = self
            .shared
            .wait_until(&what, DEFAULT_TIMEOUT, |st| {
                if let Some(r) = st.responses.remove(&token) {
                    return Some(Ok(r));
                }
                st.ctrl_closed
                    .then(|| Err("ctrl_tcp connection closed".to_owned()))
            })
            .await?;
        let data = resp["data"].as_str().unwrap_or_default().to_owned();
        if resp["ok"] != Value::Bool(true) {
            return Err(failure(
                io::ErrorKind::Other,
                format!(
                    "baresip: command {command} failed: {data}\n--- baresip log tail ---\n{}",
                    self.log_tail(TAIL_LINES)
                ),
            ));
        }
        Ok(data)
    }

    /// Dials `uri` through the registrar (the `outbound` proxy). Then wait for
    /// `CALL_RINGING`, `CALL_ESTABLISHED` or `CALL_CLOSED`.
    pub async fn dial(&self, uri: &str) -> io::Result<()> {
        self.command("dial", Some(uri)).await.map(drop)
    }

    /// Hangs up the current call (BYE, or CANCEL before answer). Then `CALL_CLOSED` "Connection
    /// reset by user" follows.
    pub async fn hangup(&self) -> io::Result<()> {
        self.command("hangup", None).await.map(drop)
    }

    /// Answers the ringing call (`auto_answer: false`; wait for `CALL_INCOMING` first).
    pub async fn answer(&self) -> io::Result<()> {
        self.command("accept", None).await.map(drop)
    }

    /// Waits for the next `REGISTER_OK`. A `REGISTER_FAIL` first is an error carrying its param
    /// (for example "401 Unauthorized", "403 Forbidden", or "Function not implemented" for a
    /// non-MD5 challenge).
    pub async fn wait_registered(&self) -> io::Result<()> {
        let ev = self
            .wait_first(&["REGISTER_OK", "REGISTER_FAIL"], DEFAULT_TIMEOUT)
            .await?;
        if ev["type"] == "REGISTER_OK" {
            return Ok(());
        }
        Err(failure(
            io::ErrorKind::PermissionDenied,
            format!(
                "baresip: registration failed: {}\n--- baresip log tail ---\n{}",
                ev["param"].as_str().unwrap_or("?"),
                self.log_tail(TAIL_LINES)
            ),
        ))
    }

    /// Waits for the next `REGISTER_FAIL` and returns its param. A `REGISTER_OK` first is an
    /// error.
    pub async fn wait_register_failed(&self) -> io::Result<String> {
        let ev = self
            .wait_first(&["REGISTER_OK", "REGISTER_FAIL"], DEFAULT_TIMEOUT)
            .await?;
        if ev["type"] == "REGISTER_FAIL" {
            return Ok(ev["param"].as_str().unwrap_or_default().to_owned());
        }
        Err(failure(
            io::ErrorKind::Other,
            format!(
                "baresip: registered, but a failure was expected\n--- baresip log tail ---\n{}",
                self.log_tail(TAIL_LINES)
            ),
        ))
    }

    /// Waits for the next event of type `kind` (`CALL_INCOMING`, `CALL_RINGING`,
    /// `CALL_ESTABLISHED`, `CALL_RTPESTAB`, `CALL_CLOSED`, `REGISTER_OK`, …) and returns it. Each
    /// type keeps its own place: events that came before the call count, and an event is
    /// returned only once.
    pub async fn wait_event(&self, kind: &str) -> io::Result<Value> {
        self.wait_event_timeout(kind, DEFAULT_TIMEOUT).await
    }

    pub async fn wait_event_timeout(&self, kind: &str, timeout: Duration) -> io::Result<Value> {
        self.wait_first(&[kind], timeout).await
    }

    /// Waits for the next `CALL_CLOSED` and returns it (its `param` says why).
    pub async fn wait_closed(&self) -> io::Result<Value> {
        self.wait_event("CALL_CLOSED").await
    }

    /// The first event, at or after every cursor of `kinds`, whose type is one of `kinds`.
    /// Moves all their cursors past it.
    async fn wait_first(&self, kinds: &[&str], timeout: Duration) -> io::Result<Value> {
        let what = format!("waiting for {}", kinds.join(" or "));
        self.shared
            .wait_until(&what, timeout, |st| {
                let (idx, ev) = st.events.iter().enumerate().find(|(i, ev)| {
                    let t = ev["type"].as_str().unwrap_or_default();
                    kinds.contains(&t) && *i >= st.cursors.get(t).copied().unwrap_or(0)
                })?;
                let ev = ev.clone();
                for k in kinds {
                    let c = st.cursors.entry((*k).to_owned()).or_insert(0);
                    *c = (*c).max(idx + 1);
                }
                Some(Ok(ev))
            })
            .await
    }

    /// The newest call's recordings, once libsndfile has finished them: the header sizes match
    /// the file, which happens when the call's audio stops. Files are named by the call's start
    /// time in seconds, so two calls starting in the same second share (and garble) one pair.
    pub async fn wait_recording(&self) -> io::Result<Recording> {
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        loop {
            let mut dumps: Vec<PathBuf> = std::fs::read_dir(&self.record_dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("dump-"))
                })
                .collect();
            dumps.sort();
            let newest_dec = dumps
                .iter()
                .rev()
                .find(|p| p.to_string_lossy().ends_with("-dec.wav"));
            if let Some(heard) = newest_dec {
                let sent = PathBuf::from(heard.to_string_lossy().replace("-dec.wav", "-enc.wav"));
                let complete = |p: &Path| {
                    std::fs::read(p)
                        .ok()
                        .and_then(|b| parse_wav(&b).ok())
                        .is_some_and(|f| f.complete)
                };
                if complete(heard) && complete(&sent) {
                    return Ok(Recording {
                        sent,
                        heard: heard.clone(),
                    });
                }
            }
            if Instant::now() >= deadline {
                return Err(failure(
                    io::ErrorKind::TimedOut,
                    format!(
                        "baresip: no finished recording in {} ({} dump files)\n--- baresip log tail ---\n{}",
                        self.record_dir.display(),
                        dumps.len(),
                        self.log_tail(TAIL_LINES)
                    ),
                ));
            }
            // libsndfile rewrites the header on close and nothing signals it: poll the file.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Quits cleanly: baresip unregisters (REGISTER with `expires=0`, through the challenge
    /// again), hangs up its calls and exits. Dropping a `Baresip` kills it without unregistering.
    pub async fn quit(self) -> io::Result<ExitStatus> {
        self.send(&json!({ "command": "quit" })).await?;
        self.shared
            .wait_until("quit", DEFAULT_TIMEOUT, |st| st.exited.then_some(Ok(())))
            .await?;
        let mut child = self
            .child
            .lock()
            .unwrap()
            .take()
            .expect("child present until quit");
        tokio::time::timeout(DEFAULT_TIMEOUT, child.wait())
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "baresip did not exit after quit")
            })?
    }

    /// Writes one netstring to ctrl_tcp.
    async fn send(&self, msg: &Value) -> io::Result<()> {
        let body = msg.to_string();
        let frame = format!("{}:{body},", body.len());
        let mut w = self.ctrl.lock().await;
        w.write_all(frame.as_bytes()).await?;
        w.flush().await
    }
}
