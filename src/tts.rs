//! Text to speech for the `say` verb (DESIGN §8): the [`Synthesizer`] backed by the `espeak-ng`
//! program, resampled to 8 kHz for G.711 and cached in memory and on disk.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sautikit_actors::synth::{
    Audio, MAX_TEXT_CHARS, SAMPLE_RATE, SpeechRequest, SynthError, Synthesizer,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::OnceCell;

use crate::cache::{SingleFlight, WeightedLru, lock};

/// How long one espeak-ng run may take. A 4096-character prompt synthesizes in well under a second
/// on one core; this only catches a wedged process.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

/// In-memory cache budget: 64 MiB of 16-bit samples, about 70 minutes of prompts.
pub const DEFAULT_MEMORY_BUDGET_BYTES: usize = 64 << 20;

/// espeak-ng's language when the request names none: Twilio's default for `<Say>`.
pub const DEFAULT_LANGUAGE: &str = "en-us";

/// Upper bound on espeak-ng's WAV output. `MAX_TEXT_CHARS` of speech is a few minutes, i.e. a few
/// MiB at 22.05 kHz; anything far beyond that is a broken program, not a prompt.
const MAX_ESPEAK_OUTPUT_BYTES: usize = 64 << 20;
/// Enough of stderr to explain a failure.
const MAX_STDERR_BYTES: usize = 8 << 10;
/// Bumped whenever the cached audio would change for the same espeak-ng version (resampler,
/// post-processing, file format), so stale entries are never served.
const CACHE_FORMAT: &str = "sautikit-tts-v1";

/// Construction options for [`EspeakSynthesizer`]; `Default` is what the service uses.
#[derive(Debug, Clone)]
pub struct EspeakOptions {
    /// The program: a bare name is looked up on `PATH`.
    pub program: PathBuf,
    /// Limit for one espeak-ng run.
    pub timeout: Duration,
    /// Bytes of PCM kept in the in-memory LRU.
    pub memory_budget_bytes: usize,
}

impl Default for EspeakOptions {
    fn default() -> Self {
        Self {
            program: PathBuf::from("espeak-ng"),
            timeout: DEFAULT_TIMEOUT,
            memory_budget_bytes: DEFAULT_MEMORY_BUDGET_BYTES,
        }
    }
}

/// The `say` synthesizer: runs `espeak-ng` (Debian package `espeak-ng`) and resamples its
/// 22,050 Hz output to 8 kHz with a band-limited FFT resampler (`rubato`).
///
/// # Voices and languages
///
/// `language` (BCP-47, case-insensitive, `_` accepted for `-`) picks the espeak-ng language voice:
///
/// | `language` | espeak-ng voice |
/// |---|---|
/// | absent | `en-us` |
/// | `en-US` | `en-us` |
/// | `en-GB` | `en-gb` |
/// | `en-KE` | `en-gb` (Kenyan English follows British norms; espeak-ng has no Kenyan voice) |
/// | `sw-KE`, `sw-TZ`, `sw` | `sw` (Swahili) |
/// | any other tag | the tag lower-cased, if espeak-ng has that language (`fr-FR` → `fr-fr`); else its primary subtag if espeak-ng has that (`de-AT` → `de`); else `UnknownLanguage` |
///
/// `voice` (case-insensitive for the named ones) picks how it sounds:
///
/// | `voice` | espeak-ng voice |
/// |---|---|
/// | absent | the language voice as is (espeak-ng's default, male) |
/// | `alice` | female variant 2: `<language>+f2` |
/// | `woman` | female variant 3: `<language>+f3` |
/// | `man` | male variant 3: `<language>+m3` |
/// | an espeak-ng variant (`--voices=variant`, by name or file, e.g. `Annie`, `aunty`, `f4`) | `<language>+<variant>` |
/// | an espeak-ng voice (`--voices`, by language code or name, e.g. `en-gb-scotland`, `Swahili`), optionally `+<variant>` | that voice; `language` is then only validated |
/// | anything else | `UnknownVoice` |
///
/// Voice names are checked against espeak-ng's own `--voices` lists (read once, on first use) and
/// limited to `[A-Za-z0-9_.+-]`, so nothing the customer sends reaches espeak-ng unvetted. The text
/// goes to espeak-ng on stdin, never as an argument, so text like `--help` is spoken, not obeyed.
/// Text is trimmed; empty text is `EmptyText`; text over [`MAX_TEXT_CHARS`] characters is refused.
///
/// # Caching
///
/// Entries are keyed by SHA-256 of (cache format, espeak-ng version, resolved espeak-ng voice,
/// trimmed text): `en-US` and `en-us` share an entry, and upgrading espeak-ng re-synthesizes.
/// Tiers: an LRU of [`Audio`] bounded by total samples, then one 8 kHz WAV per entry under the
/// cache directory (written to a temporary file, synced, then renamed, so a crash never leaves a
/// half file under a real name), then espeak-ng. Concurrent requests for the same uncached key share
/// one flight (one disk read or one espeak-ng run), which runs as its own task so a caller hanging
/// up does not waste the work.
pub struct EspeakSynthesizer {
    inner: Arc<Inner>,
}

struct Inner {
    program: PathBuf,
    cache_dir: PathBuf,
    timeout: Duration,
    catalog: OnceCell<Arc<Catalog>>,
    memory: Mutex<Lru>,
    inflight: SingleFlight<CacheKey, Result<Audio, SynthError>>,
    synth_runs: AtomicU64,
}

