use super::sample::{
    Decoding, SamplingConfig, filter_logits, sample, sample_decoding, sample_with,
};
use super::*;

fn tiny(attention: AttentionLayout) -> GptConfig {
    GptConfig {
        arch: GptArch {
            dim: 32,
            depth: 3,
            heads: 4,
            mlp_ratio: 2,
            dropout: 0.0,
            attn_dropout: 0.0,
            attention,
            conv_kernel: 3,
        },
        text_vocab: 20,
        text_len: 5,
        image_vocab: 16,
        image_grid: 4,
    }
}

fn model(config: GptConfig, seed: i64) -> Gpt {
    tch::manual_seed(seed);
    Gpt::new(config, Device::Cpu).unwrap()
}

/// Random captions (BPE ids, some pads) and image tokens.
fn inputs(config: &GptConfig, batch: i64, seed: i64) -> (Tensor, Tensor) {
    tch::manual_seed(seed);
    let text = Tensor::randint(
        config.text_vocab,
        [batch, config.text_len],
        (Kind::Int64, Device::Cpu),
    );
    // Pad the last two positions with their own pad tokens.
    for p in config.text_len - 2..config.text_len {
        let _ = text.narrow(1, p, 1).fill_(config.text_vocab + p);
    }
    let image = Tensor::randint(
        config.image_vocab,
        [batch, config.image_len()],
        (Kind::Int64, Device::Cpu),
    );
    (text, image)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn cached_decoding_matches_full_recompute_at_every_position() {
    for layout in [AttentionLayout::Dense, AttentionLayout::Sparse] {
        let config = tiny(layout);
        let gpt = model(config.clone(), 1);
        let (text, image) = inputs(&config, 3, 2);
        let teacher = tch::no_grad(|| gpt.forward_t(&text, &image, false)).unwrap();
        let mut cache = gpt.new_cache(3);
        let mut logits = tch::no_grad(|| gpt.prefill(&text, &mut cache)).unwrap();
        for j in 0..config.image_len() {
            let prefix = image.narrow(1, 0, j);
            let full = tch::no_grad(|| gpt.next_image_logits(&text, &prefix)).unwrap();
            assert!(
                max_diff(&logits, &full) < 1e-4,
                "{layout:?}: position {j} differs from recompute"
            );
            let forced = teacher.image.select(1, j);
            assert!(
                max_diff(&logits, &forced) < 1e-4,
                "{layout:?}: position {j} differs from the training pass"
            );
            if j + 1 < config.image_len() {
                logits = tch::no_grad(|| gpt.step(&image.select(1, j), &mut cache)).unwrap();
            }
        }
        assert_eq!(cache.len(), config.seq_len());
        let over = tch::no_grad(|| gpt.step(&image.select(1, 0), &mut cache));
        assert!(over.is_err(), "a full cache must refuse another step");
    }
}

#[test]
fn a_future_token_never_changes_an_earlier_logit() {
    for layout in [AttentionLayout::Dense, AttentionLayout::Sparse] {
        let config = tiny(layout);
        let gpt = model(config.clone(), 3);
        let (text, image) = inputs(&config, 2, 4);
        let base = tch::no_grad(|| gpt.forward_t(&text, &image, false)).unwrap();
        // Image token j is predicted at image position j and read at j + 1.
        for j in [0, 5, config.image_len() - 2] {
            let changed = image.copy();
            let _ = changed
                .narrow(1, j, 1)
                .fill_((image.int64_value(&[0, j]) + 1) % config.image_vocab);
            let out = tch::no_grad(|| gpt.forward_t(&text, &changed, false)).unwrap();
            assert!(
                max_diff(&out.text, &base.text) == 0.0,
                "{layout:?}: text logits changed"
            );
            let (same, moved) = (j + 1, config.image_len() - j - 1);
            assert!(
                max_diff(
                    &out.image.narrow(1, 0, same),
                    &base.image.narrow(1, 0, same)
                ) == 0.0,
                "{layout:?}: image token {j} changed an earlier logit"
            );
            assert!(
                max_diff(
                    &out.image.narrow(1, same, moved),
                    &base.image.narrow(1, same, moved)
                ) > 0.0,
                "{layout:?}: image token {j} changed nothing after it"
            );
        }
        // Caption token p is predicted at text position p and read at p + 1.
        let p = 1;
        let changed = text.copy();
        let _ = changed
            .narrow(1, p, 1)
            .fill_((text.int64_value(&[0, p]) + 1) % config.text_vocab);
        let out = tch::no_grad(|| gpt.forward_t(&changed, &image, false)).unwrap();
        assert!(
            max_diff(
                &out.text.narrow(1, 0, p + 1),
                &base.text.narrow(1, 0, p + 1)
            ) == 0.0
        );
        assert!(
            max_diff(&out.image, &base.image) > 0.0,
            "image logits must see the caption"
        );
    }
}

#[test]
fn sparse_patterns_hide_what_they_should() {
    let config = tiny(AttentionLayout::Sparse);
    let patterns = masks::layer_patterns(&config);
    assert_eq!(patterns, vec![Pattern::Row, Pattern::Row, Pattern::Conv]);
    let deep = GptConfig {
        arch: GptArch {
            depth: 8,
            ..config.arch.clone()
        },
        ..config.clone()
    };
    assert_eq!(masks::layer_patterns(&deep)[2], Pattern::Column);
    assert_eq!(masks::layer_patterns(&deep)[6], Pattern::Column);
    let first = config.text_len + 1; // sequence position of image token 0
    let at = |j: i64| first + j;
    let g = config.image_grid;
    for pattern in [
        Pattern::Row,
        Pattern::Column,
        Pattern::Conv,
        Pattern::Causal,
    ] {
        // Every image query sees BOS and the whole caption, nothing later than itself.
        for q in first..config.seq_len() {
            assert!((0..first).all(|k| masks::allowed(pattern, &config, q, k)));
            assert!(!masks::allowed(pattern, &config, q, q + 1));
            assert!(masks::allowed(pattern, &config, q, q));
        }
    }
    // Token (2, 3) = j 11: row sees j 8..=11 only; column sees 3, 7, 11.
    assert!(masks::allowed(Pattern::Row, &config, at(11), at(8)));
    assert!(!masks::allowed(Pattern::Row, &config, at(11), at(7)));
    let column: Vec<i64> = (0..=11)
        .filter(|&j| masks::allowed(Pattern::Column, &config, at(11), at(j)))
        .collect();
    assert_eq!(column, vec![3, 7, 11]);
    // Conv 3×3 around (2, 3): rows 1..=2, columns 2..=3, causal.
    let conv: Vec<i64> = (0..=11)
        .filter(|&j| masks::allowed(Pattern::Conv, &config, at(11), at(j)))
        .collect();
    assert_eq!(conv, vec![6, 7, 10, 11]);
    assert_eq!(g, 4);

    // In a one-layer (convolutional) model, a token outside the
    // neighbourhood does not reach the logit; one inside does.
    let one = GptConfig {
        arch: GptArch {
            depth: 1,
            ..config.arch.clone()
        },
        ..config.clone()
    };
    let gpt = model(one.clone(), 5);
    let (text, image) = inputs(&one, 1, 6);
    let base = tch::no_grad(|| gpt.forward_t(&text, &image, false)).unwrap();
    // Image position 12 reads token 11 last; token 0 is far from (2, 3).
    let flip = |j: i64| {
        let changed = image.copy();
        let _ = changed
            .narrow(1, j, 1)
            .fill_((image.int64_value(&[0, j]) + 1) % one.image_vocab);
        let out = tch::no_grad(|| gpt.forward_t(&text, &changed, false)).unwrap();
        max_diff(&out.image.select(1, 12), &base.image.select(1, 12))
    };
    assert_eq!(flip(0), 0.0, "a token outside the 3×3 window leaked in");
    assert!(flip(6) > 0.0, "a token inside the window had no effect");
}

#[test]
fn loss_is_the_weighted_per_kind_cross_entropy_over_each_kinds_vocabulary() {
    let config = tiny(AttentionLayout::Dense);
    let gpt = model(config.clone(), 7);
    let (text, image) = inputs(&config, 4, 8);
    let logits = gpt.forward_t(&text, &image, false).unwrap();
    assert_eq!(
        logits.text.size(),
        vec![4, config.text_len, config.text_vocab + config.text_len]
    );
    assert_eq!(
        logits.image.size(),
        vec![4, config.image_len(), config.image_vocab]
    );
    // Cross-entropy by hand: -log softmax at the target, averaged per kind.
    let nll = |l: &Tensor, t: &Tensor| {
        -l.log_softmax(-1, Kind::Float)
            .gather(-1, &t.unsqueeze(-1), false)
            .mean(Kind::Float)
    };
    let parts = gpt.loss(&text, &image, 0.125, false).unwrap();
    assert!(max_diff(&parts.text, &nll(&logits.text, &text)) < 1e-5);
    assert!(max_diff(&parts.image, &nll(&logits.image, &image)) < 1e-5);
    let weighted = &parts.text * 0.125 + &parts.image * 0.875;
    assert!(max_diff(&parts.loss, &weighted) < 1e-6);
    // With weight 0 on text, no gradient reaches the text head.
    let parts = gpt.loss(&text, &image, 0.0, false).unwrap();
    parts.loss.backward();
    let vars = gpt.var_store().variables();
    assert_eq!(
        vars["text_head.weight"]
            .grad()
            .abs()
            .sum(Kind::Float)
            .double_value(&[]),
        0.0
    );
    assert!(
        vars["image_head.weight"]
            .grad()
            .abs()
            .sum(Kind::Float)
            .double_value(&[])
            > 0.0
    );
    // Out-of-vocabulary ids are refused with the kind named.
    let bad = image.copy().fill_(config.image_vocab);
    let err = gpt
        .loss(&text, &bad, 0.125, false)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("image tokens"), "{err}");
}

