//! `sautikit phone`: a test call without a phone network. It calls a number the way a carrier
//! does (SIP over UDP or TCP, G.711 RTP, RFC 4733 keys) and prints the call's life as it
//! happens, then the call's record from the API.

mod device;
mod media;
mod report;
mod ua;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use sautikit_sip::sdp;
use sautikit_sip::stream::StreamFramer;
use sautikit_sip::transaction::Transport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;

pub use device::{DeviceEvent, DevicePlan, PhoneDevice};
pub use media::{MediaEvent, Negotiated, PhoneMedia};
pub use ua::{CallEvent, CallPlan, Party, PhoneCall};

#[derive(Debug, Subcommand)]
pub enum PhoneCommand {
    /// Call a number the way a carrier does and show the call's life as it happens.
    Call(CallArgs),
    /// Register a SIP credential as a softphone does and answer the calls that ring it.
    Register(RegisterArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RegisterArgs {
    /// The credential's username (`ts_…`).
    #[arg(long)]
    pub username: String,
    /// Its password.
    #[arg(long, env = "SAUTIKIT_SIP_PASSWORD", hide_env_values = true)]
    pub password: String,
    /// The engine's SIP listener.
    #[arg(long, env = "SAUTIKIT_SIP_SERVER", default_value = "127.0.0.1:5060")]
    pub server: String,
    /// The SIP domain of the address of record (default: the server's address).
    #[arg(long)]
    pub domain: Option<String>,
    /// SIP over TCP instead of UDP.
    #[arg(long)]
    pub tcp: bool,
    /// Seconds the registration asks for (it is refreshed halfway).
    #[arg(long, default_value_t = 300)]
    pub expires: u32,
    /// Answer with this WAV file (8 or 16 kHz), then silence.
    #[arg(long, value_name = "FILE")]
    pub answer_with: Option<PathBuf>,
    /// Save what the last call sounded like from here (8 kHz WAV).
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// Hang up this many seconds after answering.
    #[arg(long, value_name = "SECONDS")]
    pub hangup_after: Option<f64>,
    /// Unregister and exit after this many calls (default: run until interrupted).
    #[arg(long)]
    pub calls: Option<u32>,
}

#[derive(Debug, Clone, Args)]
pub struct CallArgs {
    /// The number to call, E.164 with or without `+` (`+254700000001`).
    pub number: String,
    /// The engine's SIP listener.
    #[arg(long, env = "SAUTIKIT_SIP_SERVER", default_value = "127.0.0.1:5060")]
    pub server: String,
    /// SIP over TCP instead of UDP.
    #[arg(long)]
    pub tcp: bool,
    /// The caller's number.
    #[arg(long, default_value = "+254711000000")]
    pub from: String,
    /// Save what the caller heard as a WAV file (8 kHz, 16-bit mono).
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// Send this WAV file (8 or 16 kHz, mono or stereo) as the caller's voice.
    #[arg(long, value_name = "FILE")]
    pub play: Option<PathBuf>,
    /// Keys to press, at seconds after the answer: `1@2.0,2,#` (a key without a time follows
    /// the one before it by half a second; the first defaults to one second).
    #[arg(long, value_name = "KEYS")]
    pub dtmf: Option<String>,
    /// Hang up this many seconds after the answer.
    #[arg(long, value_name = "SECONDS")]
    pub hangup_after: Option<f64>,
    /// Give up on a call not answered within this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    pub ring_timeout: f64,
    /// The API, for the call's record after it ends.
    #[arg(
        long,
        env = "SAUTIKIT_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub api: String,
    /// With a key, the call's record, cost and timeline are printed after it ends.
    #[arg(long, env = "SAUTIKIT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PhoneError {
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Plan(#[from] ua::PlanError),
}

/// The SIP socket (or connection) and the RTP socket of a phone.
struct Sockets {
    signalling: Signalling,
    /// Our SIP address as the engine sees it: the one the route to it leaves from.
    local: SocketAddr,
    transport: Transport,
    rtp: UdpSocket,
    rtp_local: SocketAddr,
}

async fn open_sockets(server: SocketAddr, tcp: bool) -> Result<Sockets, PhoneError> {
    let (signalling, local, transport) = if tcp {
        let stream = TcpStream::connect(server)
            .await
            .map_err(io(format!("connecting to {server} over TCP")))?;
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().map_err(io("the TCP socket"))?;
        let framer = StreamFramer::new();
        (Signalling::Tcp { stream, framer }, local, Transport::Tcp)
    } else {
        let ip = crate::loadtest::uac::route_to(server)
            .map_err(io(format!("finding a route to {server}")))?;
        let socket = UdpSocket::bind(SocketAddr::new(ip, 0))
            .await
            .map_err(io("binding the SIP socket"))?;
        let local = socket.local_addr().map_err(io("the SIP socket"))?;
        (Signalling::Udp(socket), local, Transport::Udp)
    };
    let rtp = UdpSocket::bind(SocketAddr::new(local.ip(), 0))
        .await
        .map_err(io("binding the RTP socket"))?;
    let rtp_local = rtp.local_addr().map_err(io("the RTP socket"))?;
    Ok(Sockets {
        signalling,
        local,
        transport,
        rtp,
        rtp_local,
    })
}

async fn resolve(server: &str) -> Result<SocketAddr, PhoneError> {
    tokio::net::lookup_host(server)
        .await
        .map_err(io(format!("--server {server}")))?
        .next()
        .ok_or_else(|| PhoneError::Invalid(format!("--server {server}: no address")))
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PhoneError {
    let what = what.into();
    move |source| PhoneError::Io { what, source }
}

/// How a call ended, for the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Answered, then hung up by either side.
    Completed,
    /// Refused with a final response, or never answered.
    NotConnected,
}

pub async fn run(command: PhoneCommand) -> Result<Outcome, PhoneError> {
    match command {
        PhoneCommand::Call(args) => call(args).await,
        PhoneCommand::Register(args) => register(args).await,
    }
}

/// Keys in `--dtmf`, each with its time after the answer.
fn parse_keys(text: &str) -> Result<Vec<(Duration, char)>, PhoneError> {
    let bad = |why: &str| PhoneError::Invalid(format!("--dtmf {text:?}: {why}"));
    let mut keys = Vec::new();
    let mut at = Duration::from_millis(500);
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, time) = match part.split_once('@') {
            Some((k, t)) => (k, Some(t)),
            None => (part, None),
        };
        let mut chars = key.chars();
        let (Some(key), None) = (chars.next(), chars.next()) else {
            return Err(bad("each key is one of 0-9 * # A-D"));
        };
        if sautikit_sip::dtmf::key_event(key).is_none() {
            return Err(bad("each key is one of 0-9 * # A-D"));
        }
        at = match time {
            Some(t) => {
                let s: f64 = t
                    .parse()
                    .map_err(|_| bad("a time is seconds after the answer"))?;
                Duration::try_from_secs_f64(s)
                    .map_err(|_| bad("a time is seconds after the answer"))?
            }
            None => at + Duration::from_millis(500),
        };
        keys.push((at, key));
    }
    Ok(keys)
}

/// `--play`: 8 kHz mono samples.
fn load_voice(path: &PathBuf) -> Result<Vec<i16>, PhoneError> {
    let bytes = std::fs::read(path).map_err(io(format!("--play {}", path.display())))?;
    let (rate, channels, samples) = sautikit_sip::wav::parse_wav(&bytes)
        .map_err(|e| PhoneError::Invalid(format!("--play {}: {e}", path.display())))?;
    let mono: Vec<i16> = match channels {
        1 => samples,
        2 => samples
            .chunks_exact(2)
            .map(|c| ((i32::from(c[0]) + i32::from(c[1])) / 2) as i16)
            .collect(),
        _ => {
            return Err(PhoneError::Invalid(format!(
                "--play {}: {channels} channels; mono or stereo only",
                path.display()
            )));
        }
    };
    match rate {
        8_000 => Ok(mono),
        16_000 => {
            let mut out = Vec::with_capacity(mono.len() / 2);
            sautikit_sip::halfband::Downsampler::default().process(&mono, &mut out);
            Ok(out)
        }
        _ => Err(PhoneError::Invalid(format!(
            "--play {}: {rate} Hz; 8 or 16 kHz only",
            path.display()
        ))),
    }
}

/// The call's number as a SIP user: `+` and digits.
fn e164(number: &str, flag: &str) -> Result<String, PhoneError> {
    let digits = number.trim().trim_start_matches('+');
    if digits.is_empty() || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PhoneError::Invalid(format!(
            "{flag} {number:?}: an E.164 number such as +254700000001"
        )));
    }
    Ok(format!("+{digits}"))
}

