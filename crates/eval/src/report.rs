//! `eval.json`, the report `dalle eval` writes, and its summary for people.
//!
//! One object with the images it was measured on and three sections, each
//! absent when not measured: `dvae` (reconstruction against both
//! baselines, codebook usage, per-colour errors), `gpt` (held-out loss)
//! and `fidelity` (samples judged by the attribute probes).

use crate::codebook::CodebookUsage;
use crate::fidelity::{FidelityReport, Judged};
use crate::image_metrics::ReconReport;
use crate::probes::AttributeAccuracy;
use serde::Serialize;
use std::fmt::{self, Write};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalReport {
    pub held_out: HeldOutImages,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dvae: Option<DvaeReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpt: Option<GptReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fidelity: Option<FidelityReport>,
    /// Why a section is absent, one line each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Where the held-out images came from.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HeldOutSource {
    /// Images and datasets named on the command line.
    Inputs { inputs: Vec<String> },
    /// The job's validation set (`data.validation`).
    Validation { url: String },
    /// Fresh synthetic scenes, of another seed than the training data's.
    Synthetic { seed: u64 },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HeldOutImages {
    #[serde(flatten)]
    pub source: HeldOutSource,
    pub images: usize,
    /// Of those, images whose captions are synthetic (and so have known
    /// attributes).
    pub synthetic_captions: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DvaeReport {
    pub weights: String,
    #[serde(flatten)]
    pub recon: ReconReport,
    /// Reconstruction PSNR minus the mean-colour baseline's, in dB.
    pub psnr_over_mean_colour: f64,
    pub codebook: CodebookUsage,
    /// The grid of originals above their reconstructions.
    pub grid: String,
}

/// A loss in nats per token and in bits.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PerToken {
    pub nats: f64,
    pub bits: f64,
}

impl PerToken {
    pub fn nats(nats: f64) -> Self {
        Self {
            nats,
            bits: nats / std::f64::consts::LN_2,
        }
    }
}

/// The transformer's cross-entropy on the held-out captions and the
/// held-out images' dVAE tokens, dropout off.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GptReport {
    /// The bundle's URL, or the run's weights.
    pub model: String,
    pub samples: usize,
    /// `text_loss_weight · text + (1 − text_loss_weight) · image`, as
    /// training weighs them.
    pub loss: f64,
    pub text_loss_weight: f64,
    pub text: PerToken,
    pub image: PerToken,
}

