//! AdamW (Loshchilov & Hutter) over named parameters, with its state
//! (step count and both moments) open for checkpoints — the reason it lives
//! here and not in tch, whose optimizers cannot export their state.
//!
//! Weight decay is decoupled and applies to weight matrices and kernels
//! (two or more dimensions), not to biases or gains.

use crate::bucket_hooks::BucketHooks;
use dalle_kernels::{AdamWSlot, AdamWUpdate, SLOT_ALIGN, fused_adamw};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The paper's dVAE settings.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-4,
        }
    }
}

/// One flat buffer of the parameters of one dtype on one device (every
/// parameter a view into it), its gradients (likewise) and the moments of
/// the elements this rank updates: all of them, or with a sharded
/// optimizer its share. The decayed parameters (weight matrices and
/// kernels) come first, so that weight decay is one kernel over a prefix.
///
/// With sharded gradients (ZeRO-2) `grads` holds only the owned elements,
/// range after range like the moments: the parameters' `.grad`s are not
/// views of it but short-lived tensors that data parallelism reduces into
/// it as backward produces them (`crate::bucket_hooks`).
struct Flat {
    params: Tensor,
    grads: Tensor,
    /// Whether `grads` holds only the owned elements.
    compact_grads: bool,
    /// The moments of the owned elements, range after range.
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Elements at the front that weight decay applies to.
    decayed: i64,
    /// The element ranges of the buffer this rank updates, ascending.
    owned: Vec<Range<i64>>,
    /// The update count as a scalar on the buffer's device, which the
    /// fused kernel reads its bias corrections from.
    step_count: Tensor,
}

// Shards are cut where the fused update's result does not change.
const _: () = assert!(dalle_collective::SHARD_ALIGN as i64 % SLOT_ALIGN == 0);

/// A run of elements one call of the fused update takes as one tensor.
struct UpdatePiece {
    elements: Range<i64>,
    /// Where its moments (and compact gradients) start.
    moments: i64,
    decayed: bool,
}

impl Flat {
    /// The gradient of the elements `range` (owned ones, with compact
    /// gradients).
    fn grads_over(&self, range: &Range<i64>) -> Tensor {
        let len = range.end - range.start;
        if !self.compact_grads {
            return self.grads.narrow(0, range.start, len);
        }
        let (owned, at) = self
            .owned_with_moments()
            .find(|(owned, _)| owned.start <= range.start && range.end <= owned.end)
            .expect("with sharded gradients only owned elements have a gradient");
        self.grads.narrow(0, at + range.start - owned.start, len)
    }

    /// The owned ranges cut where weight decay ends, into what one fused
    /// update takes as tensors. The kernel's result for an element depends
    /// on where its piece starts modulo the kernel's vector width, so that
    /// sharded and unsharded training agree bit for bit every cut is at a
    /// multiple of [`SLOT_ALIGN`] elements from the buffer's start (shards
    /// are: `dalle_collective::SHARD_ALIGN`), except the end of weight
    /// decay, which is followed by a cut at the next multiple in every
    /// sharding alike.
    fn update_pieces(&self) -> Vec<UpdatePiece> {
        let decay_end = self.decayed;
        let realigned = (decay_end as u64).next_multiple_of(SLOT_ALIGN as u64) as i64;
        let mut pieces = Vec::new();
        for (range, moments) in self.owned_with_moments() {
            let mut start = range.start;
            for cut in [decay_end, realigned, range.end] {
                if cut > start && cut <= range.end {
                    pieces.push(UpdatePiece {
                        elements: start..cut,
                        moments: moments + start - range.start,
                        decayed: start < decay_end,
                    });
                    start = cut;
                }
            }
        }
        pieces
    }

    /// The parameters, gradients and moments of one piece.
    fn piece_views(&self, piece: &UpdatePiece) -> [Tensor; 4] {
        let len = piece.elements.end - piece.elements.start;
        let grads_at = if self.compact_grads {
            piece.moments
        } else {
            piece.elements.start
        };
        [
            self.params.narrow(0, piece.elements.start, len),
            self.grads.narrow(0, grads_at, len),
            self.exp_avg.narrow(0, piece.moments, len),
            self.exp_avg_sq.narrow(0, piece.moments, len),
        ]
    }