/// The SIP side's socket.
enum Signalling {
    Udp(UdpSocket),
    Tcp {
        stream: TcpStream,
        framer: StreamFramer,
    },
}

/// What a printed line says, with the time since the INVITE.
struct Printer {
    start: Instant,
}

impl Printer {
    fn line(&self, text: impl std::fmt::Display) {
        let t = self.start.elapsed().as_secs_f64();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{t:8.3}  {text}");
        let _ = out.flush();
    }
}

async fn call(args: CallArgs) -> Result<Outcome, PhoneError> {
    let number = e164(&args.number, "number")?;
    let from_number = e164(&args.from, "--from")?;
    let keys = match &args.dtmf {
        Some(text) => parse_keys(text)?,
        None => Vec::new(),
    };
    let voice = match &args.play {
        Some(path) => load_voice(path)?,
        None => Vec::new(),
    };
    let hangup_after = args
        .hangup_after
        .map(|s| {
            Duration::try_from_secs_f64(s)
                .map_err(|_| PhoneError::Invalid(format!("--hangup-after {s}: seconds, ≥ 0")))
        })
        .transpose()?;
    let ring_timeout = Duration::try_from_secs_f64(args.ring_timeout).map_err(|_| {
        PhoneError::Invalid(format!("--ring-timeout {}: seconds", args.ring_timeout))
    })?;
    let server = resolve(&args.server).await?;

    // Our address as the engine sees it: the one the route to it leaves from.
    let Sockets {
        mut signalling,
        local,
        transport,
        rtp,
        rtp_local,
    } = open_sockets(server, args.tcp).await?;

    let host = match server.ip() {
        IpAddr::V6(ip) => format!("[{ip}]:{}", server.port()),
        IpAddr::V4(ip) => format!("{ip}:{}", server.port()),
    };
    let from_host = match local.ip() {
        IpAddr::V6(ip) => format!("[{ip}]"),
        IpAddr::V4(ip) => ip.to_string(),
    };
    let plan = CallPlan {
        server,
        transport,
        target: format!("sip:{number}@{host}"),
        from: format!("sip:{from_number}@{from_host}"),
        local,
        sdp_offer: sdp::offer(
            rtp_local.ip(),
            rtp_local.port(),
            u64::from(std::process::id()),
        ),
    };
    let printer = Printer {
        start: Instant::now(),
    };
    printer.line(format_args!(
        "calling {number} at {server} ({}) from {from_number}",
        if args.tcp { "TCP" } else { "UDP" }
    ));
    let mut call = PhoneCall::start(&plan, Instant::now())?;
    // Cleared once the call is answered or given up on.
    let mut ring_deadline = Some(Instant::now() + ring_timeout);

    let keys_typed = spawn_key_reader();
    let mut keys_typed = keys_typed;
    let mut media: Option<PhoneMedia> = None;
    let mut remote_rtp: Option<SocketAddr> = None;
    let mut hangup_at: Option<Instant> = None;
    let mut call_id: Option<String> = None;
    let mut sip_buf = vec![0u8; 65_535];
    let mut rtp_buf = vec![0u8; 2_048];
    let mut tcp_open = true;

    loop {
        // Send what is due and report what happened.
        while let Some(t) = call.poll_transmit() {
            send_sip(&mut signalling, t.to.addr, &t.bytes).await;
        }
        if let (Some(m), Some(to)) = (media.as_mut(), remote_rtp) {
            while let Some(packet) = m.poll_packet() {
                let _ = rtp.send_to(&packet, to).await;
            }
        }
        while let Some(event) = call.poll_event() {
            match event {
                CallEvent::Progress { code, reason } => {
                    printer.line(format_args!("{code} {reason}: ringing"));
                }
                CallEvent::Answered {
                    code,
                    call_id: id,
                    sdp: text,
                } => {
                    ring_deadline = None;
                    call_id = id.or(call_id.take());
                    let now = Instant::now();
                    let negotiated = sdp::parse(&text)
                        .ok()
                        .and_then(|offer| sdp::answer(&offer, rtp_local.ip(), 0, 0).ok());
                    match negotiated {
                        Some(a) => {
                            remote_rtp = a.remote_rtp;
                            let mut m = PhoneMedia::new(
                                Negotiated {
                                    codec: a.codec,
                                    payload_type: a.payload_type,
                                    telephone_event: a.telephone_event,
                                },
                                voice.clone(),
                                now,
                            );
                            for (after, key) in &keys {
                                m.press(*key, now + *after);
                            }
                            printer.line(format_args!(
                                "{code}: answered ({}{}){}",
                                a.codec.name(),
                                if a.telephone_event.is_some() {
                                    ", keys as RFC 4733 events"
                                } else {
                                    ""
                                },
                                call_id
                                    .as_deref()
                                    .map(|id| format!(", call {id}"))
                                    .unwrap_or_default()
                            ));
                            media = Some(m);
                        }
                        None => {
                            printer.line(format_args!(
                                "{code}: answered without usable media; hanging up"
                            ));
                            call.hang_up(now);
                        }
                    }
                    hangup_at = hangup_after.map(|after| now + after);
                }
                CallEvent::Refused {
                    code,
                    reason,
                    call_id: id,
                } => {
                    call_id = id.or(call_id.take());
                    printer.line(format_args!("{code} {reason}: the call was not connected"));
                }
                CallEvent::NoAnswer => printer.line("no final response: the call timed out"),
                CallEvent::Ended { by } => printer.line(match by {
                    Party::Them => "they hung up (BYE)",
                    Party::Us => "we hung up (BYE)",
                }),
            }
        }
        if let Some(m) = media.as_mut() {
            if call.is_over() {
                m.finish();
            }
            print_media_events(&printer, m);
        }
        if call.is_over() {
            break;
        }

        let now = Instant::now();
        let mut wake = call.poll_timeout().unwrap_or(now + Duration::from_secs(1));
        if let Some(m) = &media {
            wake = wake.min(m.poll_timeout());
        }
        if let Some(at) = hangup_at {
            wake = wake.min(at);
        }
        if let Some(at) = ring_deadline {
            wake = wake.min(at);
        }
        let wake = tokio::time::Instant::from_std(wake.max(now));
        tokio::select! {
            got = recv_sip(&mut signalling, &mut sip_buf, tcp_open) => match got {
                Ok(messages) => {
                    for (bytes, from) in messages {
                        call.handle_message(&bytes, from.unwrap_or(server), Instant::now());
                    }
                }
                Err(e) => {
                    printer.line(format_args!("the SIP connection failed: {e}"));
                    tcp_open = false;
                    call.hang_up(Instant::now());
                }
            },
            got = rtp.recv_from(&mut rtp_buf) => {
                if let (Ok((n, _)), Some(m)) = (got, media.as_mut()) {
                    m.on_packet(&rtp_buf[..n]);
                }
            }
            Some(key) = keys_typed.recv() => {
                if let Some(m) = media.as_mut() {
                    m.press(key, Instant::now());
                }
            }
            _ = tokio::signal::ctrl_c() => {
                printer.line("interrupted: hanging up");
                call.hang_up(Instant::now());
            }
            () = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                call.handle_timeout(now);
                if let Some(m) = media.as_mut() {
                    m.handle_timeout(now);
                }
                if hangup_at.is_some_and(|at| at <= now) {
                    hangup_at = None;
                    printer.line("hanging up");
                    call.hang_up(now);
                }
                if ring_deadline.is_some_and(|at| at <= now) {
                    ring_deadline = None;
                    printer.line("no answer: cancelling");
                    call.hang_up(now);
                }
            }
        }
    }
    restore_terminal();

    if let (Some(path), Some(m)) = (&args.record, &media) {
        let wav = sautikit_sip::wav::encode_pcm16(8_000, m.heard());
        std::fs::write(path, wav).map_err(io(format!("--record {}", path.display())))?;
        printer.line(format_args!(
            "saved {:.1} s heard to {}",
            m.heard().len() as f64 / 8_000.0,
            path.display()
        ));
    }
    if let Some(id) = &call_id {
        println!("call id: {id}");
    }
    let outcome = if media.is_some() {
        Outcome::Completed
    } else {
        Outcome::NotConnected
    };
    if let (Some(id), Some(key)) = (&call_id, &args.api_key) {
        report::print_call(&args.api, key, id).await;
    }
    Ok(outcome)
}

