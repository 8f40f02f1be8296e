//! `dalle export`: the sampler bundle (dVAE decoder, transformer, caption
//! tokenizer, sampling defaults, and the reranker when the run trained one)
//! from a run's outputs, to a local path or a store URL, for `dalle-sample`.
//! The weights are written as trained (fp32), or as bf16 on request: half
//! the download, and `dalle-sample` loads either (as fp32 weights it then
//! computes with in the precision it is asked for).

use anyhow::{Context, Result};
use dalle_model::dvae::Dvae;
use dalle_model::weights::{self, StoredDtype};
use dalle_sample::bundle::{self, Parts};
use dalle_store::Location;
use dalle_train::config::JobConfig;
use tch::Device;

/// Writes the bundle of the job's run to `out` (default `<run.dir>/bundle`,
/// or `<run.shared_url>/bundle`), its weights stored as `dtype`.
pub fn run(job: &JobConfig, out: Option<String>, dtype: StoredDtype) -> Result<()> {
    let out = out.unwrap_or_else(|| job.shared_output_url("bundle"));
    let read = |path: std::path::PathBuf, made_by: &str| {
        std::fs::read(&path)
            .with_context(|| format!("cannot read {} (written by `{made_by}`)", path.display()))
    };
    let dvae_path = job.dvae_weights_path();
    let dvae = Dvae::load(&dvae_path, Device::Cpu)
        .with_context(|| format!("loading dVAE weights {}", dvae_path.display()))?;
    // The reranker is optional: the rerank stage writes it when it runs.
    let reranker_path = job.rerank_weights_path();
    let reranker = if reranker_path.is_file() {
        tracing::info!(reranker = %reranker_path.display(), "the bundle includes the reranker");
        Some(read(reranker_path.clone(), "dalle rerank train")?)
    } else {
        tracing::info!(
            "the bundle has no reranker (none at {}; add `rerank` to run.stages to train one \
             for dalle-sample --candidates)",
            reranker_path.display()
        );
        None
    };
    // Checkpoints and weights files are fp32; the bundle's copies are
    // converted when asked for (metadata, and so configs, unchanged).
    let stored = |bytes: Vec<u8>, what: &str| -> Result<Vec<u8>> {
        match dtype {
            StoredDtype::F32 => Ok(bytes),
            other => Ok(weights::convert(&bytes, std::path::Path::new(what), other)?),
        }
    };
    let reranker = reranker
        .map(|bytes| stored(bytes, "the reranker"))
        .transpose()?;
    let parts = Parts {
        dvae_decoder: stored(dvae.decoder_bytes()?, "the dVAE decoder")?,
        gpt: stored(
            read(job.gpt_weights_path(), "dalle gpt train")?,
            "the transformer",
        )?,
        tokenizer: String::from_utf8(read(job.tokenizer_path(), "dalle text train-tokenizer")?)
            .context("tokenizer.json is not UTF-8")?,
        reranker,
        sampling: job.gpt.sample.clone(),
    };
    // A reranker that does not fit would make a bundle that does not load:
    // refuse before writing anything.
    parts
        .check_reranker(
            dvae.config().image_size,
            &reranker_path.display().to_string(),
        )
        .context(
            "not exporting: the run's reranker does not fit its transformer and dVAE (retrain it \
             with `dalle rerank train`, or delete it to export a bundle without one)",
        )?;
    let location = Location::parse(&out, &job.store)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bundle::write(&location, parts))?;
    // Loading it back checks that the parts fit together before anyone
    // relies on the bundle.
    runtime
        .block_on(bundle::Bundle::load(&location, Device::Cpu))
        .with_context(|| format!("the bundle just written to {out} does not load"))?;
    tracing::info!(bundle = %location.url, dtype = dtype.name(), "sampler bundle written");
    println!("bundle: {}", location.url);
    Ok(())
}
