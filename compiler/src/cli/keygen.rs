//! `edgec keygen`.

use std::path::PathBuf;

use clap::Args;
use edge_runtime::bundle;

#[derive(Args)]
#[command(
    after_help = "Writes KEY (the ed25519 private key, mode 0600) and KEY.pub (its public key). Sign bundles \
with `edgec build --sign-key KEY`; devices and `edgec verify` trust KEY.pub (--trusted-key)."
)]
pub struct KeygenArgs {
    /// Private key file to write (the public key goes to the same path + `.pub`).
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// Replace existing key files.
    #[arg(long)]
    force: bool,
    /// Print a JSON object (paths and the public key) instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: KeygenArgs) -> anyhow::Result<()> {
    let key = bundle::generate_key()?;
    let public = bundle::write_key_pair(&a.output, &key, a.force)?;
    let hex = bundle::hex(key.verifying_key().as_bytes());
    if a.json {
        let v = serde_json::json!({
            "private_key": a.output.display().to_string(),
            "public_key": public.display().to_string(),
            "ed25519_public": hex,
        });
        println!("{v}");
    } else {
        println!("private key {} (mode 0600)", a.output.display());
        println!("public key  {}  ed25519 {hex}", public.display());
    }
    Ok(())
}