type CacheKey = [u8; 32];
/// The memory tier, bounded by total samples.
type Lru = WeightedLru<CacheKey, Audio>;

impl EspeakSynthesizer {
    /// A synthesizer caching under `cache_dir` (created if missing). Fails if `espeak-ng` is not
    /// installed.
    pub fn new(cache_dir: PathBuf) -> Result<Self, SynthError> {
        Self::with_options(cache_dir, EspeakOptions::default())
    }

    pub fn with_options(cache_dir: PathBuf, options: EspeakOptions) -> Result<Self, SynthError> {
        let program = find_program(&options.program).ok_or_else(|| {
            SynthError::Failed(format!(
                "the text-to-speech program {:?} was not found on PATH; install the Debian \
                 package espeak-ng (apt-get install espeak-ng)",
                options.program
            ))
        })?;
        std::fs::create_dir_all(&cache_dir).map_err(|e| {
            SynthError::Failed(format!(
                "cannot create the TTS cache directory {}: {e}",
                cache_dir.display()
            ))
        })?;
        let budget_samples = options.memory_budget_bytes / std::mem::size_of::<i16>();
        Ok(Self {
            inner: Arc::new(Inner {
                program,
                cache_dir,
                timeout: options.timeout,
                catalog: OnceCell::new(),
                memory: Mutex::new(Lru::new(budget_samples)),
                inflight: SingleFlight::new(),
                synth_runs: AtomicU64::new(0),
            }),
        })
    }

    /// How many times this instance ran espeak-ng to synthesize (cache misses on both tiers).
    /// Probing espeak-ng's version and voice lists, once per instance, is not counted.
    pub fn synth_runs(&self) -> u64 {
        self.inner.synth_runs.load(Ordering::Relaxed)
    }

    pub fn cache_dir(&self) -> &Path {
        &self.inner.cache_dir
    }
}

#[async_trait]
impl Synthesizer for EspeakSynthesizer {
    async fn synthesize(&self, request: &SpeechRequest) -> Result<Audio, SynthError> {
        let text = request.text.trim();
        if text.is_empty() {
            return Err(SynthError::EmptyText);
        }
        let chars = text.chars().count();
        if chars > MAX_TEXT_CHARS {
            return Err(SynthError::Failed(format!(
                "say text is {chars} characters long; the limit is {MAX_TEXT_CHARS}"
            )));
        }
        let catalog = self.inner.catalog().await?;
        let voice = resolve_voice(
            &catalog,
            request.voice.as_deref(),
            request.language.as_deref(),
        )?;
        let key = cache_key(&catalog.version, &voice, text);

        if let Some(audio) = self.inner.memory_hit(&key) {
            return Ok(audio);
        }
        // A flight puts its result in memory before it leaves the in-flight map, so looking
        // again under that map's lock closes the gap between the first look and joining.
        self.inner
            .inflight
            .join(
                key,
                || self.inner.memory_hit(&key).map(Ok),
                || self.inner.clone().fill(key, voice, text.to_owned()),
                |e| Err(SynthError::Failed(format!("synthesis task failed: {e}"))),
            )
            .await
    }
}

impl Inner {
    fn memory_hit(&self, key: &CacheKey) -> Option<Audio> {
        let audio = lock(&self.memory).get(key)?;
        metrics::counter!("sautikit_tts_requests_total", "source" => "memory").increment(1);
        Some(audio)
    }

    async fn catalog(&self) -> Result<Arc<Catalog>, SynthError> {
        // Not cached on failure: a transient probe failure is retried by the next request.
        self.catalog
            .get_or_try_init(|| async {
                let version = self.run(&[OsStr::new("--version")], None).await?;
                let voices = self.run(&[OsStr::new("--voices")], None).await?;
                let variants = self.run(&[OsStr::new("--voices=variant")], None).await?;
                let catalog = Catalog::parse(
                    &String::from_utf8_lossy(&version),
                    &String::from_utf8_lossy(&voices),
                    &String::from_utf8_lossy(&variants),
                );
                if catalog.languages.is_empty() {
                    return Err(SynthError::Failed(
                        "espeak-ng --voices listed no voices (is espeak-ng-data installed?)".into(),
                    ));
                }
                Ok(Arc::new(catalog))
            })
            .await
            .cloned()
    }

    /// One flight: disk, else espeak-ng; the result goes to memory before the flight ends.
    async fn fill(
        self: Arc<Self>,
        key: CacheKey,
        voice: String,
        text: String,
    ) -> Result<Audio, SynthError> {
        let path = self.cache_dir.join(format!("{}.wav", hex::encode(key)));
        match read_cached(&path).await {
            Ok(Some(audio)) => {
                metrics::counter!("sautikit_tts_requests_total", "source" => "disk").increment(1);
                lock(&self.memory).insert(key, audio.clone());
                return Ok(audio);
            }
            Ok(None) => {}
            Err(e) => {
                // A corrupt entry is dropped and rebuilt rather than failing the call.
                tracing::warn!(path = %path.display(), error = %e, "discarding unreadable TTS cache entry");
                let _ = tokio::fs::remove_file(&path).await;
            }
        }

        let audio = match self.espeak(&voice, &text).await {
            Ok(audio) => audio,
            Err(e) => {
                metrics::counter!("sautikit_tts_failures_total").increment(1);
                tracing::warn!(voice = %voice, error = %e, "speech synthesis failed");
                return Err(e);
            }
        };
        metrics::counter!("sautikit_tts_requests_total", "source" => "espeak").increment(1);
        let to_write = audio.clone();
        let dir = self.cache_dir.clone();
        let written =
            tokio::task::spawn_blocking(move || write_cached(&dir, &path, &to_write)).await;
        match written {
            Ok(Ok(())) => {}
            // Serving the prompt matters more than caching it: log and go on.
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot write TTS cache entry"),
            Err(e) => tracing::warn!(error = %e, "TTS cache writer task failed"),
        }
        lock(&self.memory).insert(key, audio.clone());
        Ok(audio)
    }

