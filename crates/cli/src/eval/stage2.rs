//! The transformer `dalle eval` measures: a sampler bundle (`--bundle`, or
//! the run's at `<run.dir>/bundle`), else one assembled in memory from the
//! run's own weights (the dVAE being evaluated, `gpt.safetensors`,
//! `tokenizer.json`), so a run can be evaluated before it is exported; and
//! its held-out loss.

use crate::progress;
use anyhow::{Context, Result, bail};
use dalle_eval::report::{GptReport, PerToken};
use dalle_model::dvae::{Dvae, DvaeDecoder};
use dalle_model::gpt::Gpt;
use dalle_model::text::TextTokenizer;
use dalle_model::weights;
use dalle_sample::bundle::{self, Bundle, Manifest};
use dalle_store::Location;
use dalle_train::config::JobConfig;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// A loaded model and what to call it in the report.
pub struct Stage2 {
    pub bundle: Bundle,
    pub name: String,
}

/// The transformer to evaluate, or `None` with the reason when the run has
/// none. A bundle named by `--bundle` that does not load is an error.
pub fn load(
    job: &JobConfig,
    bundle_url: Option<&str>,
    dvae: &Dvae,
    device: Device,
) -> Result<std::result::Result<Stage2, String>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let load_bundle = |url: &str| -> Result<Stage2> {
        let location = Location::parse(url, &job.store)?;
        let bundle = runtime
            .block_on(Bundle::load(&location, device))
            .with_context(|| format!("loading the bundle {url}"))?;
        Ok(Stage2 {
            bundle,
            name: location.url,
        })
    };
    let stage2 = if let Some(url) = bundle_url {
        load_bundle(url)?
    } else {
        let url = job.shared_output_url("bundle");
        match load_bundle(&url) {
            Ok(stage2) => stage2,
            Err(bundle_error) => {
                let (gpt, tokenizer) = (job.gpt_weights_path(), job.tokenizer_path());
                if !gpt.is_file() || !tokenizer.is_file() {
                    return Ok(Err(format!(
                        "no transformer: no bundle at {url} ({bundle_error:#}) and no {} with {}",
                        gpt.display(),
                        tokenizer.display()
                    )));
                }
                tracing::info!(%url, "no bundle; evaluating the run's transformer weights");
                from_run(job, dvae, &gpt, &tokenizer, device)?
            }
        }
    };
    check_fits(&stage2, dvae)?;
    Ok(Ok(stage2))
}

/// A bundle of the run's parts, as `dalle export` would write it.
fn from_run(
    job: &JobConfig,
    dvae: &Dvae,
    gpt_path: &Path,
    tokenizer_path: &Path,
    device: Device,
) -> Result<Stage2> {
    let decoder_bytes = dvae.decoder_bytes()?;
    let decoder = DvaeDecoder::from_weights(
        &weights::from_bytes(&decoder_bytes, Path::new("the dVAE's decoder"))?,
        device,
    )?;
    let gpt = Gpt::load(gpt_path, device)
        .with_context(|| format!("loading transformer weights {}", gpt_path.display()))?;
    let tokenizer = TextTokenizer::load(tokenizer_path)
        .with_context(|| format!("loading the caption tokenizer {}", tokenizer_path.display()))?;
    if tokenizer.vocab_size() as i64 != gpt.config().text_vocab {
        bail!(
            "{} has {} tokens but {} was trained with {}",
            tokenizer_path.display(),
            tokenizer.vocab_size(),
            gpt_path.display(),
            gpt.config().text_vocab
        );
    }
    let display = |p: &Path| p.display().to_string();
    Ok(Stage2 {
        bundle: Bundle {
            manifest: Manifest {
                format: bundle::FORMAT.into(),
                dvae_decoder: "the evaluated dVAE's decoder".into(),
                gpt: display(gpt_path),
                tokenizer: display(tokenizer_path),
                reranker: None,
                sampling: job.gpt.sample.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
            },
            decoder,
            gpt,
            tokenizer,
            reranker: None,
        },
        name: display(gpt_path),
    })
}

/// The held-out images' tokens come from the evaluated dVAE: its codebook
/// and grid must be the transformer's.
fn check_fits(stage2: &Stage2, dvae: &Dvae) -> Result<()> {
    let (g, d) = (stage2.bundle.gpt.config(), dvae.config());
    if g.image_vocab != d.vocab_size || g.image_grid != d.grid_size() {
        bail!(
            "the transformer of {} reads {} codes on a {}×{} grid, but the dVAE evaluated \
             makes {} codes on a {}×{} grid (--weights of another run?)",
            stage2.name,
            g.image_vocab,
            g.image_grid,
            g.image_grid,
            d.vocab_size,
            d.grid_size(),
            d.grid_size()
        );
    }
    Ok(())
}

/// Cross-entropy of the held-out captions and their images' `(N, h, w)`
/// tokens, `batch` samples at a time, dropout off; samples without a
/// caption (image files) are left out. `None` when none has one.
pub fn held_out_loss(
    stage2: &Stage2,
    captions: &[String],
    tokens: &Tensor,
    text_weight: f64,
    batch: usize,
) -> Result<Option<GptReport>> {
    let keep: Vec<usize> = (0..captions.len())
        .filter(|&i| !captions[i].trim().is_empty())
        .collect();
    if keep.is_empty() {
        return Ok(None);
    }
    let gpt = &stage2.bundle.gpt;
    let text_len = gpt.config().text_len as usize;
    let mut ids = Vec::with_capacity(keep.len() * text_len);
    for &i in &keep {
        ids.extend(stage2.bundle.tokenizer.encode(&captions[i], text_len)?.ids);
    }
    let n = keep.len() as i64;
    let text = Tensor::from_slice(&ids).view([n, text_len as i64]);
    let index = Tensor::from_slice(&keep.iter().map(|&i| i as i64).collect::<Vec<_>>());
    let image = tokens.view([tokens.size()[0], -1]).index_select(0, &index);
    let bar = progress::bar(n as u64, "gpt loss");
    let (mut text_sum, mut image_sum) = (0.0, 0.0);
    tch::no_grad(|| -> Result<()> {
        for start in (0..n).step_by(batch.max(1)) {
            let m = (n - start).min(batch.max(1) as i64);
            let loss = gpt.loss(
                &text.narrow(0, start, m),
                &image.narrow(0, start, m),
                text_weight,
                false,
            )?;
            text_sum += loss.text.to_kind(Kind::Double).double_value(&[]) * m as f64;
            image_sum += loss.image.to_kind(Kind::Double).double_value(&[]) * m as f64;
            bar.inc(m as u64);
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    let (text, image) = (text_sum / n as f64, image_sum / n as f64);
    if !text.is_finite() || !image.is_finite() {
        bail!(
            "the held-out loss of {} is not finite: text {text}, image {image}",
            stage2.name
        );
    }
    Ok(Some(GptReport {
        model: stage2.name.clone(),
        samples: keep.len(),
        loss: text_weight * text + (1.0 - text_weight) * image,
        text_loss_weight: text_weight,
        text: PerToken::nats(text),
        image: PerToken::nats(image),
    }))
}
