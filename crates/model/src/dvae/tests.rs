use super::*;
use tch::{Device, Kind, Tensor};

fn tiny() -> DvaeConfig {
    DvaeConfig {
        image_size: 16,
        downsample: 8,
        channels: 3,
        n_hid: 8,
        n_blk_per_group: 1,
        vocab_size: 16,
        n_init: 8,
        post_gain: None,
    }
}

fn model(seed: i64) -> Dvae {
    tch::manual_seed(seed);
    Dvae::new(tiny(), Device::Cpu).unwrap()
}

fn images(n: i64) -> Tensor {
    Tensor::rand([n, 3, 16, 16], (Kind::Float, Device::Cpu))
}

fn objective(relaxation: Relaxation) -> Objective {
    Objective {
        tau: 1.0,
        beta: 1.0,
        usage: 0.0,
        relaxation,
        recon: ReconLoss::LogitLaplace,
    }
}

#[test]
fn shapes_through_the_network() {
    let m = model(0);
    let x = images(2);
    assert_eq!(m.encoder_logits(&x).unwrap().size(), [2, 16, 2, 2]);
    let tokens = m.encode(&x).unwrap();
    assert_eq!(tokens.size(), [2, 2, 2]);
    assert_eq!(tokens.kind(), Kind::Int64);
    let out = m.decode(&tokens).unwrap();
    assert_eq!(out.size(), [2, 3, 16, 16]);
    assert!(out.min().double_value(&[]) >= 0.0 && out.max().double_value(&[]) <= 1.0);
    let step = m.train_forward(&x, &objective(Relaxation::Soft)).unwrap();
    assert_eq!(step.loss.size(), Vec::<i64>::new());
    assert_eq!(step.tokens.size(), [2, 2, 2]);
}

#[test]
fn a_finer_downsampling_keeps_the_parameters_and_refines_the_grid() {
    let names_and_shapes = |m: &Dvae| -> Vec<(String, Vec<i64>)> {
        let mut v: Vec<_> = m
            .named_parameters()
            .into_iter()
            .map(|(n, t)| (n, t.size()))
            .collect();
        v.sort();
        v
    };
    let coarse = model(3);
    for (downsample, grid) in [(4, 4), (2, 8), (1, 16)] {
        tch::manual_seed(3);
        let cfg = DvaeConfig {
            downsample,
            ..tiny()
        };
        let m = Dvae::new(cfg.clone(), Device::Cpu).unwrap();
        assert_eq!(names_and_shapes(&m), names_and_shapes(&coarse));
        let x = images(2);
        assert_eq!(m.encoder_logits(&x).unwrap().size(), [2, 16, grid, grid]);
        let tokens = m.encode(&x).unwrap();
        assert_eq!(m.decode(&tokens).unwrap().size(), [2, 3, 16, 16]);
        let step = m.train_forward(&x, &objective(Relaxation::Soft)).unwrap();
        assert_eq!(step.tokens.size(), [2, grid, grid]);
        // The grid is part of the saved config: a file loads as it trained.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dvae.safetensors");
        m.save(&path).unwrap();
        let loaded = Dvae::load(&path, Device::Cpu).unwrap();
        assert_eq!(loaded.config(), &cfg);
        assert!(loaded.encode(&x).unwrap().equal(&tokens));
    }
    for bad in [0, 3, 16] {
        let cfg = DvaeConfig {
            downsample: bad,
            ..tiny()
        };
        let err = Dvae::new(cfg, Device::Cpu).err().unwrap().to_string();
        assert!(
            err.contains("dvae.downsample") && err.contains(&bad.to_string()),
            "{err}"
        );
    }
    let err = Dvae::new(
        DvaeConfig {
            image_size: 18,
            downsample: 4,
            ..tiny()
        },
        Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("dvae.image_size") && err.contains("(4)"),
        "{err}"
    );
}

