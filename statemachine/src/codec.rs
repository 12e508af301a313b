//! Versioned encoding of everything drplane stores or replicates.
//!
//! Every stored value and every replicated command is `[version byte][bincode(serde)]`.
//! A reader refuses a version it does not know instead of misreading it, so a newer node's
//! records are never silently corrupted by an older binary. New entities and new command
//! variants are added at the end of their enums, which keeps old encodings decodable.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::StoreError;

/// The current encoding version of stored records and commands.
pub const FORMAT_VERSION: u8 = 1;

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encode a value with the version prefix.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(64);
    out.push(FORMAT_VERSION);
    let body = bincode::serde::encode_to_vec(value, config())
        .map_err(|e| StoreError::Codec(format!("encode: {e}")))?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decode a value written by [`encode`], refusing unknown versions.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    let (version, body) = bytes
        .split_first()
        .ok_or_else(|| StoreError::Codec("empty record".into()))?;
    if *version != FORMAT_VERSION {
        return Err(StoreError::Codec(format!(
            "record version {version} is not supported by this binary (knows {FORMAT_VERSION})"
        )));
    }
    let (value, used) = bincode::serde::decode_from_slice(body, config())
        .map_err(|e| StoreError::Codec(format!("decode: {e}")))?;
    if used != body.len() {
        return Err(StoreError::Codec(format!(
            "trailing bytes after record: {} of {}",
            body.len() - used,
            body.len()
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_version_check() {
        let v = (String::from("a"), 7u64);
        let bytes = encode(&v).expect("encode");
        assert_eq!(bytes[0], FORMAT_VERSION);
        let back: (String, u64) = decode(&bytes).expect("decode");
        assert_eq!(back, v);

        let mut future = bytes.clone();
        future[0] = FORMAT_VERSION + 1;
        let err = decode::<(String, u64)>(&future).expect_err("future version must be refused");
        assert!(err.to_string().contains("not supported"), "{err}");
        assert!(decode::<(String, u64)>(&[]).is_err());
    }
}
