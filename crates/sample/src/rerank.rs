//! Best of N: draw more candidates per prompt than are kept, score each
//! against its prompt with the bundle's reranker (the cosine of the image's
//! and the caption's embeddings, -1..1) and keep the best, best first, the
//! way the DALL-E paper picked its samples with CLIP.
//!
//! This module holds the choosing and the record of it (`scores.json` of
//! `dalle-sample --candidates`); [`crate::generate`] draws and scores.

use anyhow::{Result, bail};
use dalle_model::rerank::best;
use serde::Serialize;

/// The file `dalle-sample --candidates` writes the scores to, in its
/// output directory.
pub const SCORES_FILE: &str = "scores.json";

/// Checks that `candidates` per prompt (None: no reranking) can keep
/// `keep` images per prompt.
pub fn check_counts(candidates: Option<usize>, keep: usize) -> Result<()> {
    match candidates {
        Some(n) if n < keep => bail!(
            "--candidates {n} cannot keep {keep} images per prompt (-n {keep}): draw at least as \
             many candidates as images kept"
        ),
        _ => Ok(()),
    }
}

/// Why a bundle (`bundle` names it) cannot rerank.
pub fn no_reranker(bundle: &str) -> String {
    format!(
        "{bundle} has no reranker, which --candidates needs to choose among the candidates: the \
         reranker is trained by the rerank stage, so add `rerank` to run.stages (or run `dalle \
         rerank train`) and `dalle export` the bundle again"
    )
}

/// How one prompt's candidates scored and which were kept.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PromptScores {
    pub prompt: String,
    /// Indices of the kept candidates (in the order drawn), best first.
    pub kept: Vec<usize>,
    /// The kept candidates' scores, best first.
    pub kept_scores: Vec<f32>,
    /// Every candidate's score, in the order drawn.
    pub candidates: Vec<f32>,
}

impl PromptScores {
    /// Keeps the best `keep` of a prompt's candidate scores (ties: the
    /// earlier drawn first).
    pub fn rank(prompt: &str, candidates: Vec<f32>, keep: usize) -> Self {
        let kept = best(&candidates, keep);
        Self {
            prompt: prompt.to_string(),
            kept_scores: kept.iter().map(|&i| candidates[i]).collect(),
            kept,
            candidates,
        }
    }

    /// The kept ones of a prompt's candidate `items` (in the order drawn),
    /// best first.
    pub fn select<T>(&self, items: Vec<T>) -> Vec<T> {
        assert_eq!(items.len(), self.candidates.len(), "one item per candidate");
        let mut items: Vec<Option<T>> = items.into_iter().map(Some).collect();
        self.kept
            .iter()
            .map(|&i| items[i].take().expect("kept indices are distinct"))
            .collect()
    }
}