#[test]
fn parameter_names_and_shapes_are_openais() {
    // n_hid 8, one block per group: widths 8, 16, 32, 64; bottlenecks n_out/4.
    let expected: &[(&str, &[i64])] = &[
        ("encoder.blocks.input.w", &[8, 3, 7, 7]),
        ("encoder.blocks.input.b", &[8]),
        (
            "encoder.blocks.group_1.block_1.res_path.conv_1.w",
            &[2, 8, 3, 3],
        ),
        (
            "encoder.blocks.group_1.block_1.res_path.conv_4.w",
            &[8, 2, 1, 1],
        ),
        ("encoder.blocks.group_2.block_1.id_path.w", &[16, 8, 1, 1]),
        (
            "encoder.blocks.group_2.block_1.res_path.conv_2.w",
            &[4, 4, 3, 3],
        ),
        ("encoder.blocks.group_4.block_1.res_path.conv_4.b", &[64]),
        ("encoder.blocks.output.conv.w", &[16, 64, 1, 1]),
        ("decoder.blocks.input.w", &[8, 16, 1, 1]),
        ("decoder.blocks.group_1.block_1.id_path.w", &[64, 8, 1, 1]),
        (
            "decoder.blocks.group_1.block_1.res_path.conv_1.w",
            &[16, 8, 1, 1],
        ),
        (
            "decoder.blocks.group_1.block_1.res_path.conv_4.w",
            &[64, 16, 3, 3],
        ),
        ("decoder.blocks.group_4.block_1.id_path.w", &[8, 16, 1, 1]),
        ("decoder.blocks.output.conv.w", &[6, 8, 1, 1]),
        ("decoder.blocks.output.conv.b", &[6]),
    ];
    let vars = model(0).var_store().variables();
    for (name, shape) in expected {
        let t = vars.get(*name).unwrap_or_else(|| panic!("missing {name}"));
        assert_eq!(t.size(), *shape, "{name}");
    }
    // No id_path where widths match (encoder group 1: 8 → 8).
    assert!(!vars.contains_key("encoder.blocks.group_1.block_1.id_path.w"));
    // Encoder: input + 4 groups × 4 res convs + 3 id_paths + output = 21
    // convs; decoder: the same with an id_path in all 4 groups = 22 convs.
    assert_eq!(vars.len(), 2 * (21 + 22));
}

#[test]
fn init_follows_openai() {
    tch::manual_seed(1);
    let cfg = DvaeConfig {
        n_hid: 64,
        ..tiny()
    };
    let m = Dvae::new(cfg, Device::Cpu).unwrap();
    let vars = m.var_store().variables();
    // Group 4 is 8·64 wide, its bottleneck 128: conv_2 is 128 → 128, 3×3.
    let w = &vars["encoder.blocks.group_4.block_1.res_path.conv_2.w"];
    let want = 1.0 / (128.0f64 * 9.0).sqrt();
    let got = w.std(true).double_value(&[]);
    assert!((got / want - 1.0).abs() < 0.05, "std {got} want {want}");
    assert!(w.mean(Kind::Float).double_value(&[]).abs() < 0.01);
    let b = &vars["encoder.blocks.group_4.block_1.res_path.conv_2.b"];
    assert_eq!(b.abs().sum(Kind::Float).double_value(&[]), 0.0);
}