impl EvalReport {
    /// A few lines for people: PSNR against the baselines, codes, the
    /// held-out loss and fidelity per attribute.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        self.write_summary(&mut s).expect("writing to a String");
        s
    }

    fn write_summary(&self, s: &mut String) -> fmt::Result {
        let h = &self.held_out;
        let source = match &h.source {
            HeldOutSource::Inputs { inputs } => format!("inputs {}", inputs.join(" ")),
            HeldOutSource::Validation { url } => format!("the validation set of {url}"),
            HeldOutSource::Synthetic { seed } => format!("fresh synthetic scenes (seed {seed})"),
        };
        writeln!(s, "held out: {} images from {source}", h.images)?;
        if let Some(d) = &self.dvae {
            let (r, c, m) = (
                d.recon.reconstruction,
                d.recon.mean_colour_baseline,
                d.recon.dataset_mean_baseline,
            );
            writeln!(
                s,
                "dvae: PSNR {:.2} dB, SSIM {:.3} | mean colour {:.2} dB, SSIM {:.3} ({:+.2} dB) \
                 | mean image {:.2} dB, SSIM {:.3}",
                r.psnr, r.ssim, c.psnr, c.ssim, d.psnr_over_mean_colour, m.psnr, m.ssim
            )?;
            let u = &d.codebook;
            writeln!(
                s,
                "      codes: {} of {} over the set, {:.1} per batch of {}, perplexity {:.1}",
                u.distinct, u.codebook_size, u.mean_distinct_per_batch, u.batch_size, u.perplexity
            )?;
            if let Some(colours) = &d.recon.colours {
                let worst = colours
                    .rows
                    .iter()
                    .flat_map(|r| {
                        [("background", r.background), ("shape", r.shape)]
                            .map(|(what, e)| (r.colour, what, e.mean_abs_error))
                    })
                    .filter_map(|(c, what, e)| e.map(|e| (c, what, e)))
                    .max_by(|a, b| a.2.total_cmp(&b.2));
                if let Some((colour, what, error)) = worst {
                    writeln!(
                        s,
                        "      worst colour: {colour} {what}s, mean error {error:.1} of 255"
                    )?;
                }
            }
        }
        if let Some(g) = &self.gpt {
            writeln!(
                s,
                "gpt: held-out loss {:.4} | text {:.4} nats ({:.3} bits) | image {:.4} nats \
                 ({:.3} bits) per token | {} samples",
                g.loss, g.text.nats, g.text.bits, g.image.nats, g.image.bits, g.samples
            )?;
        }
        if let Some(f) = &self.fidelity {
            writeln!(
                s,
                "fidelity: {} prompts × {} samples, judged by probes trained on {} ({} images)",
                f.prompts, f.samples_per_prompt, f.probes.trained_on, f.probes.images
            )?;
            writeln!(
                s,
                "          {:<8} {:>10} {:>12} {:>10} {:>6} {:>9}",
                "", "background", "shape colour", "shape kind", "size", "all four"
            )?;
            let line = |s: &mut String, name: &str, a: &AttributeAccuracy, all: Option<f64>| {
                let all = all.map_or("".into(), |v| format!("{:.0}%", 100.0 * v));
                writeln!(
                    s,
                    "          {name:<8} {:>9.0}% {:>11.0}% {:>9.0}% {:>5.0}% {all:>9}",
                    100.0 * a.background,
                    100.0 * a.shape_colour,
                    100.0 * a.shape_kind,
                    100.0 * a.size
                )
            };
            let judged = |s: &mut String, name: &str, j: &Option<Judged>| match j {
                Some(j) => line(s, name, &j.accuracy, Some(j.all_four)),
                None => Ok(()),
            };
            judged(s, "all", &Some(f.scores.all))?;
            judged(s, "seen", &f.scores.seen)?;
            judged(s, "unseen", &f.scores.unseen)?;
            for r in &f.reranked {
                let n = r.candidates;
                judged(s, &format!("best/{n}"), &Some(r.scores.all))?;
                judged(s, &format!("  seen/{n}"), &r.scores.seen)?;
                judged(s, &format!("unseen/{n}"), &r.scores.unseen)?;
            }
            line(s, "ceiling", &f.probes.ceiling, None)?;
            line(s, "chance", &f.probes.chance, None)?;
            if !f.reranked.is_empty() {
                writeln!(
                    s,
                    "          best/N: each sample the reranker's best of N candidates"
                )?;
            }
        }
        for note in &self.notes {
            writeln!(s, "note: {note}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_sections_are_left_out_and_bits_are_nats_over_ln_2() {
        let report = EvalReport {
            held_out: HeldOutImages {
                source: HeldOutSource::Synthetic { seed: 1 },
                images: 8,
                synthetic_captions: 8,
            },
            dvae: None,
            gpt: Some(GptReport {
                model: "bundle".into(),
                samples: 8,
                loss: 1.0,
                text_loss_weight: 0.125,
                text: PerToken::nats(std::f64::consts::LN_2),
                image: PerToken::nats(2.0),
            }),
            fidelity: None,
            notes: vec!["no bundle".into()],
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["held_out"]["kind"], "synthetic");
        assert_eq!(json["held_out"]["seed"], 1);
        assert!(json.get("dvae").is_none() && json.get("fidelity").is_none());
        assert_eq!(json["gpt"]["text"]["bits"], 1.0);
        let text = report.summary();
        assert!(text.contains("fresh synthetic scenes (seed 1)"), "{text}");
        assert!(
            text.contains("1.000 bits") && text.contains("note: no bundle"),
            "{text}"
        );
    }
}