async fn register(args: RegisterArgs) -> Result<Outcome, PhoneError> {
    let voice = match &args.answer_with {
        Some(path) => load_voice(path)?,
        None => Vec::new(),
    };
    let hangup_after = args
        .hangup_after
        .map(|s| {
            Duration::try_from_secs_f64(s)
                .map_err(|_| PhoneError::Invalid(format!("--hangup-after {s}: seconds, ≥ 0")))
        })
        .transpose()?;
    if args.expires == 0 {
        return Err(PhoneError::Invalid("--expires 0: at least 1 second".into()));
    }
    let server = resolve(&args.server).await?;
    let Sockets {
        mut signalling,
        local,
        transport,
        rtp,
        rtp_local,
    } = open_sockets(server, args.tcp).await?;
    let domain = args
        .domain
        .clone()
        .unwrap_or_else(|| server.ip().to_string());
    let printer = Printer {
        start: Instant::now(),
    };
    printer.line(format_args!(
        "registering {}@{domain} at {server} ({})",
        args.username,
        if args.tcp { "TCP" } else { "UDP" }
    ));
    let mut device = PhoneDevice::start(
        DevicePlan {
            server,
            transport,
            domain,
            username: args.username.clone(),
            password: args.password.clone(),
            local,
            rtp: rtp_local,
            expires: args.expires,
        },
        Instant::now(),
    );
    let mut media: Option<(PhoneMedia, Option<SocketAddr>)> = None;
    let mut heard: Vec<i16> = Vec::new();
    let mut hangup_at: Option<Instant> = None;
    let mut registered = false;
    let mut calls_ended = 0u32;
    let mut stopping = false;
    let mut sip_buf = vec![0u8; 65_535];
    let mut rtp_buf = vec![0u8; 2_048];
    loop {
        while let Some(t) = device.poll_transmit() {
            send_sip(&mut signalling, t.to.addr, &t.bytes).await;
        }
        if let Some((m, Some(to))) = media.as_mut() {
            while let Some(packet) = m.poll_packet() {
                let _ = rtp.send_to(&packet, *to).await;
            }
        }
        while let Some(event) = device.poll_event() {
            match event {
                DeviceEvent::Registered { expires } => {
                    if !registered {
                        printer.line(format_args!("registered for {expires} s"));
                    }
                    registered = true;
                }
                DeviceEvent::RegistrationFailed { code, reason } => {
                    printer.line(format_args!("registration refused: {code} {reason}"));
                }
                DeviceEvent::Unregistered => printer.line("unregistered"),
                DeviceEvent::Ringing { from, .. } => {
                    printer.line(format_args!("call from {from}: ringing, answering"));
                }
                DeviceEvent::Answered { answer } => {
                    printer.line(format_args!("answered ({})", answer.codec.name()));
                    let now = Instant::now();
                    media = Some((
                        PhoneMedia::new(
                            Negotiated {
                                codec: answer.codec,
                                payload_type: answer.payload_type,
                                telephone_event: answer.telephone_event,
                            },
                            voice.clone(),
                            now,
                        ),
                        answer.remote_rtp,
                    ));
                    hangup_at = hangup_after.map(|after| now + after);
                }
                DeviceEvent::Ended { by_us } => {
                    printer.line(if by_us {
                        "we hung up (BYE)"
                    } else {
                        "they hung up"
                    });
                    if let Some((mut m, _)) = media.take() {
                        m.finish();
                        print_media_events(&printer, &mut m);
                        heard = m.heard().to_vec();
                    }
                    hangup_at = None;
                    calls_ended += 1;
                    if args.calls.is_some_and(|n| calls_ended >= n) && !stopping {
                        stopping = true;
                        device.stop(Instant::now());
                    }
                }
            }
        }
        if let Some((m, _)) = media.as_mut() {
            print_media_events(&printer, m);
        }
        if device.is_done() {
            break;
        }
        let now = Instant::now();
        let mut wake = device
            .poll_timeout()
            .unwrap_or(now + Duration::from_secs(1));
        if let Some((m, _)) = &media {
            wake = wake.min(m.poll_timeout());
        }
        if let Some(at) = hangup_at {
            wake = wake.min(at);
        }
        let wake = tokio::time::Instant::from_std(wake.max(now));
        tokio::select! {
            got = recv_sip(&mut signalling, &mut sip_buf, true) => match got {
                Ok(messages) => {
                    for (bytes, from) in messages {
                        device.handle_message(&bytes, from.unwrap_or(server), Instant::now());
                    }
                }
                Err(e) => {
                    printer.line(format_args!("the SIP connection failed: {e}"));
                    break;
                }
            },
            got = rtp.recv_from(&mut rtp_buf) => {
                if let (Ok((n, _)), Some((m, _))) = (got, media.as_mut()) {
                    m.on_packet(&rtp_buf[..n]);
                }
            }
            _ = tokio::signal::ctrl_c(), if !stopping => {
                printer.line("interrupted: unregistering");
                stopping = true;
                device.stop(Instant::now());
            }
            () = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                device.handle_timeout(now);
                if let Some((m, _)) = media.as_mut() {
                    m.handle_timeout(now);
                }
                if hangup_at.is_some_and(|at| at <= now) {
                    hangup_at = None;
                    printer.line("hanging up");
                    device.hang_up(now);
                }
            }
        }
    }
    if let Some(path) = &args.record {
        let wav = sautikit_sip::wav::encode_pcm16(8_000, &heard);
        std::fs::write(path, wav).map_err(io(format!("--record {}", path.display())))?;
        printer.line(format_args!(
            "saved {:.1} s heard to {}",
            heard.len() as f64 / 8_000.0,
            path.display()
        ));
    }
    Ok(if registered {
        Outcome::Completed
    } else {
        Outcome::NotConnected
    })
}