#[test]
fn top_k_and_top_p_keep_the_right_tokens() {
    let logits = Tensor::from_slice(&[0.1f32, 0.2, 0.3, 0.4].map(f32::ln)).view([1, 4]);
    let kept = |t: Tensor| -> Vec<bool> { Vec::<bool>::try_from(t.isfinite().view([-1])).unwrap() };
    assert_eq!(
        kept(filter_logits(&logits, 2, 1.0)),
        vec![false, false, true, true]
    );
    // 0.4 + 0.3 = 0.7 reaches p = 0.7; 0.2 is dropped.
    assert_eq!(
        kept(filter_logits(&logits, 0, 0.7)),
        vec![false, false, true, true]
    );
    assert_eq!(
        kept(filter_logits(&logits, 0, 0.75)),
        vec![false, true, true, true]
    );
    assert_eq!(
        kept(filter_logits(&logits, 0, 0.01)),
        vec![false, false, false, true]
    );
    assert_eq!(kept(filter_logits(&logits, 0, 1.0)), vec![true; 4]);
}

#[test]
fn sampling_with_and_without_the_cache_and_with_guidance_at_scale_one_agree() {
    let config = tiny(AttentionLayout::Sparse);
    let gpt = model(config.clone(), 9);
    let (text, _) = inputs(&config, 3, 10);
    let settings = SamplingConfig {
        temperature: 1.0,
        top_k: 8,
        top_p: 0.95,
        guidance_scale: 1.0,
        seed: 11,
    };
    let mut calls = 0;
    let cached = sample(&gpt, &text, &settings, true, |_| calls += 1).unwrap();
    assert_eq!(cached.size(), vec![3, config.image_len()]);
    assert_eq!(calls, config.image_len());
    let recomputed = sample(&gpt, &text, &settings, false, |_| {}).unwrap();
    assert!(
        cached.equal(&recomputed),
        "the cache changed what was sampled"
    );
    let batched_null = sample_with(&gpt, &text, &settings, Decoding::Cache, true, |_| {}).unwrap();
    assert!(
        cached.equal(&batched_null),
        "guidance at scale 1 differs from conditional sampling"
    );
    // A real guidance scale changes the result; the same seed repeats it.
    let strong = SamplingConfig {
        guidance_scale: 4.0,
        ..settings.clone()
    };
    let a = sample(&gpt, &text, &strong, true, |_| {}).unwrap();
    let b = sample(&gpt, &text, &strong, true, |_| {}).unwrap();
    assert!(a.equal(&b));
    assert!(!a.equal(&cached));
    let bad = SamplingConfig {
        top_p: 0.0,
        ..settings
    };
    assert!(
        sample(&gpt, &text, &bad, true, |_| {})
            .unwrap_err()
            .to_string()
            .contains("top_p")
    );
}

