//! Flat parameter buffers: every tensor of the model laid end to end in one
//! `Vec<f32>`, in spec order, so aggregation is one loop over one slice.

use crate::model::{Init, TensorSpec};
use crate::rng::SplitMix64;

/// Where each tensor lives in the flat buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamLayout {
    tensors: Vec<TensorSlot>,
    total: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorSlot {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub numel: usize,
}

impl ParamLayout {
    pub fn new(specs: &[TensorSpec]) -> ParamLayout {
        let mut offset = 0;
        let tensors = specs
            .iter()
            .map(|spec| {
                let slot = TensorSlot {
                    name: spec.name.clone(),
                    shape: spec.shape.clone(),
                    offset,
                    numel: spec.numel(),
                };
                offset += slot.numel;
                slot
            })
            .collect();
        ParamLayout {
            tensors,
            total: offset,
        }
    }

    /// Total number of scalar parameters.
    pub fn total(&self) -> usize {
        self.total
    }

    pub fn tensors(&self) -> &[TensorSlot] {
        &self.tensors
    }

    pub fn tensor(&self, index: usize) -> Option<&TensorSlot> {
        self.tensors.get(index)
    }
}

/// Initial parameters, reproducible from `seed`.
pub fn init_params(specs: &[TensorSpec], seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    let mut params = Vec::with_capacity(specs.iter().map(TensorSpec::numel).sum());
    for spec in specs {
        match spec.init {
            Init::Zeros => params.extend(std::iter::repeat_n(0.0, spec.numel())),
            Init::Ones => params.extend(std::iter::repeat_n(1.0, spec.numel())),
            Init::Normal { std } => {
                params.extend((0..spec.numel()).map(|_| (rng.next_normal() * std as f64) as f32))
            }
        }
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    #[test]
    fn layout_is_contiguous_in_spec_order() {
        let specs = ModelConfig::tiny_byte_level().tensor_specs();
        let layout = ParamLayout::new(&specs);
        let mut expected = 0;
        for slot in layout.tensors() {
            assert_eq!(slot.offset, expected);
            expected += slot.numel;
        }
        assert_eq!(layout.total(), expected);
    }

    #[test]
    fn init_is_reproducible_and_follows_the_spec() {
        let specs = ModelConfig::tiny_byte_level().tensor_specs();
        let a = init_params(&specs, 42);
        assert_eq!(a, init_params(&specs, 42));
        assert_ne!(a, init_params(&specs, 43));
        let layout = ParamLayout::new(&specs);
        let ln = layout
            .tensors()
            .iter()
            .find(|t| t.name == "ln_f.weight")
            .unwrap();
        assert!(a[ln.offset..ln.offset + ln.numel].iter().all(|&x| x == 1.0));
        let wte = &layout.tensors()[0];
        let values = &a[wte.offset..wte.offset + wte.numel];
        let std = (values.iter().map(|x| x * x).sum::<f32>() / values.len() as f32).sqrt();
        assert!((std - 0.02).abs() < 0.002, "wte std {std}");
    }
}
