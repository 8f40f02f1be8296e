//! The caption tokenizer of stage 2: byte-level BPE trained on the
//! dataset's captions, with the paper's per-position padding.

use crate::error::{ModelError, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt::Display;
use std::io::Write;
use std::path::Path;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFKC, Replace, Sequence, Strip};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    Encoding, ModelWrapper, NormalizedString, Normalizer, OffsetReferential, OffsetType,
    PreTokenizedString, PreTokenizer, PreTokenizerWrapper, Tokenizer,
};

/// How captions become text tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TextConfig {
    /// BPE vocabulary size, the 256 byte tokens included (paper: 16384).
    /// Training stops early when the captions run out of frequent pairs.
    pub vocab_size: usize,
    /// Text positions per caption (paper: 256).
    pub text_len: usize,
    /// A pair must occur this often to become a merge.
    pub min_frequency: u64,
    /// BPE dropout while encoding training captions (0 turns it off).
    pub bpe_dropout: f32,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 16384,
            text_len: 256,
            min_frequency: 2,
            bpe_dropout: 0.0,
        }
    }
}

/// How a tokenizer made by [`TextTokenizer::train`] names itself in errors
/// until it is saved.
const TRAINED: &str = "(trained in memory)";

/// Captions pre-tokenized in parallel at a time while training.
const COUNT_BATCH: usize = 8192;

/// The paper's per-position padding: text position `i` pads with its own
/// token `V + i`, so the model can tell "no text here" apart by position.
pub fn pad_id(vocab_size: usize, position: usize) -> i64 {
    (vocab_size + position) as i64
}

/// The all-pad "null" caption (classifier-free guidance, caption dropout).
pub fn null_caption(vocab_size: usize, text_len: usize) -> Vec<i64> {
    (0..text_len).map(|i| pad_id(vocab_size, i)).collect()
}

/// A caption as the model sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// Exactly `text_len` ids: BPE ids (`< V`), then per-position pads.
    pub ids: Vec<i64>,
    /// How many real (non-pad) tokens were kept.
    pub tokens: usize,
    /// Whether the caption had more than `text_len` tokens.
    pub truncated: bool,
}

/// Byte-level BPE on captions, a thin wrapper over Hugging Face's
/// `tokenizers` with its `tokenizer.json` as the file format.
///
/// The pipeline: NFKC, lowercase, runs of whitespace collapsed to one space,
/// both ends stripped; then GPT-2's byte-level pre-tokenizer, which puts a
/// space before the first word so that a word gets the same tokens
/// wherever it stands (decoding takes that space off again). Every byte has
/// a token, so any text encodes; no special tokens exist, real ids are
/// exactly `0..V` and padding is per position ([`pad_id`]).
#[derive(Clone, Debug)]
pub struct TextTokenizer {
    inner: Tokenizer,
    vocab_size: usize,
    /// Whether the pre-tokenizer puts a space before the first word.
    prefix_space: bool,
    /// The source, for errors: a path, a URL, or [`TRAINED`].
    what: String,
}

fn tokenizer_error(what: impl Display, reason: impl Display) -> ModelError {
    ModelError::Tokenizer {
        what: what.to_string(),
        reason: reason.to_string(),
    }
}

