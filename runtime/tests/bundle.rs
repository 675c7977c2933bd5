//! The bundle container on its own (no model): the writer's layout and atomicity, and the
//! reader's checks. Whole-model round trips are in compiler/tests/bundle.rs.

use std::path::Path;

use edge_runtime::bundle::{
    self, ALIGN, BundleError, BundleWriter, HEADER_LEN, MAGIC, TRAILER_LEN, TrustPolicy, manifest as pb,
    verify_file,
};
use sha2::Digest;

fn manifest(sizes: &[u64]) -> pb::Manifest {
    pb::Manifest {
        target: Some(pb::Target {
            name: "test".into(),
            arch: std::env::consts::ARCH.into(),
            ..Default::default()
        }),
        tensors: sizes
            .iter()
            .enumerate()
            .map(|(i, &s)| pb::TensorEntry {
                name: format!("t{i}"),
                dtype: pb::ElemType::U8 as i32,
                shape: vec![s],
                size: s,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn data(i: usize, n: u64) -> Vec<u8> {
    (0..n).map(|j| (i as u64 * 31 + j * 7) as u8).collect()
}

fn write(path: &Path, sizes: &[u64], key: Option<&bundle::SigningKey>) -> bundle::WrittenBundle {
    let mut w = BundleWriter::create(path, manifest(sizes)).unwrap();
    for (i, &s) in sizes.iter().enumerate() {
        w.write_tensor(&data(i, s)).unwrap();
    }
    w.finish(key).unwrap()
}

fn partials(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect()
}

#[test]
fn layout_is_aligned_hashed_and_signed() {
    let dir = tempfile::tempdir().unwrap();
    let key = bundle::generate_key().unwrap();
    let path = dir.path().join("b.edgeb");
    let sizes = [1u64, 100, 64, 3];
    let written = write(&path, &sizes, Some(&key));
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len() as u64, written.size);
    assert_eq!(&bytes[..8], MAGIC);
    assert_eq!(
        u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
        bundle::FORMAT_VERSION
    );
    let t = bytes.len() - TRAILER_LEN;
    assert_eq!(t as u64 % ALIGN, 0);
    assert_eq!(&bytes[t..t + 8], bundle::TRAILER_MAGIC);
    let digest: [u8; 32] = sha2::Sha256::digest(&bytes[..t]).into();
    assert_eq!(digest, written.sha256);
    assert_eq!(&bytes[t + 16..t + 48], &digest);
    assert_eq!(&bytes[t + 48..t + 80], key.verifying_key().as_bytes());

    let policy = TrustPolicy::trusting(vec![key.verifying_key()]);
    let v = verify_file(&path, &policy).unwrap();
    assert_eq!(v.tensors_checked, sizes.len());
    assert_eq!(v.sha256, bundle::hex(&digest));
    // Each tensor at its aligned offset, holding exactly what was written.
    let m_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let m: pb::Manifest = prost::Message::decode(&bytes[HEADER_LEN..HEADER_LEN + m_len]).unwrap();
    for (i, e) in m.tensors.iter().enumerate() {
        assert_eq!(e.offset % ALIGN, 0);
        assert_eq!(
            &bytes[e.offset as usize..(e.offset + e.size) as usize],
            data(i, sizes[i]).as_slice()
        );
    }
    assert!(partials(dir.path()).is_empty());
}

#[test]
fn an_unfinished_or_wrong_write_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.edgeb");
    // Dropped half way: no destination, no partial file.
    {
        let mut w = BundleWriter::create(&path, manifest(&[10, 20])).unwrap();
        w.write_tensor(&data(0, 10)).unwrap();
        assert_eq!(partials(dir.path()).len(), 1);
    }
    assert!(!path.exists() && partials(dir.path()).is_empty());
    // A tensor of the wrong size, or too few tensors: errors, nothing written.
    let mut w = BundleWriter::create(&path, manifest(&[10, 20])).unwrap();
    let e = w.write_tensor(&data(0, 11)).unwrap_err().to_string();
    assert!(e.contains("declared 10 bytes, 11 given"), "{e}");
    w.write_tensor(&data(0, 10)).unwrap();
    let e = w.finish(None).unwrap_err().to_string();
    assert!(e.contains("1 of 2 tensors"), "{e}");
    assert!(!path.exists() && partials(dir.path()).is_empty());
    // Replacing an existing bundle is atomic: the old one stays until the new one is complete.
    write(&path, &[5], None);
    let old = std::fs::read(&path).unwrap();
    {
        let mut w = BundleWriter::create(&path, manifest(&[7])).unwrap();
        w.write_tensor(&data(0, 7)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), old);
    }
    assert_eq!(std::fs::read(&path).unwrap(), old);
}

#[test]
fn unsigned_and_untrusted_need_the_development_flag() {
    let dir = tempfile::tempdir().unwrap();
    let key = bundle::generate_key().unwrap();
    let other = bundle::generate_key().unwrap();
    let unsigned = dir.path().join("u.edgeb");
    let signed = dir.path().join("s.edgeb");
    write(&unsigned, &[8], None);
    write(&signed, &[8], Some(&key));
    let strict = TrustPolicy::trusting(vec![other.verifying_key()]);
    assert!(matches!(
        verify_file(&unsigned, &strict),
        Err(BundleError::Unsigned { .. })
    ));
    assert!(matches!(
        verify_file(&signed, &strict),
        Err(BundleError::UntrustedKey { .. })
    ));
    let dev = TrustPolicy {
        allow_unsigned: true,
        ..strict
    };
    let v = verify_file(&unsigned, &dev).unwrap();
    assert!(!v.signed && v.signer.is_none());
    let v = verify_file(&signed, &dev).unwrap();
    assert!(v.signed && !v.trusted);
}

#[test]
fn a_bundle_for_another_isa_or_missing_features_is_refused_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.edgeb");
    write(&path, &[8], None);
    let other = if std::env::consts::ARCH == "x86_64" {
        "aarch64"
    } else {
        "x86_64"
    };
    let t = |arch: &str, features: &[&str]| bundle::BundleTarget {
        name: "t".into(),
        arch: arch.into(),
        features: features.iter().map(|f| f.to_string()).collect(),
        description: String::new(),
    };
    let e = bundle::check_host(&path, &t(other, &[])).unwrap_err();
    assert!(matches!(e, BundleError::WrongArch { .. }), "{e}");
    let e = bundle::check_host(&path, &t(std::env::consts::ARCH, &["no-such-feature"])).unwrap_err();
    assert!(e.to_string().contains("no-such-feature"), "{e}");
    bundle::check_host(&path, &t(std::env::consts::ARCH, &[])).unwrap();
}