#[test]
fn straight_through_is_exactly_one_hot_and_passes_gradient() {
    let m = model(2);
    let logits = m.encoder_logits(&images(3)).unwrap();
    let z = relax::gumbel_softmax(&logits, 0.5, Relaxation::StraightThrough);
    let ones = z.eq(1.0).sum(Kind::Int64).int64_value(&[]);
    let zeros = z.eq(0.0).sum(Kind::Int64).int64_value(&[]);
    assert_eq!(ones, 3 * 2 * 2, "one 1 per grid position");
    assert_eq!(
        ones + zeros,
        z.numel() as i64,
        "every other entry exactly 0"
    );

    let step = m
        .train_forward(&images(3), &objective(Relaxation::StraightThrough))
        .unwrap();
    // Reconstruction only: its gradient reaches the encoder only through z.
    step.recon.backward();
    let g = m.var_store().variables()["encoder.blocks.input.w"].grad();
    assert!(g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
}

#[test]
fn soft_relaxation_is_a_distribution_that_sharpens_with_temperature() {
    let logits = Tensor::randn([4, 16, 2, 2], (Kind::Float, Device::Cpu));
    for tau in [1.0, 0.1] {
        let z = relax::gumbel_softmax(&logits, tau, Relaxation::Soft);
        let sums = z.sum_dim_intlist(1, false, Kind::Float);
        assert!((sums - 1.0).abs().max().double_value(&[]) < 1e-5);
    }
    let peak = |tau| {
        tch::manual_seed(3);
        let z = relax::gumbel_softmax(&logits, tau, Relaxation::Soft);
        z.amax(1, false).mean(Kind::Float).double_value(&[])
    };
    assert!(peak(0.05) > peak(2.0) + 0.2);
}

#[test]
fn kl_is_zero_for_uniform_logits_and_positive_otherwise() {
    let uniform = Tensor::zeros([2, 16, 3, 3], (Kind::Float, Device::Cpu));
    assert!(loss::kl_to_uniform(&uniform).double_value(&[]).abs() < 1e-5);
    let peaked = Tensor::randn([2, 16, 3, 3], (Kind::Float, Device::Cpu)) * 5.0;
    let kl = loss::kl_to_uniform(&peaked).double_value(&[]);
    // Bounded by ln K per position, 9 positions.
    assert!(kl > 0.1 && kl <= 9.0 * 16f64.ln() + 1e-4, "{kl}");
}

#[test]
fn logit_laplace_nll_is_smallest_at_the_true_logit() {
    let x = Tensor::from_slice(&[0.3f32, 0.6]).view([1, 1, 1, 2]);
    let ln_b = Tensor::zeros([1, 1, 1, 2], (Kind::Float, Device::Cpu));
    let nll = |mu: Tensor| {
        loss::logit_laplace_nll(&Tensor::cat(&[mu, ln_b.shallow_clone()], 1), &x).double_value(&[])
    };
    let at_truth = nll(x.logit(None::<f64>));
    // ln(2b) + ln(x(1-x)) with b = 1, averaged over the two pixels.
    let want = (2f64.ln() * 2.0 + (0.3f64 * 0.7).ln() + (0.6f64 * 0.4).ln()) / 2.0;
    assert!((at_truth - want).abs() < 1e-5, "{at_truth} vs {want}");
    assert!(nll(x.logit(None::<f64>) + 0.5) > at_truth + 0.4);
}

#[test]
fn usage_kl_is_zero_when_codes_are_spread_and_ln_k_on_one_code() {
    let spread = loss::usage_kl(&Tensor::full([8], 1.0 / 8.0, (Kind::Float, Device::Cpu)));
    assert!(spread.double_value(&[]).abs() < 1e-6);
    let one = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    let collapsed = loss::usage_kl(&one).double_value(&[]);
    assert!((collapsed - 8f64.ln()).abs() < 1e-5, "{collapsed}");
}

/// The surrogate must give the usage term's true gradient, also when the
/// batch is split across ranks and the halves' gradients are averaged.
#[test]
fn usage_surrogate_has_the_gradient_of_the_global_usage_kl() {
    tch::manual_seed(3);
    let logits =
        (Tensor::randn([4, 6, 2, 2], (Kind::Float, Device::Cpu)) * 2.0).set_requires_grad(true);
    let grad_of = |loss: Tensor| Tensor::run_backward(&[loss], &[&logits], false, false).remove(0);
    let whole = grad_of(loss::usage_kl(&loss::mean_posterior(&logits)));

    let halves = [logits.narrow(0, 0, 2), logits.narrow(0, 2, 2)];
    let means: Vec<Tensor> = halves.iter().map(loss::mean_posterior).collect();
    let global = ((&means[0] + &means[1]) / 2.0).detach();
    // Each rank's gradient weighs half: the data-parallel mean over ranks.
    let split = grad_of(
        (loss::usage_surrogate(&means[0], &global) + loss::usage_surrogate(&means[1], &global))
            / 2.0,
    );
    let diff = (&whole - &split).abs().max().double_value(&[]);
    assert!(diff < 1e-6, "surrogate gradient differs by {diff}");
    assert!(
        whole.abs().max().double_value(&[]) > 1e-3,
        "the gradient is not trivially zero"
    );
}

#[test]
fn codebook_usage_counts_codes_and_perplexity() {
    let tokens = Tensor::from_slice(&[0i64, 0, 1, 1, 2, 2, 3, 3]);
    let (distinct, ppl) = loss::codebook_usage(&tokens, 16);
    assert_eq!(distinct, 4);
    assert!((ppl - 4.0).abs() < 1e-9);
    let (distinct, ppl) = loss::codebook_usage(&Tensor::from_slice(&[5i64; 8]), 16);
    assert_eq!((distinct, ppl), (1, 1.0));
}

#[test]
fn save_then_load_gives_identical_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dvae.safetensors");
    let m = model(4);
    m.save(&path).unwrap();
    let loaded = Dvae::load(&path, Device::Cpu).unwrap();
    assert_eq!(loaded.config(), m.config());
    let x = images(2);
    let logits = m.encoder_logits(&x).unwrap();
    assert!(loaded.encoder_logits(&x).unwrap().equal(&logits));
    let tokens = m.encode(&x).unwrap();
    assert!(
        loaded
            .decode(&tokens)
            .unwrap()
            .equal(&m.decode(&tokens).unwrap())
    );
}