impl TextTokenizer {
    /// Trains byte-level BPE on captions with `config`'s vocabulary size
    /// (the 256 byte tokens included) and minimum pair frequency.
    ///
    /// Fewer merges than asked for are made when the captions run out of
    /// pairs that occur `min_frequency` times: [`Self::vocab_size`] is the
    /// real size. Deterministic: the same captions give the same
    /// `tokenizer.json`, whatever their order (the trainer picks merges by
    /// count, then by token ids; seen identical across processes, although
    /// its internal maps are randomly seeded).
    pub fn train(captions: impl Iterator<Item = String>, config: &TextConfig) -> Result<Self> {
        let alphabet = ByteLevel::alphabet();
        if config.vocab_size < alphabet.len() {
            return Err(tokenizer_error(
                "training",
                format!(
                    "text.vocab_size {} is smaller than the {} byte tokens",
                    config.vocab_size,
                    alphabet.len()
                ),
            ));
        }
        let mut tokenizer = pipeline()?;
        // Words (pre-tokenized, byte-level pieces) and how often they occur,
        // counted here in parallel batches rather than by the trainer's
        // `feed`, which wants a `Send` iterator. Sums do not depend on the
        // order, so neither does the result.
        let mut counts: HashMap<String, u64> = HashMap::new();
        let mut seen = 0usize;
        let mut captions = captions.peekable();
        let mut batch = Vec::with_capacity(COUNT_BATCH);
        while captions.peek().is_some() {
            batch.clear();
            batch.extend(captions.by_ref().take(COUNT_BATCH));
            seen += batch.len();
            let words = batch
                .par_iter()
                .try_fold(HashMap::new, |mut words, caption| {
                    for word in pre_tokenize(&tokenizer, caption)? {
                        *words.entry(word).or_insert(0u64) += 1;
                    }
                    Ok::<_, ModelError>(words)
                })
                .try_reduce(HashMap::new, |a, b| Ok(add_counts(a, b)))?;
            counts = add_counts(counts, words);
        }
        if seen == 0 {
            return Err(tokenizer_error("training", "no captions to train on"));
        }
        let trainer = BpeTrainer::builder()
            .vocab_size(config.vocab_size)
            .min_frequency(config.min_frequency)
            .show_progress(false)
            .initial_alphabet(alphabet.into_iter().collect())
            .build();
        // `do_train` takes the trainer's own map type (ahash keys of
        // compact_str strings): `collect` infers it from the call, so this
        // crate names neither.
        let word_counts = counts.into_iter().map(|(w, c)| (w.into(), c)).collect();
        let mut bpe = BPE::default();
        trainer
            .do_train(&word_counts, &mut bpe)
            .map_err(|e| tokenizer_error("training", e))?;
        tokenizer.with_model(bpe);
        // Through JSON and back: the tokenizer in memory is exactly the one
        // that `load` will give from the saved file.
        let json = tokenizer
            .to_string(false)
            .map_err(|e| tokenizer_error("training", e))?;
        Self::from_json(json.as_bytes(), TRAINED)
    }

    /// Reads a `tokenizer.json`; `what` names its source in errors.
    ///
    /// Any BPE dropout, truncation or padding stored in the file is turned
    /// off: dropout comes only from [`Self::with_dropout`], truncation and
    /// padding only from [`Self::encode`].
    pub fn from_json(json: &[u8], what: &str) -> Result<Self> {
        let mut inner = Tokenizer::from_bytes(json)
            .map_err(|e| tokenizer_error(what, format!("not a valid tokenizer.json: {e}")))?;
        let ModelWrapper::BPE(bpe) = inner.get_model() else {
            return Err(tokenizer_error(what, "the model is not BPE"));
        };
        if bpe.dropout.is_some() {
            let mut bpe = bpe.clone();
            bpe.dropout = None;
            inner.with_model(bpe);
        }
        inner
            .with_truncation(None)
            .map_err(|e| tokenizer_error(what, e))?;
        inner.with_padding(None);
        let vocab_size = inner.get_vocab_size(false);
        // Pads start at V: every id, added tokens included, must lie below.
        let vocab = inner.get_vocab(true);
        if vocab_size == 0
            || vocab.len() != vocab_size
            || vocab.values().any(|&id| id as usize >= vocab_size)
        {
            return Err(tokenizer_error(
                what,
                format!(
                    "token ids must be exactly 0..{vocab_size} (found {} tokens, largest id {:?})",
                    vocab.len(),
                    vocab.values().max()
                ),
            ));
        }
        let prefix_space = matches!(
            inner.get_pre_tokenizer(),
            Some(PreTokenizerWrapper::ByteLevel(b)) if b.add_prefix_space
        );
        Ok(Self {
            inner,
            vocab_size,
            prefix_space,
            what: what.to_string(),
        })
    }

