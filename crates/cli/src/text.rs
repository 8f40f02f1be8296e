//! `dalle text …`: the caption tokenizer of stage 2.

use crate::progress;
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use dalle_data::parquet_source::{self, Unit};
use dalle_model::text::TextTokenizer;
use dalle_store::Location;
use dalle_train::config::JobConfig;
use indicatif::ProgressBar;
use std::path::PathBuf;
use tokio::runtime::Runtime;

/// At most this many captions, spread evenly over the dataset, are kept
/// to measure token counts after training.
const STATS_SAMPLE: usize = 100_000;

#[derive(Subcommand)]
pub enum TextCommand {
    /// Train the caption BPE tokenizer on a dataset's captions ([text]
    /// config) and write tokenizer.json.
    TrainTokenizer {
        /// Dataset to read (path or URL); defaults to `data.url`.
        #[arg(long)]
        input: Option<String>,
        /// Where to write; defaults to `<run.dir>/tokenizer.json`.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub fn run(cmd: TextCommand, job: &JobConfig) -> Result<()> {
    match cmd {
        TextCommand::TrainTokenizer { input, out } => {
            let input = input.unwrap_or_else(|| job.data_url());
            let out = out.unwrap_or_else(|| job.tokenizer_path());
            train_tokenizer(job, &input, &out)
        }
    }
}

fn train_tokenizer(job: &JobConfig, input: &str, out: &std::path::Path) -> Result<()> {
    let location = Location::parse(input, &job.store)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let units = runtime
        .block_on(parquet_source::plan_units(&location, &job.data.columns))
        .with_context(|| format!("planning the reads of {input}"))?;
    let total: usize = units.iter().map(|u| u.rows).sum();
    let mut captions = Captions {
        runtime: &runtime,
        units: &units,
        next_unit: 0,
        buffer: Vec::new().into_iter(),
        bar: progress::bar(total as u64, "captions"),
        stride: total.div_ceil(STATS_SAMPLE).max(1),
        used: 0,
        skipped: 0,
        sample: Vec::new(),
        error: None,
    };
    let trained = TextTokenizer::train(&mut captions, &job.text);
    captions.bar.finish_and_clear();
    if let Some(e) = captions.error {
        return Err(e);
    }
    let tokenizer = match trained {
        Err(_) if captions.used == 0 && captions.next_unit > 0 => bail!(
            "{input} has no captions to train on ({} null or empty)",
            captions.skipped
        ),
        trained => trained.with_context(|| format!("training the tokenizer on {input}"))?,
    };
    tokenizer.save(out)?;

    let text_len = job.text.text_len;
    let (mut sum, mut max, mut truncated) = (0usize, 0usize, 0usize);
    for caption in &captions.sample {
        let tokens = tokenizer.token_count(caption)?;
        sum += tokens;
        max = max.max(tokens);
        truncated += usize::from(tokens > text_len);
    }
    let measured = captions.sample.len().max(1) as f64;
    tracing::info!(
        used = captions.used,
        skipped = captions.skipped,
        vocab_size = tokenizer.vocab_size(),
        requested_vocab_size = job.text.vocab_size,
        measured = captions.sample.len(),
        mean_tokens = format!("{:.1}", sum as f64 / measured),
        max_tokens = max,
        text_len,
        truncated_share = format!("{:.4}", truncated as f64 / measured),
        "trained the caption tokenizer"
    );
    println!(
        "wrote {} ({} tokens) from {} captions of {input} ({} null or empty skipped)",
        out.display(),
        tokenizer.vocab_size(),
        captions.used,
        captions.skipped
    );
    Ok(())
}

/// The dataset's non-empty captions, one row group at a time. A read error
/// ends the iteration and is kept in `error`.
struct Captions<'a> {
    runtime: &'a Runtime,
    units: &'a [Unit],
    next_unit: usize,
    buffer: std::vec::IntoIter<Option<String>>,
    bar: ProgressBar,
    /// Every `stride`-th used caption goes into `sample`.
    stride: usize,
    used: usize,
    skipped: usize,
    sample: Vec<String>,
    error: Option<anyhow::Error>,
}

impl Captions<'_> {
    /// The captions of the next row group, `None` after the last one.
    fn read_next_unit(&mut self) -> Option<Result<Vec<Option<String>>>> {
        let unit = self.units.get(self.next_unit)?;
        self.next_unit += 1;
        let read = self
            .runtime
            .block_on(parquet_source::read_captions(unit))
            .with_context(|| {
                format!(
                    "reading the captions of {} row group {}",
                    unit.file.url, unit.row_group
                )
            });
        Some(read.map(|rows| rows.into_iter().map(|(_, caption)| caption).collect()))
    }
}

impl Iterator for Captions<'_> {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            match self.buffer.next() {
                Some(Some(caption)) if !caption.trim().is_empty() => {
                    if self.used.is_multiple_of(self.stride) {
                        self.sample.push(caption.clone());
                    }
                    self.used += 1;
                    return Some(caption);
                }
                Some(_) => self.skipped += 1,
                None => {
                    if self.error.is_some() {
                        return None;
                    }
                    match self.read_next_unit()? {
                        Ok(captions) => {
                            self.bar.inc(captions.len() as u64);
                            self.buffer = captions.into_iter();
                        }
                        Err(e) => {
                            self.error = Some(e);
                            return None;
                        }
                    }
                }
            }
        }
    }
}