    async fn espeak(&self, voice: &str, text: &str) -> Result<Audio, SynthError> {
        self.synth_runs.fetch_add(1, Ordering::Relaxed);
        // Text on stdin, UTF-8 (`-b 1`), WAV on stdout: no argument carries customer text.
        let args = [
            OsStr::new("-v"),
            OsStr::new(voice),
            OsStr::new("-b"),
            OsStr::new("1"),
            OsStr::new("--stdout"),
            OsStr::new("--stdin"),
        ];
        let wav = self.run(&args, Some(text.as_bytes())).await?;
        if wav.is_empty() {
            return Err(SynthError::Failed("espeak-ng produced no output".into()));
        }
        let (rate, samples) =
            parse_wav(&wav).map_err(|e| SynthError::Failed(format!("espeak-ng output: {e}")))?;
        if samples.is_empty() {
            return Err(SynthError::Failed("espeak-ng produced no audio".into()));
        }
        let resampled = tokio::task::spawn_blocking(move || {
            sautikit_actors::resample::to_8k_mono(&samples, rate)
        })
        .await
        .map_err(|e| SynthError::Failed(format!("resampler task failed: {e}")))?
        .map_err(|e| SynthError::Failed(e.to_string()))?;
        if resampled.is_empty() {
            return Err(SynthError::Failed("resampling produced no audio".into()));
        }
        Ok(Audio::from(resampled))
    }

    /// Runs espeak-ng without a shell, feeding `stdin`, and returns its stdout. A non-zero exit,
    /// the timeout or oversized output is an error; on timeout the process is killed.
    async fn run(&self, args: &[&OsStr], stdin: Option<&[u8]>) -> Result<Vec<u8>, SynthError> {
        let mut child = Command::new(&self.program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                SynthError::Failed(format!("cannot run {}: {e}", self.program.display()))
            })?;
        let mut child_stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let work = async {
            // Feed stdin while draining stdout and stderr, so neither side can block the other
            // on a full pipe.
            let feed = async {
                if let (Some(pipe), Some(bytes)) = (child_stdin.as_mut(), stdin) {
                    pipe.write_all(bytes).await?;
                    pipe.shutdown().await?;
                }
                // Closing stdin is what tells espeak-ng the text is complete.
                drop(child_stdin.take());
                Ok::<(), std::io::Error>(())
            };
            let (fed, out, err) = tokio::join!(
                feed,
                read_capped(stdout, MAX_ESPEAK_OUTPUT_BYTES),
                read_capped(stderr, MAX_STDERR_BYTES)
            );
            let status = child.wait().await;
            (fed, out, err, status)
        };
        let (fed, out, err, status) =
            tokio::time::timeout(self.timeout, work)
                .await
                .map_err(|_| {
                    SynthError::Failed(format!(
                        "espeak-ng did not finish within {:?}",
                        self.timeout
                    ))
                })?;
        let status =
            status.map_err(|e| SynthError::Failed(format!("waiting for espeak-ng: {e}")))?;
        let stderr_text = err
            .map(|(bytes, _)| String::from_utf8_lossy(&bytes).trim().to_owned())
            .unwrap_or_default();
        if !status.success() {
            return Err(SynthError::Failed(format!(
                "espeak-ng exited with {status}{}{stderr_text}",
                if stderr_text.is_empty() { "" } else { ": " }
            )));
        }
        fed.map_err(|e| SynthError::Failed(format!("writing text to espeak-ng: {e}")))?;
        let (out, truncated) =
            out.map_err(|e| SynthError::Failed(format!("reading espeak-ng output: {e}")))?;
        if truncated {
            return Err(SynthError::Failed(format!(
                "espeak-ng output exceeds {MAX_ESPEAK_OUTPUT_BYTES} bytes"
            )));
        }
        Ok(out)
    }
}

/// Reads a pipe to its end, keeping at most `cap` bytes; the flag says whether more was there.
async fn read_capped<R: AsyncRead + Unpin>(
    pipe: Option<R>,
    cap: usize,
) -> std::io::Result<(Vec<u8>, bool)> {
    let Some(pipe) = pipe else {
        return Ok((Vec::new(), false));
    };
    let mut bytes = Vec::new();
    pipe.take(cap as u64 + 1).read_to_end(&mut bytes).await?;
    let truncated = bytes.len() > cap;
    bytes.truncate(cap);
    Ok((bytes, truncated))
}

fn find_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return is_executable(program).then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.is_file() && meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        meta.is_file()
    }
}

fn cache_key(espeak_version: &str, voice: &str, text: &str) -> CacheKey {
    // Length-prefixed fields, so no choice of text can collide with another voice's key.
    let mut hasher = Sha256::new();
    for field in [CACHE_FORMAT, espeak_version, voice, text] {
        hasher.update((field.len() as u64).to_le_bytes());
        hasher.update(field.as_bytes());
    }
    hasher.finalize().into()
}

// ---------------------------------------------------------------------------------------------
// Voices