    /// The owned ranges, each with where its moments start.
    fn owned_with_moments(&self) -> impl Iterator<Item = (Range<i64>, i64)> + '_ {
        self.owned.iter().scan(0, |at, range| {
            let moments = *at;
            *at += range.end - range.start;
            Some((range.clone(), moments))
        })
    }
}

/// Which elements of a flat buffer of the given length this rank updates:
/// for a sharded optimizer, its share of every gradient bucket.
pub type Ownership<'a> = &'a dyn Fn(i64) -> Vec<Range<i64>>;

/// Where one named parameter lives in the flat buffers.
struct Member {
    name: String,
    /// The parameter itself (its storage a view of the buffer).
    leaf: Tensor,
    shape: Vec<i64>,
    flat: usize,
    offset: i64,
    numel: i64,
}

impl Member {
    fn view(&self, buffer: &Tensor) -> Tensor {
        buffer
            .narrow(0, self.offset, self.numel)
            .view(self.shape.as_slice())
    }
}

/// AdamW over flat buffers: the update is a handful of kernels per buffer,
/// not ten per parameter, and the gradients it reads are the ones autograd
/// writes (each parameter's `.grad` is a view into the buffer), which data
/// parallelism can reduce in place, bucket by bucket, without gathering.
pub struct AdamW {
    config: AdamWConfig,
    flats: Vec<Flat>,
    members: Vec<Member>,
    step: u64,
    /// Whether this rank updates only a share of the parameters.
    sharded: bool,
    /// The hooks that reduce the gradients during backward, if any.
    bucket_hooks: Option<BucketHooks>,
}

impl AdamW {
    /// Takes the trainable parameters, sorted by name so the state layout is
    /// the same in every process, and moves their values (and gradients)
    /// into flat buffers: the tensors keep their identity, so the model
    /// sees no change, but their storage is now the buffers'.
    pub fn new(named: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        Self::build(named, config, None, false)
    }

    /// An optimizer that keeps moments for, and updates, only the elements
    /// `owned` gives this rank (ZeRO-1); the rest of the parameters come
    /// from the ranks that own them ([`crate::ddp::DataParallel::update`]).
    pub fn sharded(named: Vec<(String, Tensor)>, config: AdamWConfig, owned: Ownership) -> Self {
        Self::build(named, config, Some(owned), false)
    }

    /// [`AdamW::sharded`] that also keeps only the owned elements'
    /// gradients (ZeRO-2): the parameters have no `.grad` between steps,
    /// and during backward whatever [`crate::bucket_hooks`] installs takes
    /// each one, adds its share here and drops it.
    pub(crate) fn sharded_gradients(
        named: Vec<(String, Tensor)>,
        config: AdamWConfig,
        owned: Ownership,
    ) -> Self {
        Self::build(named, config, Some(owned), true)
    }