    /// The `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(true)
            .map_err(|e| tokenizer_error(&self.what, e))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let what = path.display().to_string();
        let json = std::fs::read(path).map_err(|e| tokenizer_error(&what, e))?;
        Self::from_json(&json, &what)
    }

    /// Writes `tokenizer.json` atomically: a temporary file in the same
    /// directory (created if missing), renamed over `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let what = path.display();
        let json = self.to_json()?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let name = path
            .file_name()
            .ok_or_else(|| tokenizer_error(&what, "not a file path"))?;
        std::fs::create_dir_all(dir).map_err(|e| tokenizer_error(&what, e))?;
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(json.as_bytes())?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(tokenizer_error(&what, e));
        }
        Ok(())
    }

    /// The BPE vocabulary size V: real token ids are `0..V`, pads
    /// `V..V + text_len`.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// A copy that applies BPE dropout `p` (0..=1; 0 turns it off) while
    /// encoding, for training captions only.
    ///
    /// The `tokenizers` crate draws dropout from the thread's random
    /// generator and cannot be seeded: encodings with dropout are not
    /// reproducible. Dropout also bypasses its word cache (slower encoding).
    pub fn with_dropout(&self, p: f32) -> Result<Self> {
        if !(0.0..=1.0).contains(&p) {
            return Err(tokenizer_error(
                &self.what,
                format!("BPE dropout {p} is not within 0..=1"),
            ));
        }
        let ModelWrapper::BPE(bpe) = self.inner.get_model() else {
            unreachable!("checked when the tokenizer was made")
        };
        let mut bpe = bpe.clone();
        bpe.dropout = (p > 0.0).then_some(p);
        let mut copy = self.clone();
        copy.inner.with_model(bpe);
        Ok(copy)
    }

    /// The caption as the tokenizer sees it before splitting it into words:
    /// NFKC, lowercase, whitespace collapsed and stripped. Decoding an
    /// untruncated encoding gives back exactly this.
    pub fn normalize(&self, caption: &str) -> Result<String> {
        let mut normalized = NormalizedString::from(caption);
        if let Some(n) = self.inner.get_normalizer() {
            n.normalize(&mut normalized)
                .map_err(|e| tokenizer_error(&self.what, e))?;
        }
        Ok(normalized.get().to_string())
    }

    /// How many BPE tokens the whole caption has (no truncation).
    pub fn token_count(&self, caption: &str) -> Result<usize> {
        Ok(self.encode_bpe(caption)?.len())
    }

    fn encode_bpe(&self, caption: &str) -> Result<Encoding> {
        self.inner
            .encode(caption, false)
            .map_err(|e| tokenizer_error(&self.what, format!("encoding {caption:?}: {e}")))
    }

    /// Encodes to exactly `text_len` ids: the first `text_len` BPE ids
    /// (`truncated` when there were more), then position `i` holds
    /// [`pad_id`]`(V, i)`.
    pub fn encode(&self, caption: &str, text_len: usize) -> Result<Encoded> {
        let encoding = self.encode_bpe(caption)?;
        let bpe = encoding.get_ids();
        let tokens = bpe.len().min(text_len);
        let ids = (0..text_len)
            .map(|i| match bpe.get(i) {
                Some(&id) if i < tokens => i64::from(id),
                _ => pad_id(self.vocab_size, i),
            })
            .collect();
        Ok(Encoded {
            ids,
            tokens,
            truncated: bpe.len() > text_len,
        })
    }

    /// The inverse of [`Self::encode`]: pads (ids `>= V`) are dropped
    /// wherever they stand and the BPE ids decoded to text. Byte sequences
    /// that are not UTF-8 (a caption cut inside a character, or sampled
    /// ids) decode to U+FFFD.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let v = self.vocab_size as i64;
        let bpe = ids
            .iter()
            .filter(|&&id| id < v)
            .map(|&id| {
                u32::try_from(id)
                    .map_err(|_| tokenizer_error(&self.what, format!("negative token id {id}")))
            })
            .collect::<Result<Vec<u32>>>()?;
        let text = self
            .inner
            .decode(&bpe, false)
            .map_err(|e| tokenizer_error(&self.what, format!("decoding: {e}")))?;
        Ok(match text.strip_prefix(' ') {
            Some(rest) if self.prefix_space => rest.to_string(),
            _ => text,
        })
    }
}

/// Sums two word counts, adding the smaller map into the larger.
fn add_counts(a: HashMap<String, u64>, b: HashMap<String, u64>) -> HashMap<String, u64> {
    let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    for (word, count) in small {
        *big.entry(word).or_insert(0) += count;
    }
    big
}

/// An untrained tokenizer with the caption pipeline.
fn pipeline() -> Result<Tokenizer> {
    let collapse = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
        .map_err(|e| tokenizer_error("pipeline", e))?;
    let normalizer = Sequence::new(vec![
        NFKC.into(),
        Lowercase.into(),
        collapse.into(),
        Strip::new(true, true).into(),
    ]);
    let byte_level = ByteLevel::new(true, false, true);
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer
        .with_normalizer(Some(normalizer))
        .with_pre_tokenizer(Some(byte_level))
        .with_decoder(Some(byte_level));
    Ok(tokenizer)
}