/// What this espeak-ng installation offers, from its `--version` and `--voices` output.
#[derive(Debug, Default)]
struct Catalog {
    version: String,
    /// Lower-case language codes `-v` accepts (`en-us`, `sw`, also `en` from "Other Languages").
    languages: HashSet<String>,
    /// Lower-case voice name → its language code (`swahili` → `sw`).
    voice_names: HashMap<String, String>,
    /// Lower-case variant name or file name → file name, which is what `+variant` needs
    /// (`auntie` → `aunty`).
    variants: HashMap<String, String>,
}

impl Catalog {
    fn parse(version: &str, voices: &str, variants: &str) -> Self {
        let mut catalog = Catalog {
            version: version.trim().to_owned(),
            ..Catalog::default()
        };
        // Columns: Pty Language Age/Gender VoiceName File [(other-language priority)...]
        for line in voices.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 5 {
                continue;
            }
            let language = cols[1].to_ascii_lowercase();
            if !is_safe_name(&language) {
                continue;
            }
            for other in cols[5..].iter().filter_map(|c| c.strip_prefix('(')) {
                let other = other.to_ascii_lowercase();
                if is_safe_name(&other) {
                    catalog.languages.insert(other);
                }
            }
            if is_safe_name(cols[3]) {
                catalog
                    .voice_names
                    .insert(cols[3].to_ascii_lowercase(), language.clone());
            }
            catalog.languages.insert(language);
        }
        for line in variants.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // A file name with a space ("!v/Mr serious") has more columns; such variants are
            // left out rather than passed to `-v` half-quoted.
            if cols.len() != 5 {
                continue;
            }
            let Some(file) = cols[4].strip_prefix("!v/") else {
                continue;
            };
            if !is_safe_name(file) {
                continue;
            }
            catalog
                .variants
                .insert(file.to_ascii_lowercase(), file.to_owned());
            if is_safe_name(cols[3]) {
                catalog
                    .variants
                    .insert(cols[3].to_ascii_lowercase(), file.to_owned());
            }
        }
        catalog
    }

    /// A `-v` voice for `name`: a language code or a voice name.
    fn voice(&self, name: &str) -> Option<String> {
        let lower = name.to_ascii_lowercase();
        if self.languages.contains(&lower) {
            return Some(lower);
        }
        self.voice_names.get(&lower).cloned()
    }

    fn variant(&self, name: &str) -> Option<&str> {
        self.variants
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// Names that are safe to hand to `-v`: no option syntax, no paths, no spaces.
fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'+'))
}

/// The espeak-ng language voice for a BCP-47 tag; see [`EspeakSynthesizer`] for the table.
fn map_language(catalog: &Catalog, tag: &str) -> Result<String, SynthError> {
    let unknown = || SynthError::UnknownLanguage(tag.to_owned());
    let norm = tag.trim().replace('_', "-").to_ascii_lowercase();
    if !is_safe_name(&norm) || norm.contains(['+', '.']) {
        return Err(unknown());
    }
    let mapped = match norm.as_str() {
        "en-ke" => "en-gb",
        "sw-ke" | "sw-tz" => "sw",
        other => other,
    };
    if catalog.languages.contains(mapped) {
        return Ok(mapped.to_owned());
    }
    match mapped.split_once('-') {
        Some((primary, _)) if catalog.languages.contains(primary) => Ok(primary.to_owned()),
        _ => Err(unknown()),
    }
}

/// The `-v` argument for a request; see [`EspeakSynthesizer`] for the table.
fn resolve_voice(
    catalog: &Catalog,
    voice: Option<&str>,
    language: Option<&str>,
) -> Result<String, SynthError> {
    let language = match language.map(str::trim).filter(|l| !l.is_empty()) {
        Some(tag) => map_language(catalog, tag)?,
        None => DEFAULT_LANGUAGE.to_owned(),
    };
    let Some(voice) = voice.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(language);
    };
    let unknown = || SynthError::UnknownVoice(voice.to_owned());
    match voice.to_ascii_lowercase().as_str() {
        "alice" => return Ok(format!("{language}+f2")),
        "woman" => return Ok(format!("{language}+f3")),
        "man" => return Ok(format!("{language}+m3")),
        _ => {}
    }
    if !is_safe_name(voice) {
        return Err(unknown());
    }
    let (base, variant) = match voice.split_once('+') {
        Some((base, variant)) => (base, Some(variant)),
        None => (voice, None),
    };
    if let Some(base) = catalog.voice(base) {
        return match variant {
            None => Ok(base),
            Some(variant) => catalog
                .variant(variant)
                .map(|v| format!("{base}+{v}"))
                .ok_or_else(unknown),
        };
    }
    match (variant, catalog.variant(base)) {
        (None, Some(v)) => Ok(format!("{language}+{v}")),
        _ => Err(unknown()),
    }
}

// ---------------------------------------------------------------------------------------------
// Audio: WAV