#[test]
fn loading_names_the_missing_or_misshaped_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(5);
    let metadata = HashMap::from([
        (FORMAT_KEY.to_string(), FORMAT.to_string()),
        (
            CONFIG_KEY.to_string(),
            serde_json::to_string(m.config()).unwrap(),
        ),
    ]);
    let victim = "decoder.blocks.group_2.block_1.res_path.conv_3.w";

    let missing: Vec<_> = m
        .named_parameters()
        .into_iter()
        .filter(|(n, _)| n != victim)
        .collect();
    let path = dir.path().join("missing.safetensors");
    weights::save(&path, &missing, metadata.clone()).unwrap();
    let err = Dvae::load(&path, Device::Cpu).err().unwrap();
    assert!(
        matches!(err, ModelError::MissingTensor { ref name, .. } if name == victim),
        "{err}"
    );
    assert!(err.to_string().contains(victim) && err.to_string().contains("missing.safetensors"));

    let misshaped: Vec<_> = m
        .named_parameters()
        .into_iter()
        .map(|(n, t)| {
            if n == victim {
                (n, t.narrow(0, 0, 1))
            } else {
                (n, t)
            }
        })
        .collect();
    let path = dir.path().join("misshaped.safetensors");
    weights::save(&path, &misshaped, metadata).unwrap();
    let err = Dvae::load(&path, Device::Cpu).err().unwrap().to_string();
    assert!(err.contains(victim) && err.contains("shape"), "{err}");
}

#[test]
fn loading_rejects_a_file_that_is_not_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.safetensors");
    std::fs::write(&path, b"not a weights file").unwrap();
    let err = Dvae::load(&path, Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("junk.safetensors"), "{err}");
    let err = Dvae::load(&dir.path().join("absent.safetensors"), Device::Cpu)
        .err()
        .unwrap();
    assert!(err.to_string().contains("absent.safetensors"), "{err}");
}

#[test]
fn openai_layout_files_load_unprefixed() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(6);
    let split = |prefix: &str| -> Vec<(String, Tensor)> {
        m.named_parameters()
            .into_iter()
            .filter_map(|(n, t)| n.strip_prefix(prefix).map(|s| (s.to_string(), t)))
            .collect()
    };
    let (enc, dec) = (
        dir.path().join("encoder.safetensors"),
        dir.path().join("decoder.safetensors"),
    );
    weights::save(&enc, &split("encoder."), HashMap::new()).unwrap();
    weights::save(&dec, &split("decoder."), HashMap::new()).unwrap();
    let loaded = Dvae::load_openai(&enc, &dec, 16, Device::Cpu).unwrap();
    assert_eq!(loaded.config(), m.config());
    let x = images(1);
    assert!(
        loaded
            .encoder_logits(&x)
            .unwrap()
            .equal(&m.encoder_logits(&x).unwrap())
    );
}

