//! The running sum of a round's pushes, with exact undo of a push that fails
//! half way.
//!
//! Pushes fold into one f32 sum as their chunks arrive, so memory is
//! O(parameters) whatever the number of workers. A push can still fail after
//! some chunks were folded (a later chunk is malformed, the stream breaks, the
//! deadline passes). Subtracting the folded values back would neither be exact
//! in floating point nor possible (they are gone), so before a chunk is folded
//! the slice of the sum it touches is copied into an undo buffer; aborting the
//! push copies that prefix back. The restored sum is bit-identical to the sum
//! before the push. Pushes therefore fold one at a time (the coordinator
//! serialises them), which costs one extra buffer of the model's size and
//! nothing per worker.

/// The state of the push currently folding, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct OpenPush {
    /// Elements `[0, folded)` of the flat buffer have been folded.
    folded: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FoldError {
    #[error("no push is open")]
    NoOpenPush,
    #[error("a push is already open")]
    PushAlreadyOpen,
    #[error("chunk starts at element {got}, expected {expected}")]
    OutOfOrder { expected: usize, got: usize },
    #[error("chunk of {len} elements at {offset} runs past the end ({total})")]
    PastEnd {
        offset: usize,
        len: usize,
        total: usize,
    },
    #[error("push ended after {folded} of {total} elements")]
    Incomplete { folded: usize, total: usize },
}

/// Sum of complete pushes, plus at most one push being folded.
#[derive(Debug)]
pub struct Accumulator {
    sum: Vec<f32>,
    undo: Vec<f32>,
    open: Option<OpenPush>,
    pushes: usize,
}

impl Accumulator {
    pub fn new(len: usize) -> Accumulator {
        Accumulator {
            sum: vec![0.0; len],
            undo: vec![0.0; len],
            open: None,
            pushes: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.sum.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sum.is_empty()
    }

    /// Number of complete pushes in the sum.
    pub fn pushes(&self) -> usize {
        self.pushes
    }

    pub fn is_push_open(&self) -> bool {
        self.open.is_some()
    }

    pub fn begin_push(&mut self) -> Result<(), FoldError> {
        if self.open.is_some() {
            return Err(FoldError::PushAlreadyOpen);
        }
        self.open = Some(OpenPush { folded: 0 });
        Ok(())
    }

    /// Folds `values` at flat position `offset`, which must continue the open
    /// push exactly where its last chunk ended.
    pub fn fold(&mut self, offset: usize, values: &[f32]) -> Result<(), FoldError> {
        let open = self.open.as_mut().ok_or(FoldError::NoOpenPush)?;
        if offset != open.folded {
            return Err(FoldError::OutOfOrder {
                expected: open.folded,
                got: offset,
            });
        }
        let end = offset
            .checked_add(values.len())
            .filter(|&end| end <= self.sum.len())
            .ok_or(FoldError::PastEnd {
                offset,
                len: values.len(),
                total: self.sum.len(),
            })?;
        let sum = &mut self.sum[offset..end];
        self.undo[offset..end].copy_from_slice(sum);
        for (s, v) in sum.iter_mut().zip(values) {
            *s += v;
        }
        open.folded = end;
        Ok(())
    }

    /// Closes the open push; it must have covered every element.
    pub fn finish_push(&mut self) -> Result<(), FoldError> {
        let open = self.open.ok_or(FoldError::NoOpenPush)?;
        if open.folded != self.sum.len() {
            return Err(FoldError::Incomplete {
                folded: open.folded,
                total: self.sum.len(),
            });
        }
        self.open = None;
        self.pushes += 1;
        Ok(())
    }

    /// Discards the open push, restoring the sum bit for bit. No-op if none is open.
    pub fn abort_push(&mut self) {
        if let Some(open) = self.open.take() {
            self.sum[..open.folded].copy_from_slice(&self.undo[..open.folded]);
        }
    }

    /// The sum of complete pushes. Panics in debug builds if a push is open.
    pub fn sum(&self) -> &[f32] {
        debug_assert!(self.open.is_none(), "sum read while a push is open");
        &self.sum
    }

    /// Mutable access to the sum of complete pushes, for the outer step to
    /// turn into the next parameters in place. Panics if a push is open.
    pub fn sum_mut(&mut self) -> &mut [f32] {
        assert!(self.open.is_none(), "sum written while a push is open");
        &mut self.sum
    }

    /// Swaps the sum buffer for `replacement` (zeroed here), returning the
    /// old one. The commit uses it to recycle the previous parameters'
    /// buffer as the next round's sum.
    pub fn swap_sum(&mut self, mut replacement: Vec<f32>) -> Vec<f32> {
        assert_eq!(
            replacement.len(),
            self.sum.len(),
            "replacement buffer has the wrong length"
        );
        assert!(self.open.is_none(), "sum taken while a push is open");
        replacement.fill(0.0);
        self.pushes = 0;
        std::mem::replace(&mut self.sum, replacement)
    }

    /// Drops every push of the round (an aborted round).
    pub fn reset(&mut self) {
        self.open = None;
        self.pushes = 0;
        self.sum.fill(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn push(acc: &mut Accumulator, values: &[f32], chunk: usize) {
        acc.begin_push().unwrap();
        for (i, part) in values.chunks(chunk).enumerate() {
            acc.fold(i * chunk, part).unwrap();
        }
        acc.finish_push().unwrap();
    }

    #[test]
    fn out_of_order_and_overlong_chunks_are_refused() {
        let mut acc = Accumulator::new(4);
        acc.begin_push().unwrap();
        assert_eq!(
            acc.fold(1, &[1.0]),
            Err(FoldError::OutOfOrder {
                expected: 0,
                got: 1
            })
        );
        acc.fold(0, &[1.0, 2.0]).unwrap();
        assert_eq!(
            acc.fold(2, &[1.0; 3]),
            Err(FoldError::PastEnd {
                offset: 2,
                len: 3,
                total: 4
            })
        );
        assert_eq!(
            acc.finish_push(),
            Err(FoldError::Incomplete {
                folded: 2,
                total: 4
            })
        );
        assert_eq!(acc.begin_push(), Err(FoldError::PushAlreadyOpen));
    }

    proptest! {
        #[test]
        fn aborted_push_leaves_the_sum_bit_identical(
            first in prop::collection::vec(-1e3f32..1e3, 64),
            second in prop::collection::vec(-1e3f32..1e3, 64),
            cut in 0usize..8,
            chunk in 1usize..16,
        ) {
            let mut acc = Accumulator::new(64);
            push(&mut acc, &first, chunk);
            let before: Vec<u32> = acc.sum().iter().map(|x| x.to_bits()).collect();
            acc.begin_push().unwrap();
            for (i, part) in second.chunks(chunk).take(cut).enumerate() {
                acc.fold(i * chunk, part).unwrap();
            }
            acc.abort_push();
            let after: Vec<u32> = acc.sum().iter().map(|x| x.to_bits()).collect();
            prop_assert_eq!(before, after);
            prop_assert_eq!(acc.pushes(), 1);
        }

        #[test]
        fn sum_of_pushes_does_not_depend_on_chunking(
            values in prop::collection::vec(prop::collection::vec(-10f32..10.0, 50), 1..5),
            chunk_a in 1usize..50,
            chunk_b in 1usize..50,
        ) {
            let mut a = Accumulator::new(50);
            let mut b = Accumulator::new(50);
            for v in &values {
                push(&mut a, v, chunk_a);
                push(&mut b, v, chunk_b);
            }
            prop_assert_eq!(a.sum(), b.sum());
            prop_assert_eq!(a.pushes(), values.len());
        }
    }
}