/// Parses a 16-bit PCM mono WAV. Tolerates a RIFF or data size larger than the bytes present:
/// espeak-ng writes a placeholder size (0x7ffff000 or 0xffffffff) when streaming to stdout.
fn parse_wav(bytes: &[u8]) -> Result<(u32, Vec<i16>), String> {
    if bytes.len() < 12 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err("not a RIFF/WAVE file".into());
    }
    let mut pos = 12;
    let mut format: Option<(u16, u16, u32, u16)> = None;
    while pos + 8 <= bytes.len() {
        let id = &bytes[pos..pos + 4];
        let declared = u32::from_le_bytes([
            bytes[pos + 4],
            bytes[pos + 5],
            bytes[pos + 6],
            bytes[pos + 7],
        ]) as usize;
        let body_start = pos + 8;
        let available = bytes.len() - body_start;
        match id {
            b"fmt " => {
                if declared < 16 || declared > available {
                    return Err("truncated fmt chunk".into());
                }
                let f = &bytes[body_start..body_start + 16];
                let tag = u16::from_le_bytes([f[0], f[1]]);
                let channels = u16::from_le_bytes([f[2], f[3]]);
                let rate = u32::from_le_bytes([f[4], f[5], f[6], f[7]]);
                let bits = u16::from_le_bytes([f[14], f[15]]);
                format = Some((tag, channels, rate, bits));
            }
            b"data" => {
                let Some((tag, channels, rate, bits)) = format else {
                    return Err("data chunk before fmt chunk".into());
                };
                // 0xFFFE is WAVE_FORMAT_EXTENSIBLE, which some writers use for plain PCM too.
                if !matches!(tag, 1 | 0xFFFE) || channels != 1 || bits != 16 {
                    return Err(format!(
                        "unsupported format (tag {tag}, {channels} channels, {bits} bits); \
                         expected 16-bit mono PCM"
                    ));
                }
                if rate == 0 {
                    return Err("sample rate 0".into());
                }
                let len = declared.min(available) & !1;
                let samples = bytes[body_start..body_start + len]
                    .chunks_exact(2)
                    .map(|b| i16::from_le_bytes([b[0], b[1]]))
                    .collect();
                return Ok((rate, samples));
            }
            _ => {}
        }
        // Chunks are padded to an even length.
        pos = body_start
            .saturating_add(declared)
            .saturating_add(declared & 1);
    }
    Err("no data chunk".into())
}

/// A canonical 44-byte-header WAV of 8 kHz 16-bit mono PCM: what the cache stores, and playable by
/// anything for inspection.
fn encode_wav(samples: &[i16]) -> Vec<u8> {
    sautikit_sip::wav::encode_pcm16(SAMPLE_RATE, samples)
}