fn print_media_events(printer: &Printer, m: &mut PhoneMedia) {
    while let Some(event) = m.poll_event() {
        match event {
            MediaEvent::PromptStarted { n } => printer.line(format_args!("prompt {n} starts")),
            MediaEvent::PromptEnded { n, length } => printer.line(format_args!(
                "prompt {n} ends ({:.1} s)",
                length.as_secs_f64()
            )),
            MediaEvent::KeySent { key } => printer.line(format_args!("sent key {key}")),
            MediaEvent::KeyNotSent { key } => printer.line(format_args!(
                "key {key} not sent: the answer accepted no telephone-events"
            )),
        }
    }
}

async fn send_sip(signalling: &mut Signalling, to: SocketAddr, bytes: &[u8]) {
    match signalling {
        Signalling::Udp(socket) => {
            let _ = socket.send_to(bytes, to).await;
        }
        Signalling::Tcp { stream, .. } => {
            let _ = stream.write_all(bytes).await;
        }
    }
}

/// The next messages from the engine (a TCP read can carry several, or part of one).
async fn recv_sip(
    signalling: &mut Signalling,
    buf: &mut [u8],
    open: bool,
) -> std::io::Result<Vec<(Vec<u8>, Option<SocketAddr>)>> {
    match signalling {
        Signalling::Udp(socket) => {
            let (n, from) = socket.recv_from(buf).await?;
            Ok(vec![(buf[..n].to_vec(), Some(from))])
        }
        Signalling::Tcp { stream, framer } => {
            if !open {
                return std::future::pending().await;
            }
            let n = stream.read(buf).await?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the engine closed the connection",
                ));
            }
            framer.push(&buf[..n]);
            let mut out = Vec::new();
            while let Some(message) = framer.next_message() {
                match message {
                    Ok(bytes) => out.push((bytes, None)),
                    Err(e) => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            e.to_string(),
                        ));
                    }
                }
            }
            Ok(out)
        }
    }
}

