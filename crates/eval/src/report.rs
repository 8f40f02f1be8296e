//! `eval.json`, the report `dalle eval` writes, and its summary for people.
//!
//! One object with the images it was measured on and four sections, each
//! absent when not measured: `dvae` (reconstruction against both
//! baselines, codebook usage, per-colour errors), `probes` (the attribute
//! probes' accuracy on the held-out images and on their reconstructions),
//! `gpt` (held-out loss) and `fidelity` (samples judged by the probes).

use crate::codebook::CodebookUsage;
use crate::fidelity::{FidelityReport, Judged, ProbeReport, Scores};
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
    pub probes: Option<ProbeReport>,
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
        let fidelity = self.fidelity.as_ref();
        if fidelity.is_none() && self.probes.is_none() {
            return self.write_notes(s);
        }
        match (fidelity, &self.probes) {
            (Some(f), Some(p)) => writeln!(
                s,
                "fidelity: {} prompts × {} samples, judged by probes trained on {} ({} images)",
                f.prompts, f.samples_per_prompt, p.trained_on, p.images
            )?,
            (Some(f), None) => writeln!(
                s,
                "fidelity: {} prompts × {} samples",
                f.prompts, f.samples_per_prompt
            )?,
            (None, Some(p)) => writeln!(
                s,
                "probes: trained on {} ({} images), read on {} held-out images",
                p.trained_on, p.images, p.ceiling_images
            )?,
            (None, None) => {}
        }
        // Best of N rows are labelled so; the column widens for them.
        let labels: Vec<String> = fidelity
            .map(|f| &f.reranked[..])
            .unwrap_or_default()
            .iter()
            .map(|r| format!("best of {}", r.candidates))
            .collect();
        let width = labels.iter().map(String::len).fold(8, usize::max);
        writeln!(
            s,
            "          {:<width$} {:>10} {:>12} {:>10} {:>6} {:>9}",
            "", "background", "shape colour", "shape kind", "size", "all four"
        )?;
        let line = |s: &mut String, name: &str, a: &AttributeAccuracy, all: Option<f64>| {
            let all = all.map_or("".into(), |v| format!("{:.0}%", 100.0 * v));
            writeln!(
                s,
                "          {name:<width$} {:>9.0}% {:>11.0}% {:>9.0}% {:>5.0}% {all:>9}",
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
        // All prompts under `label`, then the seen and unseen ones.
        let table = |s: &mut String, label: &str, indent: &str, t: &Scores| {
            judged(s, label, &Some(t.all))?;
            judged(s, &format!("{indent}seen"), &t.seen)?;
            judged(s, &format!("{indent}unseen"), &t.unseen)
        };
        if let Some(f) = fidelity {
            table(s, "all", "", &f.scores)?;
            for (r, label) in f.reranked.iter().zip(&labels) {
                table(s, label, "  ", &r.scores)?;
            }
        }
        if let Some(p) = &self.probes {
            line(s, "ceiling", &p.ceiling, None)?;
            line(s, "via dVAE", &p.through_dvae, None)?;
            line(s, "chance", &p.chance, None)?;
        }
        if let Some(f) = fidelity.filter(|f| !f.reranked.is_empty()) {
            let by = f.reranker.as_deref().unwrap_or("the reranker");
            writeln!(
                s,
                "          best of N: each sample the pick of {by} among N candidates"
            )?;
            for (r, label) in f.reranked.iter().zip(&labels) {
                writeln!(
                    s,
                    "          {label}: mean reranker score {:.3} kept, {:.3} over all \
                     candidates",
                    r.reranker_score.kept, r.reranker_score.drawn
                )?;
            }
        }
        self.write_notes(s)
    }

    fn write_notes(&self, s: &mut String) -> fmt::Result {
        for note in &self.notes {
            writeln!(s, "note: {note}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fidelity::{RerankScores, Reranked};
    use crate::probes::ProbeConfig;
    use dalle_model::gpt::sample::SamplingConfig;

    /// A report on 8 fresh synthetic scenes with no dVAE section.
    fn eval_report(gpt: Option<GptReport>, fidelity: Option<FidelityReport>) -> EvalReport {
        EvalReport {
            held_out: HeldOutImages {
                source: HeldOutSource::Synthetic { seed: 1 },
                images: 8,
                synthetic_captions: 8,
            },
            dvae: None,
            probes: fidelity.is_some().then(probes),
            gpt,
            fidelity,
            notes: Vec::new(),
        }
    }

    #[test]
    fn absent_sections_are_left_out_and_bits_are_nats_over_ln_2() {
        let gpt = Some(GptReport {
            model: "bundle".into(),
            samples: 8,
            loss: 1.0,
            text_loss_weight: 0.125,
            text: PerToken::nats(std::f64::consts::LN_2),
            image: PerToken::nats(2.0),
        });
        let report = EvalReport {
            notes: vec!["no bundle".into()],
            ..eval_report(gpt, None)
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

    /// Fidelity scores whose shares are all `share`, over 8 samples of
    /// which half are unseen.
    fn scores(share: f64) -> Scores {
        let judged = |samples| Judged {
            samples,
            accuracy: AttributeAccuracy {
                background: share,
                shape_colour: share,
                shape_kind: share,
                size: share,
            },
            all_four: share,
        };
        Scores {
            all: judged(8),
            seen: Some(judged(4)),
            unseen: Some(judged(4)),
            predicted: Vec::new(),
        }
    }

    fn probes() -> ProbeReport {
        ProbeReport {
            trained_on: "training data".into(),
            images: 100,
            config: ProbeConfig::default(),
            ceiling: scores(0.95).all.accuracy,
            ceiling_images: 16,
            through_dvae: scores(0.9).all.accuracy,
            chance: AttributeAccuracy::chance(),
        }
    }

    fn fidelity(reranked: Vec<Reranked>) -> FidelityReport {
        FidelityReport {
            prompts: 4,
            samples_per_prompt: 2,
            sampling: SamplingConfig::default(),
            unseen_combos: Vec::new(),
            seen_from: "training captions".into(),
            scores: scores(0.25),
            reranker: (!reranked.is_empty()).then(|| "run/reranker.safetensors".into()),
            reranked,
            rows: Vec::new(),
            picture: "fidelity.png".into(),
            captions: "fidelity.json".into(),
        }
    }

    #[test]
    fn reranked_fidelity_has_a_table_per_n_in_the_json_and_the_summary() {
        let reranked = [(8, 0.5), (32, 0.75)]
            .map(|(n, share)| Reranked {
                candidates: n,
                scores: scores(share),
                reranker_score: RerankScores {
                    kept: 0.4,
                    drawn: 0.1,
                },
                picture: format!("fidelity-best-of-{n}.png"),
            })
            .to_vec();
        let report = eval_report(None, Some(fidelity(reranked)));
        let json = serde_json::to_value(&report).unwrap();
        let f = &json["fidelity"];
        assert_eq!(f["all"]["accuracy"]["size"], 0.25);
        assert_eq!(f["reranker"], "run/reranker.safetensors");
        let tables = f["reranked"].as_array().unwrap();
        assert_eq!(tables.len(), 2);
        assert_eq!(tables[0]["candidates"], 8);
        assert_eq!(tables[1]["candidates"], 32);
        // The same table as the plain one, flattened beside `candidates`.
        for part in ["all", "seen", "unseen"] {
            assert_eq!(tables[1][part]["accuracy"]["shape_kind"], 0.75, "{part}");
            assert_eq!(tables[1][part]["all_four"], 0.75, "{part}");
        }
        assert_eq!(tables[1]["seen"]["samples"], 4);
        assert_eq!(tables[0]["reranker_score"]["kept"], 0.4);
        assert_eq!(tables[0]["picture"], "fidelity-best-of-8.png");

        let text = report.summary();
        let row = |label: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(label))
                .unwrap_or_else(|| panic!("no {label:?} row in\n{text}"))
                .to_string()
        };
        assert!(row("best of 8").contains("50%"), "{text}");
        assert!(row("best of 32").contains("75%"), "{text}");
        assert!(row("all ").contains("25%"), "{text}");
        // Each best of N has its seen and unseen rows, and the columns line
        // up with the header's.
        let rows_of = |label: &str| {
            text.lines()
                .filter(|l| l.trim_start().starts_with(label))
                .count()
        };
        assert_eq!((rows_of("seen"), rows_of("unseen")), (3, 3), "{text}");
        let header = row("background");
        let end = |l: &str, word: &str| l.find(word).unwrap() + word.len();
        assert_eq!(end(&header, "all four"), row("best of 32").len(), "{text}");
        assert_eq!(end(&header, "all four"), row("chance").len(), "{text}");
        assert!(
            text.contains("best of 32: mean reranker score 0.400 kept, 0.100"),
            "{text}"
        );

        // Without a reranker the table is as it was: no best of N.
        let plain = eval_report(None, Some(fidelity(Vec::new())));
        let json = serde_json::to_value(&plain).unwrap();
        assert_eq!(json["fidelity"]["reranked"], serde_json::json!([]));
        assert!(json["fidelity"].get("reranker").is_none());
        assert!(!plain.summary().contains("best of"), "{}", plain.summary());
    }

    #[test]
    fn probes_without_a_transformer_report_their_ceiling_and_the_dvae_row() {
        let report = EvalReport {
            probes: Some(probes()),
            ..eval_report(None, None)
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["probes"]["through_dvae"]["shape_kind"], 0.9);
        assert!(json.get("fidelity").is_none());
        let text = report.summary();
        assert!(
            text.contains("probes: trained on training data (100 images), read on 16"),
            "{text}"
        );
        let row = |label: &str| text.lines().find(|l| l.trim_start().starts_with(label));
        assert!(row("via dVAE").is_some_and(|l| l.contains("90%")), "{text}");
        assert!(row("ceiling").is_some_and(|l| l.contains("95%")), "{text}");
        assert!(row("all ").is_none(), "{text}");
    }
}