    fn build(
        mut named: Vec<(String, Tensor)>,
        config: AdamWConfig,
        owned: Option<Ownership>,
        compact_grads: bool,
    ) -> Self {
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named.retain(|(_, p)| p.requires_grad());
        // Decayed first within each (dtype, device) buffer; names in order.
        let mut order: Vec<usize> = (0..named.len()).collect();
        order.sort_by_key(|&i| named[i].1.dim() < 2);
        let mut keys: Vec<(Kind, Device)> = Vec::new();
        let mut members = Vec::new();
        let mut sizes: Vec<(i64, i64)> = Vec::new(); // (elements, decayed)
        for &i in &order {
            let (name, p) = &named[i];
            let key = (p.kind(), p.device());
            let flat = keys.iter().position(|k| *k == key).unwrap_or_else(|| {
                keys.push(key);
                sizes.push((0, 0));
                keys.len() - 1
            });
            let numel = p.numel() as i64;
            members.push(Member {
                name: name.clone(),
                leaf: p.shallow_clone(),
                shape: p.size(),
                flat,
                offset: sizes[flat].0,
                numel,
            });
            sizes[flat].0 += numel;
            if p.dim() >= 2 {
                sizes[flat].1 += numel;
            }
        }
        let flats: Vec<Flat> = keys
            .iter()
            .zip(&sizes)
            .map(|(&(kind, device), &(elements, decayed))| {
                let owned = match owned {
                    Some(owned) => owned(elements),
                    None => vec![Range {
                        start: 0,
                        end: elements,
                    }],
                };
                let moments: i64 = owned.iter().map(|r| r.end - r.start).sum();
                let zeros = |n: i64| Tensor::zeros([n], (kind, device));
                Flat {
                    params: zeros(elements),
                    grads: zeros(if compact_grads { moments } else { elements }),
                    compact_grads,
                    exp_avg: zeros(moments),
                    exp_avg_sq: zeros(moments),
                    decayed,
                    owned,
                    step_count: Tensor::zeros([], (Kind::Float, device)),
                }
            })
            .collect();
        let params: Vec<Tensor> = order.iter().map(|&i| named[i].1.shallow_clone()).collect();
        tch::no_grad(|| {
            for (m, p) in members.iter().zip(&params) {
                m.view(&flats[m.flat].params).copy_(p);
            }
        });
        for (m, p) in members.iter().zip(&params) {
            let mut p = p.shallow_clone();
            p.set_data(&m.view(&flats[m.flat].params));
        }
        // Every parameter needs a `.grad` to point into the buffer: a
        // backward pass of nothing gives each a zero one, whose storage is
        // then swapped for its view. Autograd adds into a defined gradient
        // in place, so from now on backward writes the buffer. Compact
        // gradients leave `.grad` undefined: backward allocates each one.
        if compact_grads {
            for p in &params {
                dalle_autograd::drop_grad(p).expect("a parameter's grad can be dropped");
            }
        } else if !params.is_empty() {
            tch::with_grad(|| {
                let nothing: Tensor = params.iter().map(|p| p.sum(Kind::Float) * 0.0).sum();
                nothing.backward();
            });
        }
        for (m, p) in members.iter().zip(&params).filter(|_| !compact_grads) {
            let mut grad = p.grad();
            grad.set_data(&m.view(&flats[m.flat].grads));
        }
        let mut optimizer = Self {
            config,
            flats,
            members,
            step: 0,
            sharded: owned.is_some(),
            bucket_hooks: None,
        };
        optimizer.zero_grad();
        optimizer
    }

