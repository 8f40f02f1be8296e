//! The sampler bundle: everything `dalle-sample` needs, under one URL.
//!
//! ```text
//! <url>/dvae-decoder.safetensors   the dVAE decoder and its config
//! <url>/gpt.safetensors            the transformer and its config
//! <url>/tokenizer.json             the caption tokenizer
//! <url>/bundle.json                manifest: format, file names, sampling defaults
//! ```
//!
//! The manifest is written last: a bundle whose manifest is there is
//! complete (an interrupted export leaves no manifest, and loading says so).
//! Loading checks that the three parts fit together.

use anyhow::{Context, Result, bail};
use dalle_model::dvae::DvaeDecoder;
use dalle_model::gpt::Gpt;
use dalle_model::gpt::sample::SamplingConfig;
use dalle_model::text::TextTokenizer;
use dalle_model::weights;
use dalle_store::Location;
use dalle_store::object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::Device;

pub const FORMAT: &str = "dalle-rs/bundle/1";
pub const MANIFEST: &str = "bundle.json";
const DECODER: &str = "dvae-decoder.safetensors";
const GPT: &str = "gpt.safetensors";
const TOKENIZER: &str = "tokenizer.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub dvae_decoder: String,
    pub gpt: String,
    pub tokenizer: String,
    /// Defaults for sampling; command-line options override them.
    pub sampling: SamplingConfig,
    /// The dalle-rs version that wrote the bundle.
    pub version: String,
}

/// The serialised parts of a bundle, as `dalle export` gathers them.
pub struct Parts {
    pub dvae_decoder: Vec<u8>,
    pub gpt: Vec<u8>,
    pub tokenizer: String,
    pub sampling: SamplingConfig,
}

/// Writes a bundle under `location`, the manifest last.
pub async fn write(location: &Location, parts: Parts) -> Result<()> {
    let manifest = Manifest {
        format: FORMAT.into(),
        dvae_decoder: DECODER.into(),
        gpt: GPT.into(),
        tokenizer: TOKENIZER.into(),
        sampling: parts.sampling,
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let files = [
        (DECODER, parts.dvae_decoder),
        (GPT, parts.gpt),
        (TOKENIZER, parts.tokenizer.into_bytes()),
        (
            MANIFEST,
            serde_json::to_vec_pretty(&manifest).expect("manifest serialises"),
        ),
    ];
    for (name, bytes) in files {
        let path = location.child(name);
        location
            .store
            .put(&path, PutPayload::from(bytes))
            .await
            .with_context(|| format!("writing {}", location.describe(&path)))?;
    }
    Ok(())
}

/// A loaded bundle, ready to sample.
pub struct Bundle {
    pub manifest: Manifest,
    pub decoder: DvaeDecoder,
    pub gpt: Gpt,
    pub tokenizer: TextTokenizer,
}

async fn read(location: &Location, name: &str) -> Result<Vec<u8>> {
    let path = location.child(name);
    let url = location.describe(&path);
    let result = location.store.get(&path).await;
    match result {
        Ok(object) => Ok(object
            .bytes()
            .await
            .with_context(|| format!("reading {url}"))?
            .to_vec()),
        Err(dalle_store::object_store::Error::NotFound { .. }) => {
            bail!("bundle {} is incomplete: {url} is missing", location.url)
        }
        Err(e) => Err(e).with_context(|| format!("reading {url}")),
    }
}

impl Bundle {
    pub async fn load(location: &Location, device: Device) -> Result<Self> {
        let manifest_url = location.describe(&location.child(MANIFEST));
        let manifest: Manifest = match read(location, MANIFEST).await {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{manifest_url} is not a bundle manifest"))?,
            Err(e) => bail!(
                "{e:#} (no bundle at {}: write one with `dalle export`)",
                location.url
            ),
        };
        if manifest.format != FORMAT {
            bail!(
                "{manifest_url}: format `{}`, expected `{FORMAT}`",
                manifest.format
            );
        }
        let describe = |name: &str| location.describe(&location.child(name));
        let decoder_bytes = read(location, &manifest.dvae_decoder).await?;
        let gpt_bytes = read(location, &manifest.gpt).await?;
        let tokenizer_bytes = read(location, &manifest.tokenizer).await?;

        let decoder_url = describe(&manifest.dvae_decoder);
        let decoder = DvaeDecoder::from_weights(
            &weights::from_bytes(&decoder_bytes, Path::new(&decoder_url))?,
            device,
        )?;
        let gpt_url = describe(&manifest.gpt);
        let gpt = Gpt::from_weights(
            &weights::from_bytes(&gpt_bytes, Path::new(&gpt_url))?,
            device,
        )?;
        let tokenizer = TextTokenizer::from_json(&tokenizer_bytes, &describe(&manifest.tokenizer))?;

        let (g, d) = (gpt.config(), decoder.config());
        if tokenizer.vocab_size() as i64 != g.text_vocab {
            bail!(
                "bundle {}: the tokenizer has {} tokens but the transformer was trained with {}",
                location.url,
                tokenizer.vocab_size(),
                g.text_vocab
            );
        }
        if d.vocab_size != g.image_vocab || d.grid_size() != g.image_grid {
            bail!(
                "bundle {}: the dVAE decoder ({} codes, {}×{} grid) does not match the \
                 transformer ({} codes, {}×{} grid)",
                location.url,
                d.vocab_size,
                d.grid_size(),
                d.grid_size(),
                g.image_vocab,
                g.image_grid,
                g.image_grid
            );
        }
        Ok(Self {
            manifest,
            decoder,
            gpt,
            tokenizer,
        })
    }
}
