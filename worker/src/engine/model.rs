//! [`StepModel`]: what the engine needs of a model, so that the scheduler
//! ([`super::state`]) is a plain state machine over it. The worker's model
//! ([`LoadedModel`]: a [`crate::model::Llama`] on its backend, and its tokenizer)
//! implements it; the scheduler's unit tests use a scripted fake.

use super::output::Detokenize;
use crate::model::{BatchItem, KvShape, LoadedModel, Logits, Result, TextTokenizer};

/// A model the engine can step.
pub trait StepModel: Send + Sync + 'static {
    /// What turns its token ids into text.
    type Text: Detokenize;
    /// Shapes of a cache for this model.
    fn kv_shape(&self) -> KvShape;
    /// Most tokens of a sequence (prompt and generated).
    fn context_length(&self) -> usize;
    /// Tokens that end a sequence.
    fn eos_ids(&self) -> &[u32];
    /// Its detokenizer.
    fn text(&self) -> &Self::Text;
    /// One forward step over a batch: the logits of each item's last fed token (see
    /// [`crate::model::Llama::forward`]). Rows must not depend on the batch.
    fn step(&self, items: &mut [BatchItem<'_>]) -> Result<Logits>;
    /// On a GPU: the device's memory in use and its total.
    fn device_memory(&self) -> Option<(usize, usize)>;
}

impl StepModel for LoadedModel {
    type Text = TextTokenizer;

    fn kv_shape(&self) -> KvShape {
        self.model.kv_shape()
    }

    fn context_length(&self) -> usize {
        self.model.config().context_length
    }

    fn eos_ids(&self) -> &[u32] {
        self.tokenizer.eos_ids()
    }

    fn text(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    fn step(&self, items: &mut [BatchItem<'_>]) -> Result<Logits> {
        self.model.forward(items)
    }

    fn device_memory(&self) -> Option<(usize, usize)> {
        self.model.gpu_memory()
    }
}
