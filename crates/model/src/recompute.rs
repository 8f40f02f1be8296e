//! Activation checkpointing without `torch.utils.checkpoint`: a chain of
//! segments is run once without autograd, keeping only each segment's
//! input; backward then recomputes the segments from the last to the first,
//! each with autograd on, and backpropagates through it alone.
//!
//! libtorch's C++ API has no checkpoint function and tch binds no custom
//! autograd `Function`, so the backward is driven by hand ("segmented
//! backward"): for segment `k`, with `g` the gradient of the loss with
//! respect to its output, the backward of `sum(out_k · g)` has exactly `g`
//! flowing into `out_k` (the gradient of a product by a constant is that
//! constant, bit for bit), so it accumulates the segment's parameter
//! gradients and leaves the gradient of its input on the (detached,
//! `requires_grad`) copy of that input, ready for segment `k - 1`.
//!
//! Memory: the forward keeps the segments' inputs and the chain's output,
//! not their insides; backward holds one segment's graph at a time.
//!
//! Parameters: every backward here accumulates into the parameters' `.grad`
//! as a plain `loss.backward()` does, and gradients add up, so a parameter
//! used in several segments, or in a segment and outside the chain (the
//! embeddings before it, the head after it), receives the sum of all its
//! contributions once every part's backward has run. The parameters must
//! not change between the forward and [`Chain::backward`] (they do not:
//! the optimizer steps after).
//!
//! Randomness: a segment is run twice, so any random draw inside it must be
//! replayed: a segment that draws (dropout) must seed the generator itself,
//! identically on both calls (see the GPT's dropout seeds). Draws outside
//! the chain (the dVAE's Gumbel noise) happen once and need nothing.

use tch::{Kind, Tensor};

/// One segment: a pure function of its input (and of parameters it
/// captures), called once without and once with autograd.
pub type Segment<'a> = Box<dyn Fn(&Tensor) -> Tensor + 'a>;

/// A chain of segments run without keeping their activations; see the
/// module docs.
pub struct Chain<'a> {
    /// The chain's input, with whatever graph produced it.
    input: Tensor,
    /// Each segment's input, detached (the first is `input`'s data).
    saved: Vec<Tensor>,
    segments: Vec<Segment<'a>>,
    /// The last segment's output: a leaf that requires grad.
    output: Tensor,
}

impl<'a> Chain<'a> {
    /// Runs `input` through `segments` with autograd off. Build the rest
    /// of the loss on [`Chain::output`] with autograd on, backpropagate it,
    /// then call [`Chain::backward`].
    pub fn forward(input: &Tensor, segments: Vec<Segment<'a>>) -> Self {
        let mut saved = Vec::with_capacity(segments.len());
        let mut x = input.detach();
        tch::no_grad(|| {
            for segment in &segments {
                let y = segment(&x);
                saved.push(std::mem::replace(&mut x, y));
            }
        });
        Self {
            input: input.shallow_clone(),
            saved,
            segments,
            output: x.detach().set_requires_grad(true),
        }
    }

    /// The last segment's output (a leaf: gradients stop here until
    /// [`Chain::backward`] carries them on).
    pub fn output(&self) -> &Tensor {
        &self.output
    }

    /// Carries the gradient that has reached [`Chain::output`] back through
    /// every segment (recomputing each) and into the graph of the chain's
    /// input. Call it after every backward that reaches the output; an
    /// output no loss used leaves nothing to do.
    pub fn backward(self) {
        let Self {
            input,
            mut saved,
            segments,
            output,
        } = self;
        let mut grad = output.grad();
        drop(output);
        if !grad.defined() {
            return;
        }
        for (k, segment) in segments.iter().enumerate().rev() {
            let x = saved.pop().expect("one saved input per segment");
            // The first segment's input needs a gradient only if the
            // chain's input carries a graph (it does not for images).
            let wants_grad = k > 0 || input.requires_grad();
            let x = if wants_grad {
                x.set_requires_grad(true)
            } else {
                x
            };
            let y = segment(&x);
            if y.requires_grad() {
                (y * &grad).sum(Kind::Float).backward();
            }
            if !wants_grad {
                return;
            }
            grad = x.grad();
            if !grad.defined() {
                return;
            }
        }
        if input.requires_grad() {
            (&input * &grad).sum(Kind::Float).backward();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// A chain of three affine + tanh segments sharing one weight, fed by a
    /// parameter outside the chain, and a tail using the weight too: every
    /// parameter's gradient equals plain backward's.
    #[test]
    fn segmented_backward_gives_plain_backward_gradients() {
        tch::manual_seed(1);
        let opts = (Kind::Float, Device::Cpu);
        let w = (Tensor::randn([5, 5], opts) * 0.5).set_requires_grad(true);
        let b = Tensor::randn([5], opts).set_requires_grad(true);
        let pre = Tensor::randn([5], opts).set_requires_grad(true);
        let x = Tensor::randn([4, 5], opts);
        let segment = |x: &Tensor| (x.matmul(&w) + &b).tanh();
        let tail = |h: &Tensor| (h.matmul(&w) * 2.0).square().sum(Kind::Float);
        let params = [&w, &b, &pre];
        let grads = || -> Vec<Tensor> {
            params
                .iter()
                .map(|p| {
                    let g = p.grad().copy();
                    let mut p = p.shallow_clone();
                    p.zero_grad();
                    g
                })
                .collect()
        };

        let h = (0..3).fold(&x + &pre, |h, _| segment(&h));
        tail(&h).backward();
        let plain = grads();

        let segments: Vec<Segment> = (0..3).map(|_| Box::new(segment) as Segment).collect();
        let chain = Chain::forward(&(&x + &pre), segments);
        tail(chain.output()).backward();
        chain.backward();
        let checkpointed = grads();

        for (a, b) in plain.iter().zip(&checkpointed) {
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff <= 1e-6 * a.abs().max().double_value(&[]), "{diff}");
        }
        assert!(plain[2].abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}