/// The fixed-shape step (what a CUDA graph captures) reads the whole cache
/// under a mask and keeps its position on the device: it must draw what
/// the growing cache draws, token for token, for dense and sparse layouts,
/// with and without guidance and filtering.
#[test]
fn fixed_shape_decoding_draws_what_the_growing_cache_draws() {
    for layout in [AttentionLayout::Dense, AttentionLayout::Sparse] {
        let config = tiny(layout);
        let gpt = model(config.clone(), 21);
        let (text, _) = inputs(&config, 3, 22);
        for (guidance_scale, top_k, top_p) in [(1.0, 0, 1.0), (3.0, 8, 0.9)] {
            let settings = SamplingConfig {
                temperature: 1.0,
                top_k,
                top_p,
                guidance_scale,
                seed: 23,
            };
            let mut calls = Vec::new();
            let fixed = sample_decoding(
                &gpt,
                &text,
                &settings,
                Decoding::FixedCache { graph: true },
                |t| calls.push(t),
            )
            .unwrap();
            let growing = sample_decoding(&gpt, &text, &settings, Decoding::Cache, |_| {}).unwrap();
            assert_eq!(fixed.size(), vec![3, config.image_len()]);
            assert_eq!(calls, (1..=config.image_len()).collect::<Vec<_>>());
            assert!(
                fixed.equal(&growing),
                "{layout:?}, guidance {guidance_scale}: fixed-shape decoding drew otherwise"
            );
        }
    }
}

#[test]
fn weights_round_trip_and_another_config_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpt.safetensors");
    let config = tiny(AttentionLayout::Sparse);
    let gpt = model(config.clone(), 12);
    gpt.save(&path).unwrap();
    let loaded = Gpt::load(&path, Device::Cpu).unwrap();
    assert_eq!(loaded.config(), &config);
    let (text, image) = inputs(&config, 2, 13);
    let a = tch::no_grad(|| gpt.forward_t(&text, &image, false)).unwrap();
    let b = tch::no_grad(|| loaded.forward_t(&text, &image, false)).unwrap();
    assert_eq!(max_diff(&a.image, &b.image), 0.0);
    // Weights of a wider model do not fit this config.
    let wide = model(
        GptConfig {
            arch: GptArch {
                dim: 64,
                ..config.arch.clone()
            },
            ..config.clone()
        },
        14,
    );
    let file = crate::weights::read(&{
        let p = dir.path().join("wide.safetensors");
        wide.save(&p).unwrap();
        p
    })
    .unwrap();
    let vars = gpt.var_store().variables();
    let err = file.assign(&vars, "", "").unwrap_err().to_string();
    assert!(
        err.contains("wide.safetensors") && err.contains("shape"),
        "{err}"
    );
}