#[test]
fn bad_inputs_are_rejected_with_what_was_expected() {
    let m = model(7);
    let wrong_size = Tensor::rand([1, 3, 24, 24], (Kind::Float, Device::Cpu));
    let err = m.encode(&wrong_size).err().unwrap().to_string();
    assert!(
        err.contains("(N, 3, 16, 16)") && err.contains("24"),
        "{err}"
    );
    let wrong_channels = Tensor::rand([1, 4, 16, 16], (Kind::Float, Device::Cpu));
    assert!(
        m.encode(&wrong_channels)
            .err()
            .unwrap()
            .to_string()
            .contains("[1, 4, 16, 16]")
    );
    let bad_tokens = Tensor::from_slice(&[0i64, 1, 2, 99]).view([1, 2, 2]);
    assert!(
        m.decode(&bad_tokens)
            .err()
            .unwrap()
            .to_string()
            .contains("99")
    );
    let bad_cfg = DvaeConfig {
        image_size: 20,
        ..tiny()
    };
    assert!(
        Dvae::new(bad_cfg, Device::Cpu)
            .err()
            .unwrap()
            .to_string()
            .contains("dvae.image_size")
    );
}

#[test]
fn the_decoder_alone_decodes_like_the_whole_model() {
    let model = model(21);
    let tokens = model.encode(&images(2)).unwrap();
    let expected = model.decode(&tokens).unwrap();
    let bytes = model.decoder_bytes().unwrap();
    let file = weights::from_bytes(&bytes, Path::new("decoder.safetensors")).unwrap();
    assert!(file.tensors.keys().all(|n| n.starts_with("decoder.")));
    let decoder = DvaeDecoder::from_weights(&file, Device::Cpu).unwrap();
    assert_eq!(decoder.config(), model.config());
    assert!(decoder.decode(&tokens).unwrap().equal(&expected));
    // A whole dVAE file serves too; a decoder file is not a whole dVAE.
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("dvae.safetensors");
    model.save(&whole).unwrap();
    let from_whole =
        DvaeDecoder::from_weights(&weights::read(&whole).unwrap(), Device::Cpu).unwrap();
    assert!(from_whole.decode(&tokens).unwrap().equal(&expected));
    let part = dir.path().join("decoder.safetensors");
    std::fs::write(&part, &bytes).unwrap();
    let err = Dvae::load(&part, Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("dvae-decoder"), "{err}");
}

#[test]
fn convolutions_compute_channels_last_with_nchw_results_and_gradients() {
    use super::conv::{Conv2d, channels_last};
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let conv = Conv2d::new(vs.root() / "c", 5, 7, 3);
    // Deterministic without the global generator, which parallel tests race for.
    let x = (Tensor::arange(2 * 5 * 6 * 6, (Kind::Float, Device::Cpu)) * 0.37)
        .sin()
        .view([2, 5, 6, 6])
        .set_requires_grad(true);
    let out = conv.forward(&x);
    let (w, b) = {
        let vars = vs.variables();
        (vars["c.w"].shallow_clone(), vars["c.b"].shallow_clone())
    };
    let plain = x.conv2d(&w, Some(&b), [1, 1], [1, 1], [1, 1], 1);
    assert_eq!(out.size(), vec![2, 7, 6, 6]);
    // Channels-last strides: the channel is the innermost dimension.
    assert_eq!(out.stride()[1], 1, "strides {:?}", out.stride());
    let diff = (&out - &plain).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "channels-last conv is {diff} from NCHW");
    // The gradients reach the NCHW parameters and input.
    let gx = Tensor::run_backward(&[out.sum(Kind::Float)], &[&x, &w], false, false);
    let gp = Tensor::run_backward(&[plain.sum(Kind::Float)], &[&x, &w], false, false);
    for (a, b) in gx.iter().zip(&gp) {
        assert!(a.is_contiguous() || a.stride()[1] == 1);
        assert!((a - b).abs().max().double_value(&[]) < 1e-4);
    }
    // Converting what already is channels-last copies nothing.
    let cl = channels_last(&plain.detach());
    assert_eq!(channels_last(&cl).data_ptr(), cl.data_ptr());
}

#[test]
fn posterior_terms_share_one_softmax_and_agree_with_the_mean_posterior() {
    let logits = (Tensor::arange(2 * 16 * 2 * 2, (Kind::Float, Device::Cpu)) * 0.61)
        .sin()
        .view([2, 16, 2, 2]);
    let (kl, mean) = loss::posterior_terms(&logits);
    assert!(
        (&mean - loss::mean_posterior(&logits))
            .abs()
            .max()
            .double_value(&[])
            < 1e-7
    );
    assert!((mean.sum(Kind::Float).double_value(&[]) - 1.0).abs() < 1e-5);
    assert!(kl.double_value(&[]) > 0.0);
}