/// Keys typed on the terminal, sent as they are typed. Read on a thread of its own (a blocked
/// read of the terminal must not hold up the end of the program), and only from a terminal.
fn spawn_key_reader() -> mpsc::UnboundedReceiver<char> {
    let (tx, rx) = mpsc::unbounded_channel();
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        return rx;
    }
    raw_terminal();
    let _ = std::thread::Builder::new()
        .name("phone-keys".into())
        .spawn(move || {
            use std::io::Read;
            let mut stdin = std::io::stdin();
            let mut byte = [0u8; 1];
            while let Ok(1) = stdin.read(&mut byte) {
                let key = char::from(byte[0]).to_ascii_uppercase();
                if sautikit_sip::dtmf::key_event(key).is_some() && tx.send(key).is_err() {
                    return;
                }
            }
        });
    rx
}

static SAVED_TERMINAL: std::sync::Mutex<Option<nix::sys::termios::Termios>> =
    std::sync::Mutex::new(None);

/// Keys reach us as they are typed, not after Enter, and are not echoed.
fn raw_terminal() {
    use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
    let stdin = std::io::stdin();
    let Ok(saved) = tcgetattr(&stdin) else {
        return;
    };
    let mut raw = saved.clone();
    raw.local_flags
        .remove(LocalFlags::ICANON | LocalFlags::ECHO);
    if tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_ok()
        && let Ok(mut slot) = SAVED_TERMINAL.lock()
    {
        *slot = Some(saved);
    }
}

fn restore_terminal() {
    use nix::sys::termios::{SetArg, tcsetattr};
    if let Ok(mut slot) = SAVED_TERMINAL.lock()
        && let Some(saved) = slot.take()
    {
        let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &saved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_each_other_unless_timed() {
        let keys = parse_keys("1@2.0,2,#").unwrap();
        assert_eq!(
            keys,
            [
                (Duration::from_secs(2), '1'),
                (Duration::from_millis(2_500), '2'),
                (Duration::from_secs(3), '#'),
            ]
        );
        assert_eq!(parse_keys("5").unwrap(), [(Duration::from_secs(1), '5')]);
        for bad in ["x", "12", "1@soon", "1@-1"] {
            assert!(parse_keys(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn numbers_are_e164() {
        assert_eq!(e164("254700000001", "n").unwrap(), "+254700000001");
        assert_eq!(e164("+254700000001", "n").unwrap(), "+254700000001");
        assert!(e164("07000", "n").is_ok());
        assert!(e164("+2547x", "n").is_err());
        assert!(e164("", "n").is_err());
    }
}