/// `Ok(None)` when there is no entry; `Err` when there is one but it is unusable.
async fn read_cached(path: &Path) -> Result<Option<Audio>, String> {
    let bytes = match tokio::fs::read(path).await {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let (rate, samples) = parse_wav(&bytes)?;
    if rate != SAMPLE_RATE {
        return Err(format!("sample rate {rate}, expected {SAMPLE_RATE}"));
    }
    if samples.is_empty() {
        return Err("no samples".into());
    }
    Ok(Some(Audio::from(samples)))
}

/// Writes a cache entry atomically: temporary file in the same directory, fsync, rename. Readers
/// see either no file or a complete one, even across a crash.
fn write_cached(dir: &Path, path: &Path, audio: &Audio) -> std::io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .and_then(OsStr::to_str)
        .unwrap_or("entry.wav");
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&encode_wav(&audio.samples))?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const HELLO: &str = "Hello! Thank you for calling.";

    fn synth(dir: &Path) -> EspeakSynthesizer {
        EspeakSynthesizer::new(dir.to_path_buf()).unwrap()
    }

    fn req(text: &str) -> SpeechRequest {
        SpeechRequest::new(text).with_language("en-US")
    }

    fn rms(samples: &[i16]) -> f64 {
        let sum: f64 = samples.iter().map(|&s| f64::from(s).powi(2)).sum();
        (sum / samples.len().max(1) as f64).sqrt()
    }

    /// espeak-ng's own output at its native rate, fetched without any of the code under test.
    fn reference_native(text: &str, voice: &str) -> (u32, Vec<f64>) {
        let out = std::process::Command::new("espeak-ng")
            .args(["-v", voice, "--stdout", "--", text])
            .output()
            .unwrap();
        assert!(out.status.success());
        let wav = out.stdout;
        // espeak-ng writes a fixed 44-byte header.
        assert_eq!(&wav[0..4], b"RIFF");
        assert_eq!(&wav[36..40], b"data");
        let rate = u32::from_le_bytes(wav[24..28].try_into().unwrap());
        let samples = wav[44..]
            .chunks_exact(2)
            .map(|b| f64::from(i16::from_le_bytes([b[0], b[1]])))
            .collect();
        (rate, samples)
    }

    /// A plain windowed-sinc low-pass decimator (Blackman window, 3.6 kHz cutoff): slow and
    /// obviously correct, as the yardstick for the FFT resampler.
    fn reference_to_8k(x: &[f64], rate_in: u32) -> Vec<f64> {
        let ratio = f64::from(rate_in) / 8000.0;
        let fc = 3600.0 / f64::from(rate_in); // cycles per input sample
        let half = 64i64;
        let n_out = (x.len() as f64 / ratio) as usize;
        (0..n_out)
            .map(|n| {
                let t = n as f64 * ratio;
                let centre = t.floor() as i64;
                let mut acc = 0.0;
                for k in centre - half..=centre + half {
                    if k < 0 || k as usize >= x.len() {
                        continue;
                    }
                    let d = t - k as f64;
                    let sinc = if d.abs() < 1e-9 {
                        2.0 * fc
                    } else {
                        (2.0 * std::f64::consts::PI * fc * d).sin() / (std::f64::consts::PI * d)
                    };
                    let w = d / (2.0 * half as f64 + 2.0) + 0.5; // 0..1 across the window
                    let blackman = 0.42 - 0.5 * (2.0 * std::f64::consts::PI * w).cos()
                        + 0.08 * (4.0 * std::f64::consts::PI * w).cos();
                    acc += x[k as usize] * sinc * blackman;
                }
                acc
            })
            .collect()
    }

    /// Best normalised cross-correlation over small lags.
    fn best_ncc(a: &[f64], b: &[f64], max_lag: i64) -> (f64, i64) {
        let mut best = (f64::MIN, 0);
        for lag in -max_lag..=max_lag {
            let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
            for (i, &x) in a.iter().enumerate() {
                let j = i as i64 + lag;
                if j < 0 || j as usize >= b.len() {
                    continue;
                }
                let y = b[j as usize];
                ab += x * y;
                aa += x * x;
                bb += y * y;
            }
            let ncc = ab / (aa.sqrt() * bb.sqrt()).max(1e-12);
            if ncc > best.0 {
                best = (ncc, lag);
            }
        }
        best
    }

    #[tokio::test]
    async fn hello_en_us_is_8k_speech_matching_espeak() {
        let dir = tempfile::tempdir().unwrap();
        let tts = synth(dir.path());
        let audio = tts.synthesize(&req(HELLO)).await.unwrap();
        let secs = audio.duration().as_secs_f64();
        assert!((1.0..5.0).contains(&secs), "duration {secs}s");
        assert!(rms(&audio.samples) > 500.0, "rms {}", rms(&audio.samples));

        let (rate, native) = reference_native(HELLO, "en-us");
        assert_eq!(rate, 22050);
        let reference = reference_to_8k(&native, rate);
        // Same length to within a few samples: the resampler trims its delay.
        let diff = reference.len().abs_diff(audio.len());
        assert!(diff < 10, "lengths {} vs {}", reference.len(), audio.len());
        let ours: Vec<f64> = audio.samples.iter().map(|&s| f64::from(s)).collect();
        let (ncc, lag) = best_ncc(&ours, &reference, 20);
        println!("ncc {ncc:.4} at lag {lag}");
        assert!(ncc >= 0.9, "ncc {ncc} at lag {lag}");
        assert!(lag.abs() <= 2, "misaligned by {lag} samples");
    }

    #[tokio::test]
    async fn served_from_memory_then_disk() {
        let dir = tempfile::tempdir().unwrap();
        let tts = synth(dir.path());
        let first = tts.synthesize(&req(HELLO)).await.unwrap();
        assert_eq!(tts.synth_runs(), 1);
        let second = tts.synthesize(&req(HELLO)).await.unwrap();
        assert_eq!(tts.synth_runs(), 1, "second call must not run espeak-ng");
        assert!(
            Arc::ptr_eq(&first.samples, &second.samples),
            "memory hit shares the buffer"
        );
        // The same prompt with the language spelled differently is the same entry.
        let third = tts
            .synthesize(&SpeechRequest::new(format!(" {HELLO}\n")).with_language("en_us"))
            .await
            .unwrap();
        assert_eq!(tts.synth_runs(), 1);
        assert_eq!(third, first);

        // One complete WAV on disk and no temporary leftovers.
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        assert!(files[0].ends_with(".wav") && !files[0].starts_with('.'));

        let fresh = synth(dir.path());
        let from_disk = fresh.synthesize(&req(HELLO)).await.unwrap();
        assert_eq!(fresh.synth_runs(), 0, "served from disk");
        assert_eq!(from_disk, first);
    }

    #[tokio::test]
    async fn corrupt_disk_entry_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let first = synth(dir.path()).synthesize(&req(HELLO)).await.unwrap();
        let entry = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::write(&entry, b"RIFF garbage").unwrap();
        let tts = synth(dir.path());
        let again = tts.synthesize(&req(HELLO)).await.unwrap();
        assert_eq!(tts.synth_runs(), 1);
        assert_eq!(again, first);
        assert_eq!(
            parse_wav(&std::fs::read(&entry).unwrap()).unwrap().1.len(),
            first.len()
        );
    }

    #[tokio::test]
    async fn concurrent_identical_requests_synthesize_once() {
        let dir = tempfile::tempdir().unwrap();
        let tts = Arc::new(synth(dir.path()));
        let request = req("Please hold while we connect you.");
        let results = futures::future::join_all((0..10).map(|_| {
            let tts = tts.clone();
            let request = request.clone();
            tokio::spawn(async move { tts.synthesize(&request).await })
        }))
        .await;
        let audios: Vec<Audio> = results.into_iter().map(|r| r.unwrap().unwrap()).collect();
        assert_eq!(tts.synth_runs(), 1);
        assert!(audios.iter().all(|a| a == &audios[0]));
    }

    #[tokio::test]
    async fn empty_text_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tts = synth(dir.path());
        for text in ["", "   \n\t"] {
            assert_eq!(tts.synthesize(&req(text)).await, Err(SynthError::EmptyText));
        }
        let long = "a ".repeat(MAX_TEXT_CHARS);
        assert!(matches!(
            tts.synthesize(&req(&long)).await,
            Err(SynthError::Failed(_))
        ));
        assert_eq!(tts.synth_runs(), 0);
    }

    #[tokio::test]
    async fn hostile_text_is_spoken_not_executed() {
        let dir = tempfile::tempdir().unwrap();
        let tts = synth(dir.path());
        let marker = dir.path().join("pwned");
        let texts = [
            "--help".to_owned(),
            "-v".to_owned(),
            "--version --stdout".to_owned(),
            format!("; touch {} #", marker.display()),
            format!("$(touch {})", marker.display()),
            "; rm -rf /".to_owned(),
        ];
        for text in &texts {
            let audio = tts.synthesize(&req(text)).await.unwrap();
            assert!(
                audio.duration() > Duration::from_millis(150),
                "{text:?}: {:?}",
                audio.duration()
            );
            assert!(rms(&audio.samples) > 100.0, "{text:?} is silent");
        }
        assert!(!marker.exists());
    }

    #[tokio::test]
    async fn languages_and_voices() {
        let dir = tempfile::tempdir().unwrap();
        let tts = synth(dir.path());
        assert_eq!(
            tts.synthesize(&req(HELLO).with_language("xx-YY")).await,
            Err(SynthError::UnknownLanguage("xx-YY".into()))
        );
        assert_eq!(
            tts.synthesize(&req(HELLO).with_language("--help")).await,
            Err(SynthError::UnknownLanguage("--help".into()))
        );
        for voice in ["robot9000", "../../etc/passwd", "-w /tmp/x", "en-us+nosuch"] {
            assert_eq!(
                tts.synthesize(&req(HELLO).with_voice(voice)).await,
                Err(SynthError::UnknownVoice(voice.into())),
                "{voice}"
            );
        }
        assert_eq!(tts.synth_runs(), 0);

        let mut seen: Vec<Audio> = Vec::new();
        for voice in ["alice", "Man", "woman"] {
            let audio = tts.synthesize(&req(HELLO).with_voice(voice)).await.unwrap();
            assert!(rms(&audio.samples) > 500.0, "{voice}");
            assert!(!seen.contains(&audio), "{voice} sounds like another voice");
            seen.push(audio);
        }
        let swahili = tts
            .synthesize(
                &SpeechRequest::new("Karibu, asante kwa kupiga simu.").with_language("sw-KE"),
            )
            .await
            .unwrap();
        assert!(rms(&swahili.samples) > 500.0);
        assert!(swahili.duration() > Duration::from_millis(800));
        for (voice, language) in [
            (Some("en-gb-scotland"), None),
            (Some("Annie"), Some("en-KE")),
            (Some("en-us+f4"), None),
            (None, Some("de-AT")),
        ] {
            let mut request = SpeechRequest::new("One two three.");
            request.voice = voice.map(str::to_owned);
            request.language = language.map(str::to_owned);
            let audio = tts.synthesize(&request).await.unwrap();
            assert!(rms(&audio.samples) > 500.0, "{request:?}");
        }
    }

    #[test]
    fn voice_resolution_table() {
        let catalog = Catalog::parse(
            "eSpeak NG text-to-speech: 1.51",
            "Pty Language       Age/Gender VoiceName          File                 Other Languages\n \
             2  en-gb           --/M      English_(Great_Britain) gmw/en               (en 2)\n \
             2  en-us           --/M      English_(America)  gmw/en-US            (en 3)\n \
             5  sw              --/M      Swahili            bnt/sw\n \
             5  de              --/M      German             gmw/de\n",
            "Pty Language       Age/Gender VoiceName          File                 Other Languages\n \
             5  variant         --/F      Auntie             !v/aunty\n \
             5  variant         --/M      Mr_Serious         !v/Mr serious\n \
             5  variant         --/F      female3            !v/f3\n",
        );
        let r = |v: Option<&str>, l: Option<&str>| resolve_voice(&catalog, v, l);
        assert_eq!(r(None, None).unwrap(), "en-us");
        assert_eq!(r(None, Some("en-US")).unwrap(), "en-us");
        assert_eq!(r(None, Some("en-GB")).unwrap(), "en-gb");
        assert_eq!(r(None, Some("en-KE")).unwrap(), "en-gb");
        assert_eq!(r(None, Some("sw-KE")).unwrap(), "sw");
        assert_eq!(r(None, Some("sw")).unwrap(), "sw");
        assert_eq!(r(None, Some("en")).unwrap(), "en");
        assert_eq!(r(None, Some("de-AT")).unwrap(), "de");
        assert_eq!(r(Some("woman"), Some("sw-KE")).unwrap(), "sw+f3");
        assert_eq!(r(Some("ALICE"), None).unwrap(), "en-us+f2");
        assert_eq!(r(Some("man"), Some("en-GB")).unwrap(), "en-gb+m3");
        assert_eq!(r(Some("Auntie"), None).unwrap(), "en-us+aunty");
        assert_eq!(r(Some("swahili"), Some("en-US")).unwrap(), "sw");
        assert_eq!(r(Some("sw+female3"), None).unwrap(), "sw+f3");
        assert!(matches!(
            r(Some("Mr_Serious"), None),
            Err(SynthError::UnknownVoice(_))
        ));
        assert!(matches!(
            r(None, Some("fr-FR")),
            Err(SynthError::UnknownLanguage(_))
        ));
        assert!(matches!(
            r(Some("alice"), Some("sw+x")),
            Err(SynthError::UnknownLanguage(_))
        ));
    }

    #[test]
    fn wav_parser_handles_streaming_sizes_and_odd_chunks() {
        let mut wav = encode_wav(&[1, -2, 3]);
        assert_eq!(parse_wav(&wav).unwrap(), (8000, vec![1, -2, 3]));
        // espeak-ng --stdout: placeholder sizes.
        wav[4..8].copy_from_slice(&0xFFFF_FFFFu32.to_le_bytes());
        wav[40..44].copy_from_slice(&0xFFFF_FFFFu32.to_le_bytes());
        wav.push(7); // a stray odd byte at the end is dropped
        assert_eq!(parse_wav(&wav).unwrap(), (8000, vec![1, -2, 3]));
        // An odd-sized chunk before data is skipped with its pad byte.
        let mut with_list = wav[..36].to_vec();
        with_list.extend_from_slice(b"LIST\x03\x00\x00\x00abc\x00");
        with_list.extend_from_slice(&wav[36..]);
        assert_eq!(parse_wav(&with_list).unwrap().1, vec![1, -2, 3]);
        assert!(parse_wav(b"RIFF").is_err());
        assert!(parse_wav(b"Usage: espeak-ng [options] [\"<words>\"]").is_err());
        assert!(parse_wav(&wav[..30]).is_err());
    }

    #[test]
    fn lru_evicts_least_recently_used_by_samples() {
        let mut lru = Lru::new(10);
        let audio = |n: usize| Audio::from(vec![0i16; n]);
        lru.insert([1; 32], audio(4));
        lru.insert([2; 32], audio(4));
        assert!(lru.get(&[1; 32]).is_some()); // 2 is now the oldest
        lru.insert([3; 32], audio(4));
        assert!(lru.get(&[2; 32]).is_none());
        assert!(lru.get(&[1; 32]).is_some());
        assert!(lru.get(&[3; 32]).is_some());
        assert_eq!(lru.used_samples, 8);
        lru.insert([4; 32], audio(11)); // larger than the budget: not kept
        assert!(lru.get(&[4; 32]).is_none());
        assert_eq!(lru.used_samples, 8);
    }

    /// A stand-in espeak-ng that answers the probes with the real one and misbehaves on synthesis.
    fn fake_espeak(dir: &Path, behaviour: &str) -> EspeakSynthesizer {
        use std::os::unix::fs::PermissionsExt;
        let script = dir.join("fake-espeak");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\ncase \"$1\" in --version|--voices*) exec espeak-ng \"$@\";; esac\n{behaviour}\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        EspeakSynthesizer::with_options(
            dir.join("cache"),
            EspeakOptions {
                program: script,
                timeout: Duration::from_millis(1500),
                ..EspeakOptions::default()
            },
        )
        .unwrap()
    }

    async fn failure(behaviour: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let tts = fake_espeak(dir.path(), behaviour);
        match tts.synthesize(&req(HELLO)).await {
            Err(SynthError::Failed(message)) => message,
            other => panic!("{behaviour}: {other:?}"),
        }
    }

    #[tokio::test]
    async fn failures_are_reported() {
        let missing = EspeakSynthesizer::with_options(
            PathBuf::from("/nonexistent/cache"),
            EspeakOptions {
                program: PathBuf::from("no-such-espeak-program"),
                ..EspeakOptions::default()
            },
        );
        match missing {
            Err(SynthError::Failed(m)) => assert!(m.contains("espeak-ng"), "{m}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        let m = failure("echo 'voice broke' >&2; exit 3").await;
        assert!(
            m.contains("exit status: 3") && m.contains("voice broke"),
            "{m}"
        );
        let started = Instant::now();
        let m = failure("exec sleep 30").await;
        assert!(m.contains("did not finish"), "{m}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let m = failure("cat >/dev/null; echo not a wav").await;
        assert!(m.contains("RIFF"), "{m}");
        let m = failure("cat >/dev/null").await;
        assert!(m.contains("no output"), "{m}");
        // A header with no samples.
        let m = failure("cat >/dev/null; printf 'RIFF\\044\\000\\000\\000WAVEfmt \\020\\000\\000\\000\\001\\000\\001\\000\\042\\126\\000\\000\\104\\254\\000\\000\\002\\000\\020\\000data\\000\\000\\000\\000'").await;
        assert!(m.contains("no audio"), "{m}");
    }

    #[tokio::test]
    async fn failed_flight_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let tts = fake_espeak(dir.path(), "exit 1");
        assert!(tts.synthesize(&req(HELLO)).await.is_err());
        assert!(tts.synthesize(&req(HELLO)).await.is_err());
        assert_eq!(tts.synth_runs(), 2, "a failure is not cached");
    }

    /// Prints cold and cached latency for the README: `cargo test -p sautikit --lib --release
    /// tts_latency -- --ignored --nocapture`.
    #[tokio::test]
    #[ignore]
    async fn tts_latency() {
        fn median(mut v: Vec<Duration>) -> Duration {
            v.sort();
            v[v.len() / 2]
        }
        let dir = tempfile::tempdir().unwrap();
        let tts = synth(dir.path());
        tts.synthesize(&req("Warm up.")).await.unwrap(); // loads the voice lists
        let mut cold = Vec::new();
        for i in 0..5 {
            let text = format!("{HELLO} Press {i} for billing, or stay on the line.");
            let start = Instant::now();
            tts.synthesize(&req(&text)).await.unwrap();
            cold.push(start.elapsed());
        }
        let text = format!("{HELLO} Press 0 for billing, or stay on the line.");
        let mut memory = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            tts.synthesize(&req(&text)).await.unwrap();
            memory.push(start.elapsed());
        }
        let mut disk = Vec::new();
        for _ in 0..5 {
            let fresh = synth(dir.path());
            fresh.synthesize(&req("Warm up.")).await.unwrap();
            let start = Instant::now();
            fresh.synthesize(&req(&text)).await.unwrap();
            disk.push(start.elapsed());
            assert_eq!(fresh.synth_runs(), 0);
        }
        let audio = tts.synthesize(&req(&text)).await.unwrap();
        println!(
            "tts latency for a {:.1} s prompt, median of 5: cold (espeak-ng + resample + disk write) {:?}, \
             memory hit {:?}, disk hit {:?}",
            audio.duration().as_secs_f64(),
            median(cold),
            median(memory),
            median(disk)
        );
    }
}
