//! The sampler bundle: everything `dalle-sample` needs, under one URL.
//!
//! ```text
//! <url>/dvae-decoder.safetensors   the dVAE decoder and its config
//! <url>/gpt.safetensors            the transformer and its config
//! <url>/tokenizer.json             the caption tokenizer
//! <url>/reranker.safetensors       the reranker, when the run trained one
//! <url>/bundle.json                manifest: format, file names, sampling defaults
//! ```
//!
//! The manifest is written last: a bundle whose manifest is there is
//! complete (an interrupted export leaves no manifest, and loading says so).
//! Loading checks that the parts fit together.
//!
//! The reranker is optional (the rerank stage that trains it is): the
//! manifest names it only when the bundle carries one, so bundles written
//! before it existed still load, with no reranker. It must read the
//! transformer's caption ids (the same BPE vocabulary and `text_len`) and
//! score images of the size the dVAE decoder draws; `dalle-sample
//! --candidates` uses it to keep the best of N samples per prompt.

use anyhow::{Context, Result, bail};
use dalle_model::dvae::DvaeDecoder;
use dalle_model::gpt::sample::SamplingConfig;
use dalle_model::gpt::{Gpt, GptConfig};
use dalle_model::rerank::{RerankConfig, Reranker};
use dalle_model::text::TextTokenizer;
use dalle_model::weights::{self, WeightFile};
use dalle_store::Location;
use dalle_store::object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::Device;

pub const FORMAT: &str = "dalle-rs/bundle/1";
pub const MANIFEST: &str = "bundle.json";
const DECODER: &str = "dvae-decoder.safetensors";
const GPT: &str = "gpt.safetensors";
const TOKENIZER: &str = "tokenizer.json";
/// The reranker's file name in a bundle.
pub const RERANKER: &str = "reranker.safetensors";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub dvae_decoder: String,
    pub gpt: String,
    pub tokenizer: String,
    /// The reranker of `dalle-sample --candidates`; bundles of runs without
    /// the rerank stage (and older ones) have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reranker: Option<String>,
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
    /// The reranker's weights (`Reranker::save`), when the run has one.
    pub reranker: Option<Vec<u8>>,
    pub sampling: SamplingConfig,
}

impl Parts {
    /// Checks, from the files' metadata alone (no tensors are read), that
    /// the reranker, if any, fits the transformer and the decoder, whose
    /// images are `image_size` pixels square; `reranker` names it in errors.
    pub fn check_reranker(&self, image_size: i64, reranker: &str) -> Result<()> {
        let Some(bytes) = &self.reranker else {
            return Ok(());
        };
        let r = Reranker::config_from_metadata(&metadata_only(bytes, reranker)?)?;
        let g = Gpt::config_from_metadata(&metadata_only(&self.gpt, "the transformer")?)?;
        check_reranker_config(&r, &g, image_size, reranker)
    }
}

/// A safetensors file's metadata, without its tensors (enough for the
/// `config_from_metadata` functions); `source` names it in errors.
fn metadata_only(bytes: &[u8], source: &str) -> Result<WeightFile> {
    let bad = || format!("{source} is not a safetensors file");
    let len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .with_context(bad)?;
    let header = usize::try_from(len)
        .ok()
        .and_then(|len| bytes.get(8..8usize.checked_add(len)?))
        .with_context(bad)?;
    #[derive(Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: HashMap<String, String>,
    }
    let header: Header = serde_json::from_slice(header).with_context(bad)?;
    Ok(WeightFile {
        path: source.into(),
        metadata: header.metadata,
        tensors: BTreeMap::new(),
    })
}

/// Writes a bundle under `location`, the manifest last.
pub async fn write(location: &Location, parts: Parts) -> Result<()> {
    let manifest = Manifest {
        format: FORMAT.into(),
        dvae_decoder: DECODER.into(),
        gpt: GPT.into(),
        tokenizer: TOKENIZER.into(),
        reranker: parts.reranker.as_ref().map(|_| RERANKER.into()),
        sampling: parts.sampling,
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let mut files = vec![
        (DECODER, parts.dvae_decoder),
        (GPT, parts.gpt),
        (TOKENIZER, parts.tokenizer.into_bytes()),
    ];
    files.extend(parts.reranker.map(|bytes| (RERANKER, bytes)));
    files.push((
        MANIFEST,
        serde_json::to_vec_pretty(&manifest).expect("manifest serialises"),
    ));
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
    pub reranker: Option<Reranker>,
}

/// Checks that a reranker (`name` in errors) scores what the transformer
/// and decoder make: the same caption ids and the decoder's image size.
pub fn check_reranker(
    reranker: &Reranker,
    gpt: &Gpt,
    decoder: &DvaeDecoder,
    name: &str,
) -> Result<()> {
    check_reranker_config(
        reranker.config(),
        gpt.config(),
        decoder.config().image_size,
        name,
    )
}

/// [`check_reranker`] on configs: the reranker's text vocabulary and
/// length must be the transformer's and its image size `image_size` (the
/// decoder's).
pub fn check_reranker_config(
    r: &RerankConfig,
    g: &GptConfig,
    image_size: i64,
    name: &str,
) -> Result<()> {
    if r.text_len != g.text_len {
        bail!(
            "the reranker {name} reads captions of text_len {}, but the transformer's have \
             text_len {}: was it trained with another text.text_len?",
            r.text_len,
            g.text_len
        );
    }
    if r.text_vocab != g.text_vocab {
        bail!(
            "the reranker {name} reads captions over a text_vocab of {} BPE tokens, but the \
             transformer's vocabulary has {}: was it trained with another tokenizer?",
            r.text_vocab,
            g.text_vocab
        );
    }
    if r.image_size != image_size {
        bail!(
            "the reranker {name} scores images of image_size {}, but the dVAE decoder draws \
             {image_size}×{image_size} images",
            r.image_size
        );
    }
    Ok(())
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
        let reranker = match &manifest.reranker {
            None => None,
            Some(name) => {
                let url = describe(name);
                let bytes = read(location, name).await?;
                let reranker =
                    Reranker::from_weights(&weights::from_bytes(&bytes, Path::new(&url))?, device)
                        .with_context(|| format!("loading the reranker {url}"))?;
                check_reranker(&reranker, &gpt, &decoder, &url)?;
                Some(reranker)
            }
        };
        Ok(Self {
            manifest,
            decoder,
            gpt,
            tokenizer,
            reranker,
        })
    }
}
