//! The key/value cache of incremental decoding: each layer's keys and
//! values for every position decoded so far, preallocated to the full
//! sequence so a step writes one slot instead of growing tensors.

use tch::{Device, Kind, Tensor};

pub struct LayerCache {
    keys: Tensor,
    values: Tensor,
}

impl LayerCache {
    /// Stores keys and values `(B, H, n, Dh)` for positions
    /// `start..start + n` and returns those of positions `0..start + n`.
    pub fn append(&mut self, start: i64, keys: &Tensor, values: &Tensor) -> (Tensor, Tensor) {
        let n = keys.size()[2];
        self.keys.narrow(2, start, n).copy_(keys);
        self.values.narrow(2, start, n).copy_(values);
        (
            self.keys.narrow(2, 0, start + n),
            self.values.narrow(2, 0, start + n),
        )
    }

    /// Stores keys and values `(B, H, 1, Dh)` at the position held in the
    /// device scalar `position` `(1,)` and returns the whole cache, every
    /// slot (those not written yet are zeros, for the caller to mask): the
    /// same shapes and addresses at every position, as a captured graph
    /// needs.
    pub fn write_at(
        &mut self,
        position: &Tensor,
        keys: &Tensor,
        values: &Tensor,
    ) -> (Tensor, Tensor) {
        let _ = self.keys.index_copy_(2, position, keys);
        let _ = self.values.index_copy_(2, position, values);
        (self.keys.shallow_clone(), self.values.shallow_clone())
    }
}

/// Where one call's keys and values go in a layer's cache.
pub enum Slot<'a> {
    /// Positions `start..start + n`, known on the host.
    From(i64),
    /// The one position held in a device scalar `(1,)`.
    At(&'a Tensor),
}

/// A layer's cache and where this call writes in it.
pub struct CacheWrite<'a> {
    pub layer: &'a mut LayerCache,
    pub slot: Slot<'a>,
}

impl CacheWrite<'_> {
    /// Stores this call's keys and values and returns every key and value
    /// its queries attend over.
    pub fn store(self, keys: &Tensor, values: &Tensor) -> (Tensor, Tensor) {
        match self.slot {
            Slot::From(start) => self.layer.append(start, keys, values),
            Slot::At(position) => self.layer.write_at(position, keys, values),
        }
    }
}

pub struct KvCache {
    pub(super) layers: Vec<LayerCache>,
    /// Positions already in the cache.
    pub(super) len: i64,
    pub(super) capacity: i64,
}

impl KvCache {
    pub(super) fn new(
        depth: i64,
        batch: i64,
        heads: i64,
        capacity: i64,
        head_dim: i64,
        kind: Kind,
        device: Device,
    ) -> Self {
        let shape = [batch, heads, capacity, head_dim];
        let layers = (0..depth)
            .map(|_| LayerCache {
                keys: Tensor::zeros(shape, (kind, device)),
                values: Tensor::zeros(shape, (kind, device)),
            })
            .collect();
        Self {
            layers,
            len: 0,
            capacity,
        }
    }

    /// Positions decoded so far.
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}