    /// Updates taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    pub fn zero_grad(&mut self) {
        for flat in &mut self.flats {
            let _ = flat.grads.zero_();
        }
    }

    /// The flat gradient buffers (every parameter's `.grad` is a view into
    /// one), for reducing them in place across ranks; with sharded
    /// gradients, the owned elements' gradients, range after range.
    pub fn flat_grads(&self) -> Vec<Tensor> {
        self.flats.iter().map(|f| f.grads.shallow_clone()).collect()
    }

    /// The flat parameter buffers, for gathering a sharded optimizer's
    /// updates across ranks.
    pub fn flat_params(&self) -> Vec<Tensor> {
        self.flats
            .iter()
            .map(|f| f.params.shallow_clone())
            .collect()
    }

    /// Whether this rank updates only its share of the parameters.
    pub fn is_sharded(&self) -> bool {
        self.sharded
    }

    /// Whether this rank keeps only its share of the gradients (ZeRO-2).
    pub fn shards_gradients(&self) -> bool {
        self.flats.iter().any(|f| f.compact_grads)
    }

    /// Hands the optimizer the hooks that reduce its gradients during
    /// backward (and fill its compact gradients, when sharded).
    pub(crate) fn attach_bucket_hooks(&mut self, hooks: BucketHooks) {
        self.bucket_hooks = Some(hooks);
    }

    /// The hooks that reduce the gradients during backward, if any.
    pub fn bucket_hooks(&self) -> Option<&BucketHooks> {
        self.bucket_hooks.as_ref()
    }

    /// Where every parameter lives: its name, the parameter, its flat
    /// buffer and its element range there.
    pub(crate) fn layout(&self) -> Vec<(String, Tensor, usize, Range<i64>)> {
        self.members
            .iter()
            .map(|m| {
                (
                    m.name.clone(),
                    m.leaf.shallow_clone(),
                    m.flat,
                    m.offset..m.offset + m.numel,
                )
            })
            .collect()
    }

    /// Elements of each flat buffer.
    pub(crate) fn flat_lengths(&self) -> Vec<i64> {
        self.flats.iter().map(|f| f.params.numel() as i64).collect()
    }

    /// Elements this rank keeps moments for (each of two moments): every
    /// parameter's, or with a sharded optimizer about 1/W of them.
    pub fn moment_elements(&self) -> i64 {
        self.flats.iter().map(|f| f.exp_avg.numel() as i64).sum()
    }

    /// Sums of squared gradients over `ranges` (per flat buffer, in order),
    /// one f32 each, on the device: the pieces a global norm is summed
    /// from in the same order however the state is sharded.
    pub fn square_sums(&self, ranges: &[Vec<Range<i64>>]) -> Tensor {
        let sums: Vec<Tensor> = self
            .flats
            .iter()
            .zip(ranges)
            .flat_map(|(f, ranges)| {
                ranges
                    .iter()
                    .map(|r| f.grads_over(r).square().sum(Kind::Float))
            })
            .collect();
        match sums.first() {
            Some(first) => Tensor::stack(&sums, 0).to_device(first.device()),
            None => Tensor::zeros([0], (Kind::Float, Device::Cpu)),
        }
    }

    /// Global L2 norm of all gradients this rank holds, on the device.
    fn norm(&self) -> Option<Tensor> {
        let whole: Vec<Vec<Range<i64>>> = self
            .flats
            .iter()
            .map(|f| {
                if f.compact_grads {
                    f.owned.clone()
                } else {
                    vec![Range {
                        start: 0,
                        end: f.grads.numel() as i64,
                    }]
                }
            })
            .collect();
        (!self.flats.is_empty()).then(|| self.square_sums(&whole).sum(Kind::Float).sqrt())
    }

    /// Global L2 norm of all gradients.
    pub fn grad_norm(&self) -> f64 {
        self.norm().map_or(0.0, |n| n.double_value(&[]))
    }

    /// Scales gradients so their global norm is at most `max_norm`, on the
    /// device (no branch on the host); returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let Some(norm) = self.norm() else {
            return 0.0;
        };
        self.clip_to(&norm, max_norm);
        norm.double_value(&[])
    }

    /// Scales the gradents this rank updates by `max_norm / norm` where
    /// that is below one, given the global `norm` (a device scalar).
    pub fn clip_to(&mut self, norm: &Tensor, max_norm: f64) {
        let scale = (max_norm / (norm + 1e-6)).clamp_max(1.0);
        tch::no_grad(|| {
            for flat in &mut self.flats {
                let scale = scale
                    .to_device(flat.grads.device())
                    .to_kind(flat.grads.kind());
                if flat.compact_grads {
                    let _ = flat.grads.g_mul_(&scale);
                } else {
                    for r in &flat.owned {
                        let _ = flat.grads_over(r).g_mul_(&scale);
                    }
                }
            }
        });
    }

    /// One update at learning rate `lr`, over every element this rank
    /// owns, by libtorch's fused AdamW kernel (what PyTorch's
    /// `AdamW(fused=True)` runs): two calls per flat buffer, one for the
    /// decayed elements and one for the rest, each one pass over its
    /// pieces. A parameter that got no gradient this step has a zero one:
    /// its moments decay and its update follows them, as in PyTorch's AdamW
    /// with zeroed (rather than absent) gradients.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        tch::no_grad(|| {
            for f in &mut self.flats {
                // A device-side fill, not an upload the step would wait for.
                let _ = f.step_count.fill_(self.step as f64);
                let pieces = f.update_pieces();
                for decayed in [true, false] {
                    let views: Vec<[Tensor; 4]> = pieces
                        .iter()
                        .filter(|piece| piece.decayed == decayed)
                        .map(|piece| f.piece_views(piece))
                        .collect();
                    let slots: Vec<AdamWSlot> = views
                        .iter()
                        .map(|[param, grad, exp_avg, exp_avg_sq]| AdamWSlot {
                            param,
                            grad,
                            exp_avg,
                            exp_avg_sq,
                            step: &f.step_count,
                        })
                        .collect();
                    let update = AdamWUpdate {
                        lr,
                        beta1,
                        beta2,
                        weight_decay: if decayed { weight_decay } else { 0.0 },
                        eps,
                    };
                    fused_adamw(&slots, update)
                        .expect("the flat buffers' pieces agree in shape, dtype and device");
                }
            }
        });
    }

    /// The optimizer state as named tensors (`NAME.exp_avg`,
    /// `NAME.exp_avg_sq`) plus the step count, for checkpoints: the same
    /// format as before the buffers were flat. A sharded optimizer holds
    /// only its share ([`AdamW::shard_state`]).
    pub fn state(&self) -> (u64, Vec<(String, Tensor)>) {
        assert!(
            !self.sharded,
            "a sharded optimizer holds only its share of the state"
        );
        let whole: Vec<[Tensor; 2]> = self
            .flats
            .iter()
            .map(|f| [f.exp_avg.shallow_clone(), f.exp_avg_sq.shallow_clone()])
            .collect();
        self.named_state(&whole)
    }

    /// The named state (see [`AdamW::state`]) of full-length moment
    /// buffers, one pair per flat buffer.
    fn named_state(&self, moments: &[[Tensor; 2]]) -> (u64, Vec<(String, Tensor)>) {
        let tensors = self
            .members
            .iter()
            .flat_map(|m| {
                let [exp_avg, exp_avg_sq] = &moments[m.flat];
                [
                    (format!("{}.exp_avg", m.name), m.view(exp_avg)),
                    (format!("{}.exp_avg_sq", m.name), m.view(exp_avg_sq)),
                ]
            })
            .collect();
        (self.step, tensors)
    }

    /// This rank's moments as 1-D tensors named `exp_avg.F.START` and
    /// `exp_avg_sq.F.START` (flat buffer F, from element START): its share
    /// of a sharded checkpoint, which [`AdamW::load_shards`] reads back at
    /// any world size.
    pub fn shard_state(&self) -> Vec<(String, Tensor)> {
        self.flats
            .iter()
            .enumerate()
            .flat_map(|(i, f)| {
                f.owned_with_moments().flat_map(move |(range, at)| {
                    let len = range.end - range.start;
                    [("exp_avg", &f.exp_avg), ("exp_avg_sq", &f.exp_avg_sq)].map(
                        |(kind, moments)| {
                            (
                                format!("{kind}.{i}.{}", range.start),
                                moments.narrow(0, at, len),
                            )
                        },
                    )
                })
            })
            .collect()
    }

    /// Restores the moments this rank owns from the shares of a sharded
    /// checkpoint (every rank's [`AdamW::shard_state`], saved at any world
    /// size): each owned element must be found exactly once.
    pub fn load_shards(&mut self, step: u64, pieces: &[(String, Tensor)]) -> Result<(), String> {
        let mut covered = vec![[0i64; 2]; self.flats.len()];
        for (name, piece) in pieces {
            let bad = || format!("sharded optimizer state: unreadable piece `{name}`");
            let mut parts = name.split('.');
            let kind = match parts.next() {
                Some("exp_avg") => 0,
                Some("exp_avg_sq") => 1,
                _ => return Err(bad()),
            };
            let flat: usize = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
            let start: i64 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
            let len = piece.numel() as i64;
            let Some(f) = self.flats.get(flat) else {
                return Err(format!(
                    "sharded optimizer state: `{name}` is of buffer {flat}, but the model has {}",
                    self.flats.len()
                ));
            };
            if piece.dim() != 1 || start + len > f.params.numel() as i64 {
                return Err(format!(
                    "sharded optimizer state: `{name}` ({len} elements from {start}) does not fit \
                     buffer {flat} of {} elements",
                    f.params.numel()
                ));
            }
            let moments = if kind == 0 { &f.exp_avg } else { &f.exp_avg_sq };
            for (range, at) in f.owned_with_moments() {
                let (from, to) = (range.start.max(start), range.end.min(start + len));
                if from < to {
                    tch::no_grad(|| {
                        moments
                            .narrow(0, at + from - range.start, to - from)
                            .copy_(&piece.narrow(0, from - start, to - from))
                    });
                    covered[flat][kind] += to - from;
                }
            }
        }
        for (i, (f, covered)) in self.flats.iter().zip(&covered).enumerate() {
            let owned = f.exp_avg.numel() as i64;
            if covered.iter().any(|&c| c != owned) {
                return Err(format!(
                    "sharded optimizer state covers {covered:?} of the {owned} elements this \
                     rank updates in buffer {i} (exp_avg, exp_avg_sq): shares are missing or \
                     overlap"
                ));
            }
        }
        self.step = step;
        Ok(())
    }

    /// Restores a state exported by [`AdamW::state`] (whatever the
    /// sharding it was saved with: the format is whole); every moment must
    /// be present with the parameter's shape. A sharded optimizer takes its
    /// share of it.
    pub fn load_state(&mut self, step: u64, tensors: &[(String, Tensor)]) -> Result<(), String> {
        let find = |name: &str| tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        for m in &self.members {
            let flat = &self.flats[m.flat];
            for (suffix, buffer) in [("exp_avg", &flat.exp_avg), ("exp_avg_sq", &flat.exp_avg_sq)] {
                let key = format!("{}.{suffix}", m.name);
                let src = find(&key).ok_or_else(|| format!("optimizer state lacks `{key}`"))?;
                if src.size() != m.shape {
                    return Err(format!(
                        "optimizer state `{key}` has shape {:?}, expected {:?}",
                        src.size(),
                        m.shape
                    ));
                }
                let src = src.reshape([-1]);
                let member = m.offset..m.offset + m.numel;
                for (range, at) in flat.owned_with_moments() {
                    let (start, end) = (range.start.max(member.start), range.end.min(member.end));
                    if start < end {
                        tch::no_grad(|| {
                            buffer
                                .narrow(0, at + start - range.start, end - start)
                                .copy_(&src.narrow(0, start - member.start, end - start))
                        });
                    }
                }
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn param(values: &[f32]) -> Tensor {
        Tensor::from_slice(values)
            .view([1, values.len() as i64])
            .set_requires_grad(true)
    }

    /// Reference AdamW in plain f64 for one scalar.
    fn reference(mut p: f64, grads: &[f64], lr: f64, cfg: AdamWConfig) -> f64 {
        let (mut m, mut v) = (0.0, 0.0);
        for (t, g) in grads.iter().enumerate() {
            let t = t as i32 + 1;
            m = cfg.beta1 * m + (1.0 - cfg.beta1) * g;
            v = cfg.beta2 * v + (1.0 - cfg.beta2) * g * g;
            p *= 1.0 - lr * cfg.weight_decay;
            let (mh, vh) = (m / (1.0 - cfg.beta1.powi(t)), v / (1.0 - cfg.beta2.powi(t)));
            p -= lr * mh / (vh.sqrt() + cfg.eps);
        }
        p
    }

    #[test]
    fn matches_the_reference_update() {
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let w = param(&[0.5, -1.5]);
        let mut opt = AdamW::new(vec![("w".into(), w.shallow_clone())], cfg);
        let mut grads = [vec![], vec![]];
        for step in 0..5 {
            opt.zero_grad();
            // loss = sum(w³) + step·sum(w): gradient 3w² + step.
            let loss = w.pow_tensor_scalar(3).sum(Kind::Float) + w.sum(Kind::Float) * step as f64;
            loss.backward();
            let g = Vec::<f32>::try_from(w.grad().flatten(0, -1)).unwrap();
            grads[0].push(g[0] as f64);
            grads[1].push(g[1] as f64);
            opt.step(0.01);
        }
        let got = Vec::<f32>::try_from(w.detach().flatten(0, -1)).unwrap();
        for (i, start) in [0.5, -1.5].into_iter().enumerate() {
            let want = reference(start, &grads[i], 0.01, cfg);
            assert!(
                (got[i] as f64 - want).abs() < 1e-5,
                "param {i}: {} vs {want}",
                got[i]
            );
        }
        assert_eq!(opt.steps_taken(), 5);
    }

    #[test]
    fn update_pieces_tile_the_owned_elements_and_cut_only_where_the_result_cannot_change() {
        let flat = |decayed: i64, owned: Vec<Range<i64>>| Flat {
            params: Tensor::zeros([1000], (Kind::Float, Device::Cpu)),
            grads: Tensor::zeros([1000], (Kind::Float, Device::Cpu)),
            compact_grads: false,
            exp_avg: Tensor::zeros([0], (Kind::Float, Device::Cpu)),
            exp_avg_sq: Tensor::zeros([0], (Kind::Float, Device::Cpu)),
            decayed,
            owned,
            step_count: Tensor::zeros([], (Kind::Float, Device::Cpu)),
        };
        let cuts = |f: &Flat| -> Vec<(i64, i64, i64, bool)> {
            f.update_pieces()
                .iter()
                .map(|p| (p.elements.start, p.elements.end, p.moments, p.decayed))
                .collect()
        };
        // Unsharded: decay ends at 700, the next aligned element is 704.
        assert_eq!(
            cuts(&flat(
                700,
                vec![Range {
                    start: 0,
                    end: 1000
                }]
            )),
            vec![
                (0, 700, 0, true),
                (700, 704, 700, false),
                (704, 1000, 704, false)
            ]
        );
        // Sharded at aligned points (and an empty share): the same cuts
        // within each share, moments range after range.
        assert_eq!(
            cuts(&flat(700, vec![0..128, 640..768, 900..900, 960..1000])),
            vec![
                (0, 128, 0, true),
                (640, 700, 128, true),
                (700, 704, 188, false),
                (704, 768, 192, false),
                (960, 1000, 256, false),
            ]
        );
        // An aligned end of decay needs no second cut; nothing decayed,
        // none at all.
        assert_eq!(
            cuts(&flat(
                640,
                vec![Range {
                    start: 0,
                    end: 1000
                }]
            )),
            vec![(0, 640, 0, true), (640, 1000, 640, false)]
        );
        assert_eq!(
            cuts(&flat(
                0,
                vec![Range {
                    start: 0,
                    end: 1000
                }]
            )),
            vec![(0, 1000, 0, false)]
        );
    }

    #[test]
    fn biases_are_not_decayed() {
        let b = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let cfg = AdamWConfig {
            weight_decay: 0.5,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(vec![("b".into(), b.shallow_clone())], cfg);
        (&b * 0.0).sum(Kind::Float).backward(); // zero gradient
        opt.step(0.1);
        assert!(b.detach().eq(1.0).all().int64_value(&[]) == 1);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let w = param(&[3.0, 4.0]);
        let mut opt = AdamW::new(
            vec![("w".into(), w.shallow_clone())],
            AdamWConfig::default(),
        );
        (&w * &w).sum(Kind::Float).backward(); // gradient (6, 8), norm 10
        assert!((opt.clip_grad_norm(1.0) - 10.0).abs() < 1e-5);
        assert!((opt.grad_norm() - 1.0).abs() < 1e-4);
    }

    #[test]
    fn state_round_trips_and_continues_identically() {
        let run = |split: Option<u64>| {
            tch::manual_seed(0);
            let w = param(&[0.3, 0.7, -0.2]);
            let mut opt = AdamW::new(
                vec![("w".into(), w.shallow_clone())],
                AdamWConfig::default(),
            );
            for step in 0..6u64 {
                if Some(step) == split {
                    // Rebuild the optimizer from its exported state.
                    let (n, state) = opt.state();
                    let state: Vec<_> = state.into_iter().map(|(k, t)| (k, t.copy())).collect();
                    opt = AdamW::new(
                        vec![("w".into(), w.shallow_clone())],
                        AdamWConfig::default(),
                    );
                    opt.load_state(n, &state).unwrap();
                }
                opt.zero_grad();
                (w.pow_tensor_scalar(2) * (step + 1) as f64)
                    .sum(Kind::Float)
                    .backward();
                opt.step(0.05);
            }
            w.detach()
        };
        assert!(
            run(None).equal(&run(Some(3))),
            "bitwise equal after a state round trip"
        );
        let mut opt = AdamW::new(vec![("w".into(), param(&[1.0]))], AdamWConfig::default());
        let err = opt.load_state(1, &[]).unwrap_err();
        assert!(err.contains("w.exp_avg"), "{err}");
    }

    /// The update parameter by parameter, as AdamW is usually written: the
    /// flat one must give bitwise the same values.
    fn per_parameter_step(
        params: &[Tensor],
        moments: &mut [(Tensor, Tensor)],
        step: u64,
        lr: f64,
        cfg: AdamWConfig,
    ) {
        let bias1 = 1.0 - cfg.beta1.powi(step as i32);
        let bias2 = 1.0 - cfg.beta2.powi(step as i32);
        tch::no_grad(|| {
            for (p, (m, v)) in params.iter().zip(moments.iter_mut()) {
                let g = p.grad();
                let _ = m.lerp_(&g, 1.0 - cfg.beta1);
                let _ = v.g_mul_scalar_(cfg.beta2);
                let _ = v.addcmul_(&(&g * (1.0 - cfg.beta2)), &g);
                let mut p = p.shallow_clone();
                if p.dim() >= 2 {
                    let _ = p.g_mul_scalar_(1.0 - lr * cfg.weight_decay);
                }
                let mut denom = v.sqrt();
                let _ = denom.g_div_scalar_(bias2.sqrt());
                let _ = denom.g_add_scalar_(cfg.eps);
                let _ = denom.g_mul_scalar_(-bias1 / lr);
                let _ = p.addcdiv_(&*m, &denom);
            }
        });
    }

    #[test]
    fn parameters_and_gradients_live_in_one_flat_buffer_and_update_as_per_parameter() {
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        // The last is larger than a vector: several and a ragged end.
        let shapes: [&[i64]; 4] = [&[4, 3], &[3], &[2, 2, 3], &[100_003]];
        let flat_params: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let n: i64 = s.iter().product();
                (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.37 + i as f64)
                    .sin()
                    .view(*s)
                    .set_requires_grad(true)
            })
            .collect();
        let reference: Vec<Tensor> = flat_params
            .iter()
            .map(|p| p.detach().copy().set_requires_grad(true))
            .collect();
        let loss = |ps: &[Tensor], step: u64| -> Tensor {
            ps.iter()
                .map(|p| (p.pow_tensor_scalar(3) * (step + 1) as f64 + p).sum(Kind::Float))
                .sum()
        };
        let named = |ps: &[Tensor]| -> Vec<(String, Tensor)> {
            ps.iter()
                .enumerate()
                .map(|(i, p)| (format!("p{i}"), p.shallow_clone()))
                .collect()
        };
        let mut opt = AdamW::new(named(&flat_params), cfg);
        let mut moments: Vec<(Tensor, Tensor)> = reference
            .iter()
            .map(|p| (p.zeros_like(), p.zeros_like()))
            .collect();
        for step in 0..4u64 {
            opt.zero_grad();
            loss(&flat_params, step).backward();
            // Backward wrote the flat buffer: it holds every gradient.
            let grads = opt.flat_grads();
            let gathered: Vec<Tensor> = flat_params
                .iter()
                .map(|p| p.grad().flatten(0, -1))
                .collect();
            let by_layout: Vec<Tensor> = [0usize, 2, 1, 3]
                .iter()
                .map(|&i| gathered[i].shallow_clone())
                .collect();
            assert!(
                grads[0].equal(&Tensor::cat(&by_layout, 0)),
                "decayed first, by name"
            );
            opt.step(0.01);

            for p in &reference {
                p.shallow_clone().zero_grad();
            }
            loss(&reference, step).backward();
            per_parameter_step(&reference, &mut moments, step + 1, 0.01, cfg);
        }
        // The fused kernel rounds a few elements otherwise than the
        // per-parameter formula (fused multiply-adds), not more.
        for (a, b) in flat_params.iter().zip(&reference) {
            let err = (a.detach() - b.detach()).abs().max().double_value(&[]);
            assert!(
                err < 1e-6,
                "flat and per-parameter updates differ by {err}: {:?} vs {:?}",
                Vec::<f32>::try_from(a.detach().flatten(0, -1)).unwrap(),
                Vec::<f32>::try_from(b.detach().flatten(0, -1)).unwrap()
            );
        }
        // The parameters are views into the buffer.
        let base = opt.flats[0].params.data_ptr() as usize;
        let end = base + 4 * opt.flats[0].params.numel();
        for p in &flat_params {
            let at = p.data_ptr() as usize;
            assert!((base..end).contains(&at));
        }
    }
}
