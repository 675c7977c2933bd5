//! Using Edge-LLM as a library: load a model, score a sentence, and generate greedily.
//!
//! ```sh
//! cargo run --release -p edgec --example library -- "$(scripts/fetch-model.sh)" "It is a truth universally"
//! ```

use std::sync::Arc;

use edge_runtime::sampling::argmax;
use edge_runtime::{Executor, Rows};
use edgec::frontend::{LoadOptions, load};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model_path = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: library <model> [prompt]"))?;
    let prompt = args
        .next()
        .unwrap_or_else(|| "It is a truth universally acknowledged".into());

    // Any frontend (safetensors directory, .gguf, .onnx) gives the same IR graph.
    let model = load(model_path.as_ref(), &LoadOptions::default())?;
    let tokenizer = model
        .tokenizer
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the model carries no tokenizer"))?;
    let exec = Executor::new(Arc::new(model.graph))?;

    // Score the prompt: mean next-token loss over its positions.
    let ids = tokenizer.encode(&prompt)?;
    anyhow::ensure!(ids.len() >= 2, "the prompt needs at least two tokens");
    let mut session = exec.session(ids.len() + 24);
    let out = exec.forward(&mut session, &ids, Rows::All, &[])?;
    let vocab = exec.graph().config.vocab_size;
    let loss: f64 = out
        .logits
        .chunks_exact(vocab)
        .zip(&ids[1..])
        .map(|(row, &next)| edgec::eval::nll(row, next))
        .sum::<f64>()
        / (ids.len() - 1) as f64;
    println!("prompt loss {loss:.4} (perplexity {:.2})", loss.exp());

    // Continue it greedily, reusing the KV cache.
    let mut next = argmax(&out.logits[(ids.len() - 1) * vocab..]);
    let mut generated = vec![next];
    for _ in 0..23 {
        let step = exec.forward(&mut session, &[next], Rows::Last, &[])?;
        next = argmax(&step.logits);
        generated.push(next);
    }
    println!("{}{}", prompt, tokenizer.decode(&generated)?);
    Ok(())
}
