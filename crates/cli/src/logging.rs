//! The `dalle` command's logs, on stderr: text for people (ANSI colours
//! only when stderr is a terminal and NO_COLOR is unset) or, with
//! `--log-format json` (or `DALLE_LOG_FORMAT=json`), one JSON object per
//! line for log pipelines:
//!
//! ```json
//! {"timestamp":"2025-01-01T00:00:00.000000Z","level":"INFO","target":"dalle_train::dvae",
//!  "fields":{"message":"step 20 | loss …","rank":0,"stage":"dvae","step":20,"generation":1},
//!  "spans":["worker","stage"]}
//! ```
//!
//! `fields` holds the event's own fields and those of the spans it is in
//! (a worker's `rank` and `generation`, the `stage` it runs), innermost
//! first, the event's winning. `RUST_LOG` filters both (default `info`).

use std::fmt;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for people.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the logger for the process (once, before anything logs, while
/// the process has one thread).
pub fn init(format: LogFormat) {
    if format == LogFormat::Json && std::env::var("DALLE_LOG_FORMAT").as_deref() != Ok("json") {
        // Worker processes that `dalle launch` starts log as it does.
        // SAFETY: called first thing in main, before any other thread
        // exists that could read the environment.
        unsafe { std::env::set_var("DALLE_LOG_FORMAT", "json") };
    }
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // The worker's usage figures come from log lines, whatever is shown.
    let registry = tracing_subscriber::registry()
        .with(crate::usage::Capture.with_filter(crate::usage::Capture::targets()));
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => registry
            .with(
                layer
                    // Colour codes only for a person at a terminal: log
                    // files, Slurm logs and `launch`'s forwarding of worker
                    // output stay plain text.
                    .with_ansi(
                        std::io::IsTerminal::is_terminal(&std::io::stderr())
                            && std::env::var_os("NO_COLOR").is_none(),
                    )
                    .with_filter(filter()),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                layer
                    .with_ansi(false)
                    .fmt_fields(JsonFields::new())
                    .event_format(JsonLines)
                    .with_filter(filter()),
            )
            .init(),
    }
}

/// The JSON line of an event.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = serde_json::Map::new();
        event.record(&mut JsonVisitor(&mut fields));
        let mut spans = Vec::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope {
                spans.push(serde_json::Value::from(span.name()));
                let extensions = span.extensions();
                // The fields of a span are kept as JSON text (JsonFields).
                let Some(formatted) = extensions.get::<FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(serde_json::Value::Object(map)) =
                    serde_json::from_str::<serde_json::Value>(formatted)
                {
                    for (name, value) in map {
                        fields.entry(name).or_insert(value);
                    }
                }
            }
        }
        spans.reverse();
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let meta = event.metadata();
        let mut line = serde_json::Map::new();
        line.insert("timestamp".into(), timestamp.into());
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        line.insert("fields".into(), fields.into());
        if !spans.is_empty() {
            line.insert("spans".into(), spans.into());
        }
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// An event's fields as JSON values.
struct JsonVisitor<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl JsonVisitor<'_> {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        self.0.insert(field.name().into(), value);
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN nor infinities.
        let value = serde_json::Number::from_f64(value)
            .map_or(serde_json::Value::Null, serde_json::Value::Number);
        self.put(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.put(field, value.to_string().into());
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.put(field, value.to_string().into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines written to a buffer by a JSON subscriber.
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_the_fields_of_their_spans() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || writer.clone())
                .fmt_fields(JsonFields::new())
                .event_format(JsonLines),
        );
        tracing::subscriber::with_default(subscriber, || {
            let _worker = tracing::info_span!("worker", rank = 3, generation = 2).entered();
            let _stage = tracing::info_span!("stage", stage = "dvae").entered();
            tracing::info!(
                step = 20u64,
                rank = 3,
                tflops = 1.5,
                nan = f64::NAN,
                "step {} done",
                20
            );
            tracing::warn!(reason = %"a peer died", "leaving");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        let fields = &lines[0]["fields"];
        assert_eq!(lines[0]["level"], "INFO");
        assert_eq!(fields["message"], "step 20 done");
        assert_eq!(
            (
                &fields["step"],
                &fields["rank"],
                &fields["generation"],
                &fields["stage"]
            ),
            (&20.into(), &3.into(), &2.into(), &"dvae".into())
        );
        assert_eq!(fields["tflops"], 1.5);
        assert!(fields["nan"].is_null());
        assert_eq!(lines[0]["spans"], serde_json::json!(["worker", "stage"]));
        assert_eq!(lines[1]["fields"]["reason"], "a peer died");
        assert!(lines[0]["timestamp"].as_str().unwrap().ends_with('Z'));
    }
}