/// A caption's words as BPE training sees them: normalised, split and
/// mapped to byte-level characters.
fn pre_tokenize(tokenizer: &Tokenizer, caption: &str) -> Result<Vec<String>> {
    let mut normalized = NormalizedString::from(caption);
    if let Some(n) = tokenizer.get_normalizer() {
        n.normalize(&mut normalized)
            .map_err(|e| tokenizer_error("training", e))?;
    }
    let mut pre = PreTokenizedString::from(normalized);
    if let Some(p) = tokenizer.get_pre_tokenizer() {
        p.pre_tokenize(&mut pre)
            .map_err(|e| tokenizer_error("training", e))?;
    }
    Ok(pre
        .get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(s, _, _)| s.to_owned())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const COLOURS: [&str; 6] = ["red", "green", "blue", "yellow", "purple", "orange"];
    const SHAPES: [&str; 5] = ["circle", "square", "triangle", "star", "hexagon"];
    const PLACES: [&str; 4] = [
        "on a white background",
        "in the sky",
        "near a tree",
        "at night",
    ];

    /// A small caption corpus in which "red" and friends are frequent.
    fn corpus() -> Vec<String> {
        let mut captions = Vec::new();
        for (i, colour) in COLOURS.iter().enumerate() {
            for (j, shape) in SHAPES.iter().enumerate() {
                for (k, place) in PLACES.iter().enumerate() {
                    let n = 1 + (i + 2 * j + 3 * k) % 4;
                    captions.push(format!("A {colour} {shape} {place}, {n} of them."));
                    captions.push(format!("{shape}s: {colour}!  Big {colour} {shape}"));
                }
            }
        }
        captions
    }

    fn config(vocab_size: usize) -> TextConfig {
        TextConfig {
            vocab_size,
            text_len: 32,
            min_frequency: 2,
            bpe_dropout: 0.0,
        }
    }

    fn trained() -> TextTokenizer {
        TextTokenizer::train(corpus().into_iter(), &config(400)).unwrap()
    }

    #[test]
    fn round_trip_gives_the_normalised_caption() {
        let tok = trained();
        let cases = [
            ("A Red Circle", "a red circle"),
            (
                "  RED\t\tcircle \n on  a  WHITE background  ",
                "red circle on a white background",
            ),
            (
                "Über-große Äpfel: 3½ cups!?",
                "über-große äpfel: 31⁄2 cups!?",
            ),
            ("ﬁne ＦＵＬＬ width", "fine full width"),
            (
                "日本語のキャプション 🙂 (émoji) — \"quoted\"",
                "日本語のキャプション 🙂 (émoji) — \"quoted\"",
            ),
            ("tabs\u{a0}and\u{2003}odd spaces", "tabs and odd spaces"),
            ("", ""),
        ];
        for (caption, expected) in cases {
            assert_eq!(tok.normalize(caption).unwrap(), expected, "{caption:?}");
            let encoded = tok.encode(caption, 128).unwrap();
            assert!(!encoded.truncated, "{caption:?}");
            assert_eq!(tok.decode(&encoded.ids).unwrap(), expected, "{caption:?}");
        }
    }

    #[test]
    fn pads_are_per_position() {
        let tok = trained();
        let v = tok.vocab_size();
        let text_len = 16;
        let encoded = tok.encode("a red circle", text_len).unwrap();
        assert_eq!(encoded.ids.len(), text_len);
        assert!(encoded.tokens > 0 && encoded.tokens < text_len);
        assert!(!encoded.truncated);
        for (i, &id) in encoded.ids.iter().enumerate() {
            assert!(id >= 0 && id < (v + text_len) as i64);
            if i < encoded.tokens {
                assert!(id < v as i64, "position {i} is a pad");
            } else {
                assert_eq!(id, pad_id(v, i));
                assert_eq!(id, (v + i) as i64);
            }
        }
        // Whitespace only: nothing but pads.
        let empty = tok.encode(" \t ", text_len).unwrap();
        assert_eq!(empty.tokens, 0);
        assert_eq!(empty.ids, null_caption(v, text_len));
        assert_eq!(tok.decode(&empty.ids).unwrap(), "");
    }

    #[test]
    fn truncation_keeps_the_first_tokens() {
        let tok = trained();
        let caption = "a red circle and a blue square and a green star at night";
        let full = tok.encode(caption, 128).unwrap();
        assert!(!full.truncated);
        assert!(full.tokens > 4);
        let cut = tok.encode(caption, 4).unwrap();
        assert!(cut.truncated);
        assert_eq!(cut.tokens, 4);
        assert_eq!(cut.ids, full.ids[..4]);
        let exact = tok.encode(caption, full.tokens).unwrap();
        assert!(!exact.truncated);
        assert_eq!(exact.ids, full.ids[..full.tokens]);
        assert!(tok.decode(&cut.ids).unwrap().starts_with("a red"));
    }

    #[test]
    fn null_caption_is_all_pads() {
        assert_eq!(null_caption(10, 4), vec![10, 11, 12, 13]);
        assert_eq!(pad_id(16384, 255), 16384 + 255);
        assert!(null_caption(10, 0).is_empty());
    }

    #[test]
    fn training_is_deterministic() {
        let a = trained().to_json().unwrap();
        let b = trained().to_json().unwrap();
        assert_eq!(a, b);
        let mut reversed = corpus();
        reversed.reverse();
        let c = TextTokenizer::train(reversed.into_iter(), &config(400))
            .unwrap()
            .to_json()
            .unwrap();
        assert_eq!(a, c);
    }

    #[test]
    fn save_and_load_give_the_same_encodings() {
        let tok = trained();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("tokenizer.json");
        tok.save(&path).unwrap();
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["tokenizer.json"], "no temporary file left");
        let loaded = TextTokenizer::load(&path).unwrap();
        assert_eq!(loaded.vocab_size(), tok.vocab_size());
        assert_eq!(loaded.to_json().unwrap(), tok.to_json().unwrap());
        for caption in corpus()
            .iter()
            .take(20)
            .chain(["Ünïcode 🙂 text"].map(String::from).iter())
        {
            assert_eq!(
                loaded.encode(caption, 24).unwrap(),
                tok.encode(caption, 24).unwrap(),
                "{caption:?}"
            );
        }
        // Saving again replaces the file.
        loaded.save(&path).unwrap();
        assert_eq!(
            TextTokenizer::load(&path).unwrap().vocab_size(),
            tok.vocab_size()
        );
    }

    #[test]
    fn errors_name_the_source() {
        let err = TextTokenizer::from_json(b"{not json", "s3://bucket/tok.json").unwrap_err();
        assert!(err.to_string().contains("s3://bucket/tok.json"), "{err}");
        let err = TextTokenizer::load(Path::new("/nonexistent/tokenizer.json")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/tokenizer.json"),
            "{err}"
        );
        let err = TextTokenizer::train(corpus().into_iter(), &config(100)).unwrap_err();
        assert!(err.to_string().contains("vocab_size"), "{err}");
        let err = TextTokenizer::train(std::iter::empty(), &config(300)).unwrap_err();
        assert!(err.to_string().contains("no captions"), "{err}");
        let tok = trained();
        assert!(tok.with_dropout(1.5).is_err());
        assert!(tok.decode(&[-1]).is_err());
    }

    #[test]
    fn bpe_merges_frequent_words() {
        let tok = trained();
        assert!(tok.vocab_size() > 256);
        for word in COLOURS.iter().chain(&SHAPES) {
            assert_eq!(tok.encode(word, 8).unwrap().tokens, 1, "{word}");
        }
        assert_eq!(tok.encode("Red Circle", 8).unwrap().tokens, 2);
        // A word after the first gets the same token as the first word.
        let first = tok.encode("red", 8).unwrap().ids[0];
        assert_eq!(tok.encode("blue red", 8).unwrap().ids[1], first);
    }

    #[test]
    fn small_corpus_gives_a_smaller_vocabulary() {
        let tok =
            TextTokenizer::train(["red red red".to_string()].into_iter(), &config(16384)).unwrap();
        let v = tok.vocab_size();
        assert!((257..300).contains(&v), "{v}");
        // Bytes never seen in training still encode.
        let encoded = tok.encode("zebra ✓", 16).unwrap();
        assert!(
            encoded.ids[..encoded.tokens]
                .iter()
                .all(|&id| id < v as i64)
        );
        assert_eq!(tok.decode(&encoded.ids).unwrap(), "zebra ✓");
    }

    #[test]
    fn dropout_splits_words_and_is_not_saved() {
        let tok = trained();
        let all = tok.with_dropout(1.0).unwrap();
        // Every merge dropped: " red" is four byte tokens.
        let encoded = all.encode("red", 8).unwrap();
        assert_eq!(encoded.tokens, 4);
        assert_eq!(all.decode(&encoded.ids).unwrap(), "red");
        let reloaded = TextTokenizer::from_json(all.to_json().unwrap().as_bytes(), "x").unwrap();
        assert_eq!(reloaded.encode("red", 8).unwrap().tokens, 1);
        let off = tok.with_dropout(0.0).unwrap();
        assert_eq!(off.encode("red", 8).unwrap().tokens, 1);
        let some = tok.with_dropout(0.5).unwrap();
        for caption in corpus().iter().take(10) {
            let e = some.encode(caption, 64).unwrap();
            assert_eq!(
                some.decode(&e.ids).unwrap(),
                tok.normalize(caption).unwrap()
            );
        }
    }
}