/// `scores.json`: what was drawn, what was kept and how each scored.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScoresReport {
    /// What the scores are.
    pub score: &'static str,
    pub candidates_per_prompt: usize,
    pub kept_per_prompt: usize,
    pub seed: u64,
    pub prompts: Vec<PromptReport>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PromptReport {
    pub prompt: String,
    /// The images written, best first.
    pub kept: Vec<KeptImage>,
    /// Every candidate's score, in the order drawn.
    pub candidate_scores: Vec<f32>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KeptImage {
    /// The PNG's name in the output directory.
    pub file: String,
    /// Which candidate it was (0-based, in the order drawn).
    pub candidate: usize,
    pub score: f32,
}

impl ScoresReport {
    /// The report of `scores` (one per prompt), whose kept images were
    /// written as `files` (per prompt, best first).
    pub fn new(scores: &[PromptScores], files: &[Vec<String>], seed: u64) -> Self {
        assert_eq!(scores.len(), files.len(), "one list of files per prompt");
        let prompts: Vec<PromptReport> = scores
            .iter()
            .zip(files)
            .map(|(s, files)| {
                assert_eq!(s.kept.len(), files.len(), "one file per kept image");
                PromptReport {
                    prompt: s.prompt.clone(),
                    kept: s
                        .kept
                        .iter()
                        .zip(&s.kept_scores)
                        .zip(files)
                        .map(|((&candidate, &score), file)| KeptImage {
                            file: file.clone(),
                            candidate,
                            score,
                        })
                        .collect(),
                    candidate_scores: s.candidates.clone(),
                }
            })
            .collect();
        Self {
            score: "cosine of the reranker's image and caption embeddings (-1..1, higher fits \
                    the prompt better)",
            candidates_per_prompt: scores.first().map_or(0, |s| s.candidates.len()),
            kept_per_prompt: scores.first().map_or(0, |s| s.kept.len()),
            seed,
            prompts,
        }
    }

    /// Mean score of the kept images and of every candidate.
    pub fn means(&self) -> (f32, f32) {
        let mean = |v: Vec<f32>| v.iter().sum::<f32>() / v.len().max(1) as f32;
        let kept = self
            .prompts
            .iter()
            .flat_map(|p| p.kept.iter().map(|k| k.score))
            .collect();
        let all = self
            .prompts
            .iter()
            .flat_map(|p| p.candidate_scores.iter().copied())
            .collect();
        (mean(kept), mean(all))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_keeps_the_best_in_order_and_select_follows() {
        let s = PromptScores::rank("a cat", vec![0.1, 0.7, -0.3, 0.7, 0.4], 3);
        assert_eq!(s.kept, [1, 3, 4], "ties: the earlier drawn first");
        assert_eq!(s.kept_scores, [0.7, 0.7, 0.4]);
        assert_eq!(s.candidates.len(), 5);
        assert_eq!(s.select(vec!["a", "b", "c", "d", "e"]), ["b", "d", "e"]);
        let all = PromptScores::rank("a cat", vec![0.2, 0.5], 2);
        assert_eq!(all.kept, [1, 0]);
    }

    #[test]
    fn counts_and_a_missing_reranker_are_explained() {
        assert!(check_counts(None, 4).is_ok());
        assert!(check_counts(Some(4), 4).is_ok());
        assert!(check_counts(Some(8), 2).is_ok());
        let err = check_counts(Some(2), 3).unwrap_err().to_string();
        assert!(
            err.contains("--candidates 2") && err.contains("at least as many"),
            "{err}"
        );
        let msg = no_reranker("bundle x");
        assert!(
            msg.contains("bundle x has no reranker") && msg.contains("`rerank` to run.stages"),
            "{msg}"
        );
    }

    #[test]
    fn the_report_names_the_files_with_their_scores() {
        let scores = [
            PromptScores::rank("a", vec![0.1, 0.3, 0.2], 2),
            PromptScores::rank("b", vec![0.5, -0.5, 0.0], 2),
        ];
        let files = [
            vec!["001-a-01.png".to_string(), "001-a-02.png".to_string()],
            vec!["002-b-01.png".to_string(), "002-b-02.png".to_string()],
        ];
        let report = ScoresReport::new(&scores, &files, 7);
        assert_eq!(report.candidates_per_prompt, 3);
        assert_eq!(report.kept_per_prompt, 2);
        assert_eq!(
            report.prompts[0].kept[0],
            KeptImage {
                file: "001-a-01.png".into(),
                candidate: 1,
                score: 0.3
            }
        );
        assert_eq!(report.prompts[1].kept[1].candidate, 2);
        let (kept, all) = report.means();
        assert!((kept - (0.3 + 0.2 + 0.5 + 0.0) / 4.0).abs() < 1e-6);
        assert!((all - 0.6 / 6.0).abs() < 1e-6);
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["prompts"][1]["kept"][0]["file"], "002-b-01.png");
        assert_eq!(
            json["prompts"][1]["candidate_scores"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
    }
}
