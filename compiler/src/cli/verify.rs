//! `edgec verify`.

use std::path::PathBuf;

use clap::Args;
use edge_runtime::bundle::{self, TrustPolicy};

#[derive(Args)]
#[command(
    after_help = "Checks the bundle's magic and version, the SHA-256 of its bytes against the trailer, the \
ed25519 signature against the trusted keys, the manifest and tensor table, and every tensor's own SHA-256. \
Exits non-zero, naming the problem, when any check fails. Whether the bundle's target runs on this machine \
is reported but not required."
)]
pub struct VerifyArgs {
    /// The bundle (.edgeb).
    #[arg(long)]
    bundle: PathBuf,
    /// Public key(s) to trust (KEY.pub from `edgec keygen`); repeatable.
    #[arg(long = "trusted-key", required_unless_present = "allow_unsigned")]
    trusted_keys: Vec<PathBuf>,
    /// Development: accept an unsigned bundle or one signed by an untrusted key (corrupt
    /// bytes and bad signatures are still refused).
    #[arg(long)]
    allow_unsigned: bool,
    /// Print a JSON object instead of text (also on failure: `{"ok": false, "error": ...}`).
    #[arg(long)]
    json: bool,
}

pub fn run(a: VerifyArgs) -> anyhow::Result<()> {
    let result = TrustPolicy::from_key_files(&a.trusted_keys, a.allow_unsigned)
        .and_then(|policy| bundle::verify_file(&a.bundle, &policy));
    let v = match result {
        Ok(v) => v,
        Err(e) => {
            if a.json {
                println!("{}", serde_json::json!({"ok": false, "error": e.to_string()}));
            }
            return Err(e.into());
        }
    };
    let runs_here = bundle::check_host(&a.bundle, &v.target).is_ok();
    if a.json {
        let mut j = serde_json::to_value(&v)?;
        j["ok"] = true.into();
        j["runs_on_this_machine"] = runs_here.into();
        println!("{j}");
    } else {
        println!("{}: OK", v.path);
        println!("  sha256     {}", v.sha256);
        println!(
            "  signature  {}",
            match (&v.signer, v.trusted) {
                (Some(k), true) => format!("ed25519 {k} (trusted)"),
                (Some(k), false) => format!("ed25519 {k} (NOT trusted; accepted by --allow-unsigned)"),
                (None, _) => "none (accepted by --allow-unsigned)".into(),
            }
        );
        println!(
            "  target     {} ({}{}{}){}",
            v.target.name,
            v.target.arch,
            if v.target.features.is_empty() { "" } else { ": " },
            v.target.features.join(", "),
            if runs_here { "" } else { "; not this machine" }
        );
        println!(
            "  contents   {} tensors ({} bytes, each hash checked), {} kernels, graphs: {}",
            v.tensors,
            v.tensor_bytes,
            v.kernels,
            v.graphs.join(", ")
        );
        println!(
            "  built by   {} (bundle format {})",
            v.compiler_version, v.format_version
        );
    }
    Ok(())
}
