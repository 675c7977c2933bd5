//! Perplexity evaluation.
